"""Second-moment statistics (and AlphaEdit's null-space projection) for EasyEdit's MEMIT/AlphaEdit, computed once
from the same text windows as CrispEdit's capability curvature, cached where EasyEdit looks for them.

* **Text.** ``crispedit_easyedit.corpora.corpus_sequences(spec, tok, seq_len, n)``: the ``"stats"`` split of the
  corpus (default ``"wikipedia-offline"``, windows of 256 tokens, as ``hparams/CrispEdit/SmolLM2-135M-Instruct.yaml``'s
  ``mom2_dataset``/``curvature_seq_len``), ``n`` = the EasyEdit YAML's ``mom2_n_samples`` (one EasyEdit "sample"
  is one window). EasyEdit's ``layer_stats`` reads them through patch 8 of ``easyedit_patches``.
* **Where.** ``{stats_root}/{key}/`` (default ``stats_root`` ``~/.cache/crispedit_easyedit/easyedit_stats``, or the
  method config's ``stats_dir``), with ``key`` a hash of the base model's weight fingerprint, the tokenizer's content
  hash, the corpus identity, the window size, the number of windows and the dtype; ``identity.json`` beside the
  files says what the key stands for. EasyEdit then writes its own ``npz`` files under it, in its layout
  ``{stats_dir}/{last part of _name_or_path}/{mom2_dataset}_stats/{layer}_{dtype}_mom2_{n}.npz``.
* **Base weights.** In a sequential run the harness calls the method again on the edited model; the key is taken
  from the weights seen at ``chunk_index == 0`` (remembered per model object), so every chunk uses the base model's
  statistics, as EasyEdit does when its file exists.
* **AlphaEdit's P** (n_layers, d_in, d_in) is computed with AlphaEdit's own ``get_project`` (SVD of each layer's
  second moment, directions with singular value < ``nullspace_threshold``) and stored as
  ``alphaedit_P-{hash}.safetensors`` in the keyed folder (keyed by layers, module template, threshold).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import easyedit_patches as patches

logger = logging.getLogger(__name__)

DEFAULT_STATS_ROOT = "~/.cache/crispedit_easyedit/easyedit_stats"
DEFAULT_CORPUS = "wikipedia-offline"  # CrispEdit's SmolLM2 YAML: mom2_dataset
DEFAULT_SEQ_LEN = 256  # CrispEdit's SmolLM2 YAML: curvature_seq_len
STATS_FORMAT = 1

_BASE_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_PROJECTIONS: dict[str, torch.Tensor] = {}


class CorpusWindows(torch.utils.data.Dataset):
    """Token windows as EasyEdit's ``TokenizedDataset`` items: ``input_ids``, ``position_ids``, ``attention_mask``,
    each LongTensor (seq_len,)."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (n_windows, seq_len), got shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "position_ids": torch.arange(ids.shape[0]), "attention_mask": torch.ones_like(ids)}


def corpus_windows(spec: str, tok: Any, seq_len: int, n: int) -> CorpusWindows:
    """The first ``n`` windows of ``seq_len`` tokens of ``spec``'s ``"stats"`` split (``corpora.corpus_sequences``)."""
    from ...corpora import corpus_sequences

    packed = corpus_sequences(spec, tok, seq_len, n)
    return CorpusWindows(packed["input_ids"])


@dataclass
class StatsSettings:
    """What the statistics are computed from."""

    corpus: str = DEFAULT_CORPUS
    seq_len: int = DEFAULT_SEQ_LEN
    root: str = DEFAULT_STATS_ROOT

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StatsSettings:
        """``config["corpus"]``, ``config["corpus_seq_len"]``, ``config["stats_dir"]`` (each optional)."""
        seq_len = config.get("corpus_seq_len", DEFAULT_SEQ_LEN)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
            raise ValueError(f"corpus_seq_len must be an integer >= 2, got {seq_len!r}")
        return cls(corpus=str(config.get("corpus") or DEFAULT_CORPUS), seq_len=seq_len,
                   root=str(config.get("stats_dir") or DEFAULT_STATS_ROOT))


@dataclass
class StatsReport:
    """What the statistics phase did (goes into the receipt under ``"statistics"``)."""

    corpus: str
    split: str
    seq_len: int
    samples: int
    tokens: int
    key: str
    stats_dir: str
    layers: dict[str, str] = field(default_factory=dict)
    datasets_built: int = 0
    projection: dict[str, Any] | None = None

    @property
    def computed(self) -> int:
        return sum(1 for v in self.layers.values() if v == "computed")

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["computed"] = self.computed
        return out


def base_fingerprint(model: torch.nn.Module, chunk_index: int) -> str:
    """The weights fingerprint of the base model: taken at ``chunk_index == 0`` and remembered for later chunks."""
    from ...curvature import model_fingerprint

    if chunk_index == 0 or model not in _BASE_FINGERPRINTS:
        if chunk_index != 0:
            logger.warning("chunk_index %d on a model never seen at chunk_index 0: the statistics key is taken from "
                           "its current (possibly edited) weights", chunk_index)
        _BASE_FINGERPRINTS[model] = model_fingerprint(model)["weights_sha256"]
    return _BASE_FINGERPRINTS[model]


def stats_identity(model: torch.nn.Module, tok: Any, settings: StatsSettings, n: int, dtype: str,
                   chunk_index: int) -> dict[str, Any]:
    """Everything the statistics depend on (JSON; no machine path)."""
    from ...corpora import corpus_key
    from ...curvature import tokenizer_fingerprint

    return {"format": STATS_FORMAT, "model_weights_sha256": base_fingerprint(model, chunk_index),
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "tokenizer_sha256": tokenizer_fingerprint(tok), "corpus": corpus_key(settings.corpus, "stats"),
            "seq_len": settings.seq_len, "windows": n, "dtype": dtype}


