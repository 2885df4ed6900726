"""EasyEdit's own MEMIT, AlphaEdit, UltraEdit, FT and LoRA (GitHub main) as baselines of the side-by-side harness.

Registered methods: ``easyedit-memit``, ``easyedit-alphaedit``, ``easyedit-ultraedit``, ``easyedit-ft``,
``easyedit-lora``. Each call runs EasyEdit's real code, ``BaseEditor.from_hparams(hparams)`` then
``batch_edit(..., sequential_edit=True)``, on the model object it is given (passed as a ``ModelPair``), so the edit
stays in the model and the harness evaluates it. EasyEdit is not needed to import this module: the checkout comes
from ``config["easyedit_path"]`` or ``$EASYEDIT_PATH`` at call time (``easyedit_locate``), and a missing checkout is
a clear :class:`~.easyedit_locate.EasyEditUnavailable` error.

Config keys (all optional): ``hparams`` (an EasyEdit-layout YAML; default
``hparams/{MEMIT|AlphaEdit|UltraEdit|FT|LoRA}/{model}.yaml`` of this repository, ``{model}`` the last part of the
model's ``_name_or_path``), ``overrides`` (a mapping of hparams fields), ``easyedit_path``, ``stats_dir``,
``corpus``, ``corpus_seq_len`` (see ``easyedit_stats``), and the harness's ``chunk_index`` / ``sequential``.

Sequential runs. The harness calls a method once per chunk on the same model with ``chunk_index`` 0, 1, 2, ...
``chunk_index == 0`` starts a fresh run: AlphaEdit's ``cache_c`` (the keys of all earlier edits, a module global) and
MEMIT/AlphaEdit's context templates are reset; later chunks keep them, so AlphaEdit protects every earlier chunk's
edits as in EasyEdit's own sequential editing. A later chunk of AlphaEdit on another model or layer set than the
run's chunk 0 is an error (its ``cache_c`` belongs to that run). Statistics are always the base model's (keyed at
chunk 0). UltraEdit's running normaliser is rebuilt by EasyEdit at every call (its executor never keeps it). LoRA's
adapter is merged into the weights after each call (``easyedit_patches`` 14), so each chunk trains a new adapter.

Receipt: ``method``, ``alg_name``, ``easyedit`` (``commit``, ``source``), ``hparams_path`` (repo-relative),
``hparams`` (every resolved value), ``seconds`` (``statistics``, ``edit``: EasyEdit's apply function,
``easyedit_eval``: ``batch_edit``'s own pre/post evaluation), ``n_requests``, ``chunk_index``, ``patches`` (each
``{name, detail}``), ``statistics`` (corpus, ``samples`` = windows, ``tokens``, per-layer ``computed``/``cached``,
AlphaEdit's projection) and ``easyedit_metrics`` (``batch_edit``'s mean pre/post teacher-forced rewrite accuracy).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import easyedit_patches as patches
from . import easyedit_stats as stats
from .base import MethodOutcome, register_method
from .easyedit_locate import EasyEditUnavailable, import_easyeditor

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class EasyEditMethod:
    """How one EasyEdit method is run.

    Attributes:
        method: the harness name.
        alg_name: the ``ALG_DICT`` key (and ``hparams.alg_name``).
        hparams_dir: the folder under ``hparams/`` of the default YAML.
        hparams_module: the module holding the hparams class; hparams_class: its name.
        main_module: the module whose globals hold MEMIT/AlphaEdit's caches (None for the others).
        needs_statistics: whether second-moment statistics are needed (MEMIT, AlphaEdit).
        needs_subject: whether every request needs a ``subject`` that occurs in its prompt.
    """

    method: str
    alg_name: str
    hparams_dir: str
    hparams_module: str
    hparams_class: str
    main_module: str | None = None
    needs_statistics: bool = False
    needs_subject: bool = False


METHODS: dict[str, EasyEditMethod] = {
    m.method: m for m in (
        EasyEditMethod("easyedit-memit", "MEMIT", "MEMIT", "easyeditor.models.memit.memit_hparams",
                       "MEMITHyperParams", "easyeditor.models.memit.memit_main", True, True),
        EasyEditMethod("easyedit-alphaedit", "AlphaEdit", "AlphaEdit", "easyeditor.models.alphaedit.AlphaEdit_hparams",
                       "AlphaEditHyperParams", patches.ALPHAEDIT_MODULE, True, True),
        EasyEditMethod("easyedit-ultraedit", "ULTRAEDIT", "UltraEdit", "easyeditor.models.ultraedit.ultraedit_hparams",
                       "UltraEditHyperParams"),
        EasyEditMethod("easyedit-ft", "FT", "FT", "easyeditor.models.ft.ft_hparams", "FTHyperParams"),
        EasyEditMethod("easyedit-lora", "LoRA", "LoRA", "easyeditor.models.lora.lora_hparams", "LoRAHyperParams"),
    )
}

# AlphaEdit's cache_c belongs to one run: (model, stats key, layers) of its chunk 0.
_ALPHAEDIT_RUN: dict[str, Any] = {"model": None, "identity": None}


# ---------------------------------------------------------------------------------------------------- hparams --
def default_hparams_path(spec: EasyEditMethod, model: torch.nn.Module) -> Path:
    """``hparams/{dir}/{model}.yaml`` in this repository, ``{model}`` the last part of ``_name_or_path`` compared
    case-insensitively (the offline SmolLM2's folder ``smollm2-135m-instruct`` finds ``SmolLM2-135M-Instruct.yaml``)."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/").rsplit("/")[-1]
    folder = REPO_ROOT / "hparams" / spec.hparams_dir
    candidates = sorted(p.stem for p in folder.glob("*.yaml"))
    for stem in candidates:
        if stem.lower() == name.lower():
            return folder / f"{stem}.yaml"
    raise ValueError(f"no default hparams for model {name!r} in {folder}; give config['hparams'] (an EasyEdit "
                     f"{spec.alg_name} YAML); shipped: {candidates}")


def repo_relative(path: Path) -> str:
    """``path`` relative to this repository when inside it, else with the home folder as ``~``."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return stats.portable(path.resolve())


def load_hparams(spec: EasyEditMethod, model: torch.nn.Module, config: Mapping[str, Any]) -> tuple[Any, Path]:
    """EasyEdit's hparams object from its YAML (EasyEdit's own ``from_hparams``), then ``config["overrides"]``.

    Raises:
        FileNotFoundError: the YAML does not exist. ValueError: an override names no field of the hparams class
            (the message lists the valid fields).
    """
    path = Path(config["hparams"]).expanduser() if config.get("hparams") else default_hparams_path(spec, model)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"hparams YAML {str(path)!r} for {spec.method} does not exist")
    cls = getattr(patches.easyedit_module(spec.hparams_module), spec.hparams_class)
    hparams = cls.from_hparams(str(path))
    overrides = config.get("overrides") or {}
    valid = {f.name for f in dataclasses.fields(hparams)}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(f"override {key!r} is not a field of {spec.hparams_class}; valid fields: {sorted(valid)}")
        setattr(hparams, key, value)
    return hparams, path


def resolved_values(hparams: Any) -> dict[str, Any]:
    """Every hparams field as JSON (the ModelPair as its name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(hparams):
        value = getattr(hparams, f.name)
        if f.name == "model_name" and not isinstance(value, str):
            value = getattr(value, "name", str(value))
        elif f.name in ("stats_dir", "P_loc") and isinstance(value, str):
            value = stats.portable(Path(value)) if Path(value).is_absolute() else value
        elif not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = repr(value)
        out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------------- requests --
def batch_edit_inputs(spec: EasyEditMethod, requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``batch_edit`` keyword arguments for the requests (prompts, target_new, ground_truth, and subject /
    rephrase_prompts when every request has one). Locality is left to the harness.

    Raises:
        ValueError: no requests; or a method that needs subjects and a request without one in its prompt.
    """
    if not requests:
        raise ValueError(f"{spec.method} needs at least one request")
    kwargs: dict[str, Any] = {"prompts": [r["prompt"] for r in requests],
                              "target_new": [r["target_new"] for r in requests],
                              "ground_truth": [r.get("ground_truth") for r in requests]}
    missing = [r.get("case_id", i) for i, r in enumerate(requests)
               if not r.get("subject") or r["subject"] not in r["prompt"]]
    if spec.needs_subject and missing:
        raise ValueError(f"{spec.method} needs a 'subject' that occurs in the prompt of every request; missing for "
                         f"case_id {missing}")
    if not missing:
        kwargs["subject"] = [r["subject"] for r in requests]
    if all(r.get("rephrase_prompt") for r in requests):
        kwargs["rephrase_prompts"] = [r["rephrase_prompt"] for r in requests]
    return kwargs


def _mean_rewrite(metrics: list[dict[str, Any]], phase: str) -> float | None:
    values = []
    for m in metrics:
        acc = (m.get(phase) or {}).get("rewrite_acc")
        if isinstance(acc, list) and acc:
            values.append(float(sum(acc) / len(acc)))
        elif isinstance(acc, (int, float)):
            values.append(float(acc))
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------------ a call --
def _chunk_index(config: Mapping[str, Any]) -> int:
    value = config.get("chunk_index", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"chunk_index must be a non-negative integer, got {value!r}")
    return value


def _alphaedit_run_check(model: torch.nn.Module, identity: tuple[Any, ...], chunk_index: int) -> None:
    if chunk_index == 0:
        _ALPHAEDIT_RUN["model"], _ALPHAEDIT_RUN["identity"] = weakref.ref(model), identity
        return
    ref = _ALPHAEDIT_RUN["model"]
    if ref is None or ref() is not model or _ALPHAEDIT_RUN["identity"] != identity:
        raise ValueError(f"easyedit-alphaedit chunk_index {chunk_index}: AlphaEdit's cache_c belongs to another run "
                         "(no chunk_index 0 on this model with these layers/statistics in this process); start the "
                         "run with chunk_index 0")


def run_easyedit_method(spec: EasyEditMethod, model: torch.nn.Module, tok: Any,
                        requests: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> MethodOutcome:
    """Run one EasyEdit method on ``model`` in place (see the module docstring); returns the outcome with receipt."""
    chunk_index = _chunk_index(config)
    edit_kwargs = batch_edit_inputs(spec, requests)
    info = import_easyeditor(config)
    applied: list[patches.Patch] = list(patches.multimodal_stub_record(info.stubbed))
    hparams, path = load_hparams(spec, model, config)
    if hparams.alg_name != spec.alg_name:
        raise ValueError(f"{spec.method} needs an hparams YAML with alg_name {spec.alg_name!r}, "
                         f"{repo_relative(path)} has {hparams.alg_name!r}")
    seconds = {"statistics": 0.0, "edit": 0.0, "easyedit_eval": 0.0}

    applied.append(patches.device_from_model(hparams, model))
    pair, record = patches.name_for_sniffing(model, tok)
    applied.append(record)
    hparams.model_name = pair
    for maybe in (patches.tied_lm_head(hparams, model), patches.lora_type_lora(hparams),
                  patches.ultraedit_full_precision(hparams)):
        if maybe is not None:
            applied.append(maybe)
    if spec.alg_name == "ULTRAEDIT":
        applied.append(patches.ultraedit_batch_sizes(hparams, len(requests)))
    else:
        applied.append(patches.one_call_per_chunk(hparams, len(requests)))

    with patches.name_or_path_for_stats(model, pair.name, applied):
        report, metrics = _statistics_and_edit(spec, model, tok, hparams, pair, config, chunk_index, edit_kwargs,
                                               seconds, applied)
    model.eval()
    receipt = {
        "method": spec.method,
        "alg_name": spec.alg_name,
        "easyedit": {"commit": info.commit, "source": info.source},
        "hparams_path": repo_relative(path),
        "hparams": resolved_values(hparams),
        "seconds": seconds,
        "n_requests": len(requests),
        "chunk_index": chunk_index,
        "sequential": bool(config.get("sequential", False)),
        "patches": [p.as_dict() for p in applied],
        "statistics": None if report is None else report.as_dict(),
        "easyedit_metrics": {"pre_rewrite_acc": _mean_rewrite(metrics, "pre"),
                             "post_rewrite_acc": _mean_rewrite(metrics, "post")},
    }
    logger.info("%s: %d requests, chunk %d, %.1f s statistics, %.1f s edit", spec.method, len(requests),
                chunk_index, seconds["statistics"], seconds["edit"])
    return MethodOutcome(model=model, receipt=receipt)


def _statistics_and_edit(spec: EasyEditMethod, model: torch.nn.Module, tok: Any, hparams: Any, pair: Any,
                         config: Mapping[str, Any], chunk_index: int, edit_kwargs: dict[str, Any],
                         seconds: dict[str, float], applied: list[patches.Patch]) -> tuple[Any, list[dict]]:
    """The statistics phase (MEMIT/AlphaEdit) and EasyEdit's ``batch_edit``; returns (stats report, its metrics)."""
    report = None
    if spec.needs_statistics:
        start = time.perf_counter()
        settings = stats.StatsSettings.from_config(config)
        report = stats.prepare_statistics(spec.main_module, model, tok, hparams, settings, chunk_index, applied)
        if spec.alg_name == "AlphaEdit":
            stats.prepare_projection(model, tok, hparams, report, applied)
            _alphaedit_run_check(model, (report.key, tuple(hparams.layers), hparams.rewrite_module_tmp), chunk_index)
            applied.append(patches.alphaedit_cache_c(reset=chunk_index == 0))
        if chunk_index == 0:
            applied.append(patches.fresh_context_templates(spec.main_module))
        seconds["statistics"] = time.perf_counter() - start

    from easyeditor import BaseEditor  # noqa: PLC0415 - EasyEdit is imported at call time only

    edited: Any = model
    with patches.restore_model_flags(model, applied), \
            patches.padding_side_as_easyedit(tok, spec.alg_name, pair.name, applied):
        log = patches.editor_logger()
        before = list(log.handlers)
        editor = BaseEditor.from_hparams(hparams)
        record = patches.easyedit_log_handlers_once(log, before)
        if record is not None:
            applied.append(record)
        apply_algo = editor.apply_algo

        def timed_apply(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return apply_algo(*args, **kwargs)
            finally:
                seconds["edit"] += time.perf_counter() - begin

        editor.apply_algo = timed_apply
        begin = time.perf_counter()
        metrics, edited, _ = editor.batch_edit(sequential_edit=True, verbose=False, **edit_kwargs)
        seconds["easyedit_eval"] = time.perf_counter() - begin - seconds["edit"]
        if spec.alg_name == "LoRA":
            edited, record = patches.lora_merge(edited, model)
            if record is not None:
                applied.append(record)
    if edited is not model:
        raise RuntimeError(f"{spec.method}: EasyEdit returned another model object than the one it was given")
    return report, metrics


def _make(spec: EasyEditMethod) -> Any:
    def method(model: torch.nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]],
               config: Mapping[str, Any]) -> MethodOutcome:
        return run_easyedit_method(spec, model, tok, requests, config)

    method.__name__ = spec.method.replace("-", "_")
    method.__doc__ = f"EasyEdit's own {spec.alg_name} (GitHub main) on the harness's model; see easyedit_main."
    return register_method(spec.method)(method)


easyedit_memit = _make(METHODS["easyedit-memit"])
easyedit_alphaedit = _make(METHODS["easyedit-alphaedit"])
easyedit_ultraedit = _make(METHODS["easyedit-ultraedit"])
easyedit_ft = _make(METHODS["easyedit-ft"])
easyedit_lora = _make(METHODS["easyedit-lora"])

__all__ = ["METHODS", "EasyEditMethod", "EasyEditUnavailable", "run_easyedit_method", "easyedit_memit",
           "easyedit_alphaedit", "easyedit_ultraedit", "easyedit_ft", "easyedit_lora"]
