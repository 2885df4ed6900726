"""EasyEdit's own teacher-forced metrics (``compute_edit_quality``), averaged over requests, for both generations.

``easyedit_metrics`` calls ``easyeditor.evaluate.compute_edit_quality`` once per request, exactly as EasyEdit's
``BaseEditor.edit`` does, and averages the results the way EasyEdit's summaries do (mean over requests of each
request's mean):

* ``rewrite_acc``: token accuracy of ``target_new`` after the edit prompt (EasyEdit ``token_em``: the joined text
  ``prompt + " " + target`` is tokenised, argmax predictions at the target positions are compared with the target
  tokens);
* ``rephrase_acc``: the same after ``rephrase_prompt`` (requests without one are left out);
* ``locality[key]``: EasyEdit's locality, the share of argmax tokens at the positions of the locality answer that are
  unchanged between the unedited and the edited model. EasyEdit computes it from the outputs of both models, so it
  needs ``pre=`` (the result of ``easyedit_metrics`` on the unedited model, same requests); without it ``locality``
  is empty;
* ``portability[key]``: EasyEdit's portability accuracy, when requests carry ``portability`` fields.

Both EasyEdit generations are supported: the PyPI ``easyeditor==0.0.1.dev0`` (through
``crispedit_easyedit.easyedit.compat.prepare_easyeditor``, which also makes its hard-coded CUDA devices fall back to
the CPU) and GitHub main (whose ``compute_edit_quality`` adds ``metric_meta``, kept in ``per_request``).
``easyeditor`` is imported inside the function, never at import time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

REQUIRED_KEYS: tuple[str, ...] = ("prompt", "target_new", "ground_truth")
"""Keys EasyEdit's ``compute_edit_quality`` reads from every request."""


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tensors inside EasyEdit's results -> Python numbers and lists (JSON-ready)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _mean_of(value: Any) -> float:
    """A request's score: the mean of a list of per-prompt scores, or the number itself."""
    arr = np.asarray(value, dtype=float)
    if arr.size == 0:
        raise ValueError("EasyEdit returned an empty score list")
    return float(arr.mean())


def _agreement(post: Any, pre: Any) -> float:
    """EasyEdit's locality of one prompt: mean equality of the argmax tokens (or equality of two scalars)."""
    if isinstance(post, list) and isinstance(pre, list):
        if len(post) != len(pre):
            raise ValueError(f"locality outputs have {len(post)} tokens after and {len(pre)} before the edit")
        return float(np.mean(np.equal(post, pre)))
    return float(post == pre)


def _evaluator_device(model: torch.nn.Module, generation: str) -> Any:
    """The model's device as EasyEdit's evaluators take it (PyPI formats ``f"cuda:{device}"``)."""
    dev = next(model.parameters()).device
    if generation == "pypi" and dev.type == "cuda":
        return dev.index if dev.index is not None else torch.cuda.current_device()
    return dev


def _model_name(hparams: Any, model: torch.nn.Module, model_name: Any) -> Any:
    """What EasyEdit's evaluators call ``model_name.lower()`` on (only 't5' in it changes the metric)."""
    if model_name is not None:
        return model_name
    name = getattr(hparams, "model_name", None)
    if isinstance(name, str) or callable(getattr(name, "lower", None)):
        return name
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "model"


