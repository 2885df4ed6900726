"""CrispEdit and the methods that share its editing loop, behind the harness signature (``base.EditMethod``).

All five run :func:`crispedit_easyedit.editing.apply_crispedit` on the same edit weights with the same optimiser,
loss, data order and step budget (the CrispEdit hparams YAML, ``config["hparams"]``, with ``config["overrides"]``);
they differ only in what is projected:

* ``crispedit``: the K-FAC projector (``projection_mode`` both / gradient / update through the overrides);
* ``crispedit-seq``: the same, called once per chunk by the harness; the sequence lives in the model's edit state
  (:mod:`crispedit_easyedit.state`), so every later chunk is edited with the statistics of all earlier ones
  (Algorithm 2). A call after the first that does not continue the sequence is an error;
* ``ft``: no projection (``projection_mode: none``): plain fine-tuning of the same layers;
* ``ft-seq``: ``ft`` chunk by chunk on the same model (sequential fine-tuning);
* ``adam-nscl``: the activation-covariance projector A (x) I (``curvature_factors: activation``), Adam-NSCL's
  input-side nullspace, with the same energy threshold.

Each method fixes the settings that define it (``ft``: projection_mode none; ``adam-nscl``: curvature_factors
activation); an override that contradicts them is an error naming the method to use instead. The harness's
``seed`` is the edit's seed unless the overrides set one.

The receipt holds ``method``, ``settings`` (every resolved hparams field), ``seconds`` (``curvature``, ``edit``,
``total``), ``n_requests``, ``chunk_index`` and ``report`` (``EditReport.to_dict()``: steps, losses, kept fraction,
predicted capability-loss increase and leak per layer) with its one-line ``summary``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...editing import apply_crispedit
from ..job import load_hparams
from .base import MethodOutcome, register_method, resolve_path

logger = logging.getLogger(__name__)

FIXED_SETTINGS: dict[str, dict[str, Any]] = {
    "crispedit": {},
    "crispedit-seq": {},
    "ft": {"projection_mode": "none"},
    "ft-seq": {"projection_mode": "none"},
    "adam-nscl": {"curvature_factors": "activation"},
}
"""The hparams each method fixes (what makes it that method)."""

SEQUENTIAL = ("crispedit-seq", "ft-seq")


def method_hparams(name: str, config: Mapping[str, Any]):
    """CrispEditHyperParams for method ``name``: the YAML ``config["hparams"]`` (default: the SmolLM2 file), the
    overrides, the harness's seed and device, and the method's fixed settings.

    Raises:
        ValueError: an override contradicts the method's fixed settings (naming the method to use instead).
        FileNotFoundError: the hparams file does not exist.
    """
    overrides = dict(config.get("overrides") or {})
    for key, value in FIXED_SETTINGS[name].items():
        if key in overrides and overrides[key] != value:
            other = "crispedit" if key == "projection_mode" else "crispedit (curvature_factors: kfac)"
            raise ValueError(f"method {name!r} fixes {key}={value!r}, got the override {key}={overrides[key]!r}; "
                             f"use method {other!r} for that")
        overrides[key] = value
    if config.get("seed") is not None:
        overrides.setdefault("seed", int(config["seed"]))
    path = config.get("hparams")
    return load_hparams(str(resolve_path(path)) if path else None, overrides, config.get("device"))


def _run(name: str, model: torch.nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]],
         config: Mapping[str, Any]) -> MethodOutcome:
    hparams = method_hparams(name, config)
    chunk_index = int(config.get("chunk_index", 0))
    started = time.perf_counter()
    report = apply_crispedit(model, tok, list(requests), hparams, progress=bool(config.get("progress", False)))
    total = time.perf_counter() - started
    if name in SEQUENTIAL and chunk_index > 0 and report.weights_status != "continue":
        raise RuntimeError(f"{name} chunk {chunk_index}: the model's edit state says {report.weights_status!r}, "
                           "not 'continue': the weights changed between chunks, so the sequence is broken")
    receipt = {
        "method": name,
        "settings": hparams.to_dict(redact_secrets=True),
        "seconds": {"curvature": round(report.seconds_curvature, 3), "edit": round(report.seconds_editing, 3),
                    "total": round(total, 3)},
        "n_requests": len(requests),
        "chunk_index": chunk_index,
        "report": report.to_dict(),
        "summary": report.summary(),
    }
    return MethodOutcome(model=model, receipt=receipt)


def _register(name: str) -> None:
    def method(model, tok, requests, config):
        return _run(name, model, tok, requests, config)

    method.__name__ = name.replace("-", "_")
    method.__doc__ = f"The {name!r} method (see the module docstring)."
    register_method(name)(method)


for _name in FIXED_SETTINGS:
    _register(_name)
