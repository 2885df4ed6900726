"""The unedited model's evaluation, computed once per (model, records, evaluation settings) and kept on disk.

Measuring the unedited model is most of a short run's time, and it is the same for every method and every setting
of a sweep. :func:`before_evaluation` returns ``job.measure``'s result for the unedited model and the reference
next-token log-probs (for the KL of the edited model), from the cache when an entry with the same key exists, else
computed and stored.

Key (:func:`evaluation_identity`, hashed): the model's weights fingerprint (``curvature.model_fingerprint``: every
parameter's name, shape, dtype and a strided sample of its values), the device type, the tokenizer's content hash,
the content hash of the requests, of the Factbook probes and of the held-out token ids, the evaluation settings
(templates, n_probes, held-out sizes, eval batch size, EasyEdit metrics flag and the hparams fields EasyEdit's
evaluator reads, lm-eval tasks) and the package version. Anything else that changes (the edit method, gamma, the
layers) does not touch the key, so a sweep measures the unedited model once.

Files, in ``cache_dir`` (default ``$CRISPEDIT_BEFORE_EVAL_CACHE``, else ``<crispedit cache root>/before_eval``, i.e.
``~/.cache/crispedit_easyedit/before_eval``): ``<key>.safetensors`` holds the reference log-probs (one tensor per
held-out batch; a SmolLM2 run with 16 x 256 held-out tokens is about 0.8 GB), ``<key>.json`` the metrics (with the
private entries the "after" measurement needs: per-request teacher-forced predictions, greedy answers) and the
identity. Nothing is pickled. A file that cannot be read is reported with a warning and computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__

logger = logging.getLogger(__name__)

CACHE_ENV = "CRISPEDIT_BEFORE_EVAL_CACHE"
FORMAT_VERSION = 1
EASYEDIT_EVAL_FIELDS = ("max_length", "use_chat_template", "evaluation_type", "alg_name")
"""The hparams fields EasyEdit's evaluator reads (part of the key only when EasyEdit metrics are on)."""


@dataclass
class BeforeEvaluation:
    """The unedited model's measurement.

    Attributes:
        metrics: ``job.measure``'s result for the unedited model (private ``_`` entries included).
        reference: its next-token log-probs on the held-out batches (``evaluation.ReferenceLogprobs``).
        cache_hit: whether both came from the cache.
        key: the cache key (None when the cache is off).
    """

    metrics: dict[str, Any]
    reference: Any
    cache_hit: bool
    key: str | None