def portable(path: Path) -> str:
    """``path`` with the home folder written as ``~``."""
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return path.as_posix()


def easyedit_stats_file(stats_dir: Path, model: torch.nn.Module, ds_name: str, layer_name: str, dtype: str,
                        n: int) -> Path:
    """Where EasyEdit's ``layer_stats`` keeps a layer's second moment (its naming, for ``batch_tokens`` None)."""
    model_name = str(getattr(model.config, "_name_or_path", "")).rsplit("/")[-1]
    return stats_dir / model_name / f"{ds_name}_stats" / f"{layer_name}_{dtype}_mom2_{n}.npz"


def prepare_statistics(module_name: str, model: torch.nn.Module, tok: Any, hparams: Any, settings: StatsSettings,
                       chunk_index: int, out: list[patches.Patch]) -> StatsReport:
    """Point ``hparams.stats_dir`` at the keyed folder and fill EasyEdit's ``COV_CACHE`` for every edit layer.

    Each layer's statistics are loaded from EasyEdit's file when it exists, else computed by EasyEdit's own
    ``get_cov``/``layer_stats`` from the corpus windows (patch 8). ``hparams.mom2_n_samples`` is the number of windows
    (lowered, with a warning, when the corpus has fewer).

    Raises:
        RuntimeError: EasyEdit did not write the file where its layout says (its layout changed).
    """
    n = int(hparams.mom2_n_samples)
    identity = stats_identity(model, tok, settings, n, hparams.mom2_dtype, chunk_index)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(settings.root).expanduser() / key
    folder.mkdir(parents=True, exist_ok=True)
    ident_file = folder / "identity.json"
    if not ident_file.exists():
        ident_file.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    out.append(patches.keyed_stats_dir(hparams, str(folder), key))
    out.append(patches.fresh_cov_cache(module_name))
    module = patches.easyedit_module(module_name)
    report = StatsReport(corpus=settings.corpus, split="stats", seq_len=settings.seq_len, samples=n,
                         tokens=n * settings.seq_len, key=key, stats_dir=portable(folder))
    built: dict[str, CorpusWindows] = {}

    def windows() -> CorpusWindows:
        if "ds" not in built:
            ds = corpus_windows(settings.corpus, tok, settings.seq_len, n)
            if len(ds) < n:
                raise ValueError(f"corpus {settings.corpus!r} yields only {len(ds)} windows of {settings.seq_len} "
                                 f"tokens; set mom2_n_samples <= {len(ds)}")
            built["ds"] = ds
        return built["ds"]

    description = f"{n} windows x {settings.seq_len} tokens of {settings.corpus!r} (split 'stats')"
    with patches.layer_stats_from_corpus(windows, description, out) as counter:
        for layer in hparams.layers:
            layer_name = hparams.rewrite_module_tmp.format(layer)
            file = easyedit_stats_file(folder, model, hparams.mom2_dataset, layer_name, hparams.mom2_dtype, n)
            report.layers[layer_name] = "cached" if file.exists() else "computed"
            module.get_cov(model, tok, layer_name, hparams.mom2_dataset, n, hparams.mom2_dtype, hparams=hparams)
            if not file.exists():
                raise RuntimeError(f"EasyEdit's layer_stats did not write {file}: its cache layout differs from the "
                                   "one this adapter knows (easyeditor/models/rome/layer_stats.py)")
        report.datasets_built = counter["datasets_built"]
    logger.info("EasyEdit statistics %s: %s", key, report.layers)
    return report


def prepare_projection(model: torch.nn.Module, tok: Any, hparams: Any, report: StatsReport,
                       out: list[patches.Patch]) -> None:
    """AlphaEdit's null-space projection P for this model/layer set: loaded from the keyed folder or computed with
    AlphaEdit's ``get_project`` (needs ``COV_CACHE`` filled by :func:`prepare_statistics`), then set (patch 11)."""
    from safetensors.torch import load_file, save_file

    spec = {"layers": list(hparams.layers), "rewrite_module_tmp": hparams.rewrite_module_tmp,
            "nullspace_threshold": float(hparams.nullspace_threshold), "stats_key": report.key}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(hparams.stats_dir)
    path = folder / f"alphaedit_P-{digest}.safetensors"
    source = "in process"
    if str(path) in _PROJECTIONS:
        projection = _PROJECTIONS[str(path)]
    elif path.exists():
        projection, source = load_file(str(path))["P"], "file"
    else:
        start = time.perf_counter()
        module = patches.easyedit_module(patches.ALPHAEDIT_MODULE)
        projection = torch.stack([module.get_project(model, tok, layer, hparams).float().cpu()
                                  for layer in hparams.layers])
        save_file({"P": projection.contiguous()}, str(path), metadata={"spec": json.dumps(spec, sort_keys=True)})
        source = "computed"
        logger.info("AlphaEdit P for layers %s computed in %.1f s", hparams.layers, time.perf_counter() - start)
    _PROJECTIONS[str(path)] = projection
    # rank of a projection matrix = its trace
    kept = {layer: int(round(float(projection[i].diagonal().sum()))) for i, layer in enumerate(hparams.layers)}
    out.append(patches.alphaedit_projection(hparams, projection, str(path), kept))
    report.projection = {"file": path.name, "source": source, "kept_dims": kept,
                         "dims": int(projection.shape[-1])}