def easyedit_metrics(
    model: torch.nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    hparams: Any,
    model_name: Any = None,
    pre: Mapping[str, Any] | None = None,
    eval_metric: str = "token_em",
    device: Any = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run EasyEdit's ``compute_edit_quality`` on every request and average the metrics.

    Args:
        model: The model to evaluate (edited, or unedited to produce ``pre``).
        tok: Its tokenizer.
        requests: EasyEdit requests (``prompt``, ``target_new``, ``ground_truth``, optional ``rephrase_prompt``,
            ``locality``, ``portability``).
        hparams: Hyperparameters as EasyEdit passes them to its evaluators (``max_length``, ``device``,
            ``alg_name``; GitHub main also reads ``evaluation_type`` and ``use_chat_template`` when present), e.g. a
            ``CrispEditHyperParams``.
        model_name: What EasyEdit's evaluators see as ``model_name`` (a string, or a ``ModelPair``); default
            ``hparams.model_name``, else the model's config name.
        pre: The result of ``easyedit_metrics`` for the unedited model on the same requests; needed for
            ``locality`` (EasyEdit's locality compares outputs before and after the edit).
        eval_metric: EasyEdit's ``eval_metric`` (``"token_em"`` default; ``"ppl"`` gives ``rewrite_ppl``).
        device: The ``device`` argument EasyEdit's evaluators get; None (default) = where the model's parameters
            are, in the form the generation expects (GitHub main: the ``torch.device``; PyPI: the CUDA index, which
            ``prepare_easyeditor`` maps to the CPU on machines without CUDA). ``hparams.device`` is not used, so
            an integer device in the hparams does not send CPU inputs to CUDA.
        show_progress: Show a tqdm bar over requests.

    Returns:
        ``{"generation", "eval_metric", "n_requests", "rewrite_acc", "rephrase_acc", "n_rephrase", "locality":
        {key: acc}, "portability": {key: acc}, "per_request": [EasyEdit's result dict per request]}``;
        ``rewrite_acc`` is None for ``eval_metric="ppl"`` (then ``rewrite_ppl``/``rephrase_ppl`` are given),
        ``rephrase_acc`` None when no request has a rephrase.

    Raises:
        ModuleNotFoundError: EasyEdit is not installed.
        KeyError: A request misses a key EasyEdit needs.
        ValueError: ``pre`` does not match the requests.
    """
    from .compat import prepare_easyeditor_for_text

    if not requests:
        raise ValueError("easyedit_metrics needs at least one request")
    for i, r in enumerate(requests):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise KeyError(f"request {i} lacks {missing}; EasyEdit's compute_edit_quality needs {list(REQUIRED_KEYS)}")
    if pre is not None and len(pre.get("per_request", [])) != len(requests):
        raise ValueError(f"pre holds {len(pre.get('per_request', []))} requests but {len(requests)} were given; "
                         "pass the result of easyedit_metrics on the unedited model with the same requests")

    generation = prepare_easyeditor_for_text()
    compute_edit_quality = importlib.import_module("easyeditor.evaluate.evaluate").compute_edit_quality
    name = _model_name(hparams, model, model_name)
    if device is None:
        device = _evaluator_device(model, generation)

    was_training = model.training
    model.eval()
    per_request: list[dict[str, Any]] = []
    try:
        for record in tqdm(requests, desc="EasyEdit metrics", disable=not show_progress, leave=False):
            with torch.no_grad():
                ret = compute_edit_quality(model, name, hparams, tok, dict(record), device, eval_metric=eval_metric)
            per_request.append(_plain(ret))
    finally:
        model.train(was_training)

    def average(key: str) -> tuple[float | None, int]:
        scores = [_mean_of(r[key]) for r in per_request if key in r]
        return (float(np.mean(scores)) if scores else None), len(scores)

    out: dict[str, Any] = {"generation": generation, "eval_metric": eval_metric, "n_requests": len(requests)}
    out["rewrite_acc"], _ = average("rewrite_acc")
    out["rephrase_acc"], out["n_rephrase"] = average("rephrase_acc")
    if eval_metric == "ppl":
        out["rewrite_ppl"], _ = average("rewrite_ppl")
        out["rephrase_ppl"], _ = average("rephrase_ppl")

    locality: dict[str, list[float]] = {}
    if pre is not None:
        for i, (post_r, pre_r) in enumerate(zip(per_request, pre["per_request"])):
            for out_key, post_out in (post_r.get("locality") or {}).items():
                if not out_key.endswith("_output"):
                    continue
                pre_out = (pre_r.get("locality") or {}).get(out_key)
                if pre_out is None or len(pre_out) != len(post_out):
                    raise ValueError(f"request {i}: locality {out_key!r} is missing or differs in pre; pass the "
                                     "result of easyedit_metrics on the unedited model with the same requests")
                per_prompt = [_agreement(a, b) for a, b in zip(post_out, pre_out)]
                locality.setdefault(out_key[: -len("_output")], []).append(float(np.mean(per_prompt)))
    out["locality"] = {k: float(np.mean(v)) for k, v in locality.items()}

    portability: dict[str, list[float]] = {}
    for r in per_request:
        for key, value in (r.get("portability") or {}).items():
            if key.endswith("_acc"):
                portability.setdefault(key[: -len("_acc")], []).append(_mean_of(value))
    out["portability"] = {k: float(np.mean(v)) for k, v in portability.items()}
    out["per_request"] = per_request
    return out