def default_cache_dir() -> Path:
    """``$CRISPEDIT_BEFORE_EVAL_CACHE``, else ``<crispedit cache root>/before_eval`` (see ``models.cache_root``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from .models import cache_root

    return cache_root() / "before_eval"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            tensor = batch[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def evaluation_identity(model, tok, probes, cfg, hparams) -> dict[str, Any]:
    """Everything that determines the unedited model's measurement (see the module docstring).

    Args:
        probes: ``job.Probes`` (requests, Factbook probes, held-out batches of (n, T) token ids, templates).
        cfg: ``job.JobConfig`` (its evaluation fields are read).
        hparams: CrispEditHyperParams (only the fields EasyEdit's evaluator reads, when it runs).
    """
    from ..curvature import model_fingerprint, tokenizer_fingerprint

    fingerprint = model_fingerprint(model)
    settings = {"templates": list(probes.templates) if probes.templates else None, "n_probes": cfg.n_probes,
                "heldout_sequences": cfg.heldout_sequences, "heldout_seq_len": cfg.heldout_seq_len,
                "eval_batch_size": cfg.eval_batch_size, "easyedit_metrics": bool(cfg.easyedit_metrics),
                "lm_eval_tasks": list(cfg.lm_eval_tasks)}
    if cfg.easyedit_metrics:
        values = hparams.to_dict(redact_secrets=True)
        settings["easyedit_hparams"] = {k: values.get(k) for k in EASYEDIT_EVAL_FIELDS}
    return {
        "format": FORMAT_VERSION,
        "package_version": __version__,
        "libraries": _library_versions(),  # generation and EasyEdit's evaluator differ across versions
        "model_weights_sha256": fingerprint["weights_sha256"],
        "device_type": next(model.parameters()).device.type,
        "tokenizer_sha256": tokenizer_fingerprint(tok),
        "records_sha256": _digest(probes.requests),
        "probes_sha256": _digest([dataclasses.asdict(p) for p in probes.probes]),
        "heldout_sha256": _tensor_digest(probes.heldout),
        "settings": settings,
    }


def _library_versions() -> dict[str, str | None]:
    """Versions of the libraries the measurement runs through (None for one that is not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "transformers", "easyeditor"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:  # a GitHub-main checkout on the path is not an installed distribution: name its generation
        from ..easyedit.registry import generation

        versions["easyeditor_generation"] = generation()
    except Exception:  # noqa: BLE001 - no EasyEdit at all
        versions["easyeditor_generation"] = None
    return versions


def cache_key(identity: Mapping[str, Any]) -> str:
    """24 hex digits of the sha256 of the identity's JSON."""
    return _digest(identity)[:24]


def _reference_tensors(reference) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    for b, logprobs in enumerate(reference.logprobs):
        tensors[f"logprobs.{b}"] = logprobs
        if reference.top_k is not None:
            tensors[f"indices.{b}"] = reference.indices[b]
            tensors[f"rest.{b}"] = reference.rest_logprob[b]
    return tensors, {"top_k": reference.top_k, "counts": list(reference.counts)}


def _reference_from(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]):
    from .evaluation import ReferenceLogprobs

    n = len(meta["counts"])
    ref = ReferenceLogprobs(top_k=meta["top_k"], counts=list(meta["counts"]))
    ref.logprobs = [tensors[f"logprobs.{b}"] for b in range(n)]
    if ref.top_k is not None:
        ref.indices = [tensors[f"indices.{b}"] for b in range(n)]
        ref.rest_logprob = [tensors[f"rest.{b}"] for b in range(n)]
    return ref


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"


def load(cache_dir: str | os.PathLike, key: str) -> tuple[dict[str, Any], Any] | None:
    """(metrics, reference) of the entry ``key``, or None when there is none or it cannot be read (a warning)."""
    from ..curvature import CacheError, read_safetensors

    json_path, tensor_path = _paths(Path(cache_dir).expanduser(), key)
    if not json_path.is_file() or not tensor_path.is_file():
        return None
    try:
        entry = json.loads(json_path.read_text(encoding="utf-8"))
        tensors, meta = read_safetensors(tensor_path, "before-evaluation reference log-probs")
        if entry.get("key") != key or meta.get("key") != key:
            raise ValueError(f"the files hold key {entry.get('key')!r} / {meta.get('key')!r}, expected {key!r}")
        return entry["metrics"], _reference_from(tensors, meta)
    except (OSError, ValueError, KeyError, CacheError) as exc:
        logger.warning("before-evaluation cache entry %s cannot be used (%s: %s); measuring again", json_path,
                       type(exc).__name__, exc)
        return None


def store(cache_dir: str | os.PathLike, key: str, identity: Mapping[str, Any], metrics: Mapping[str, Any],
          reference) -> bool:
    """Write an entry (tensors first, then the JSON that marks it complete, each atomically). Returns whether it was
    written; a failure to write is a warning, not an error (the run has its result)."""
    from ..curvature import write_safetensors

    folder = Path(cache_dir).expanduser()
    json_path, tensor_path = _paths(folder, key)
    try:
        text = json.dumps({"key": key, "identity": dict(identity), "metrics": metrics}, sort_keys=True)
        tensors, meta = _reference_tensors(reference)
        write_safetensors(tensor_path, tensors, dict(meta, key=key))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, json_path)
    except (OSError, TypeError, ValueError) as exc:
        logger.warning("before-evaluation not cached in %s (%s: %s)", folder, type(exc).__name__, exc)
        return False
    logger.info("cached the before-evaluation as %s", json_path)
    return True


def before_evaluation(model, tok, probes, cfg, hparams, timer=None, use_cache: bool = True,
                      cache_dir: str | os.PathLike | None = None, label: str = "before") -> BeforeEvaluation:
    """The unedited model's ``job.measure`` result and reference log-probs, from the cache or measured (and stored).

    Args:
        probes, cfg, hparams: as for ``job.measure``.
        timer: a ``job.PhaseTimer``; a hit is timed as ``"evaluate {label}: cache hit"``.
        use_cache: False measures and stores nothing.
        cache_dir: the cache folder (default :func:`default_cache_dir`).
    """
    from .job import PhaseTimer, measure

    timer = timer or PhaseTimer()
    key = identity = None
    if use_cache:
        folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        with timer.phase(f"evaluate {label}: cache lookup"):
            identity = evaluation_identity(model, tok, probes, cfg, hparams)
            key = cache_key(identity)
            found = load(folder, key)
        if found is not None:
            logger.info("before-evaluation from the cache (%s in %s)", key, folder)
            return BeforeEvaluation(found[0], found[1], True, key)
    metrics = measure(model, tok, probes, cfg, hparams, timer=timer, label=label, record_reference=True)
    reference = metrics.pop("_reference")
    if use_cache:
        store(folder, key, identity, metrics, reference)
    return BeforeEvaluation(metrics, reference, False, key)
