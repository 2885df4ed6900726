"""Register CrispEdit with EasyEdit (both generations), explicitly and idempotently.

EasyEdit has no plugin API; a method is available to ``BaseEditor`` when

* ``ALG_DICT[hparams.alg_name]`` holds its apply function. ``ALG_DICT`` is a plain dict in
  ``easyeditor/util/alg_dict.py`` that ``editors/editor.py`` star-imports (the same object), so it is mutated in
  place. It is reached through ``importlib.import_module("easyeditor.util.alg_dict")``: the statement
  ``import easyeditor.util.alg_dict`` fails because ``easyeditor/__init__``'s star-imports shadow the attribute
  ``easyeditor.util``.
* ``BatchEditor.is_batchable_method(alg_name)`` is true, for ``batch_edit`` (and, on GitHub main, for ``edit`` with a
  ``batch_size`` other than 1). It is a hard-coded chain of comparisons, so the staticmethod is wrapped once; the
  wrapper is marked, and a second ``register()`` does not wrap it again.

Usage:
    >>> from crispedit_easyedit.easyedit import register
    >>> register()  # doctest: +SKIP
    'pypi'
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import Any, Callable

from . import compat

logger = logging.getLogger(__name__)

ALG_NAME = "CrispEdit"
_WRAPPED_MARK = "__crispedit_batchable_wrapper__"

ApplyFn = Callable[..., Any]

_state: dict[str, Any] = {"registered": None}  # the apply function this module last put into ALG_DICT


def generation() -> compat.Generation | None:
    """The installed EasyEdit generation, ``"pypi"`` or ``"github-main"`` (None if absent); never imports it."""
    return compat.detect_generation()


def _lazy_apply(model: Any, tok: Any, requests: list[dict], hparams: Any, copy: bool = False,
                return_orig_weights: bool = False, keep_original_weight: bool = False,
                **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """EasyEdit entry point that imports ``crispedit_easyedit.easyedit.apply`` on first use.

    Registered when that module cannot be imported at registration time (so that registration never fails for
    it); the signature is EasyEdit's apply contract.
    """
    from .apply import apply_crispedit_to_model

    return apply_crispedit_to_model(model, tok, requests, hparams, copy=copy,
                                    return_orig_weights=return_orig_weights,
                                    keep_original_weight=keep_original_weight, **kwargs)


def default_apply_fn() -> ApplyFn:
    """``apply_crispedit_to_model`` from ``crispedit_easyedit.easyedit.apply``, or a lazy importer if it is missing."""
    try:
        from .apply import apply_crispedit_to_model
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.apply":
            raise
        logger.debug("crispedit_easyedit.easyedit.apply is not available yet; registering a lazy entry point")
        return _lazy_apply
    return apply_crispedit_to_model


def _alg_dict() -> dict[str, Any]:
    return importlib.import_module("easyeditor.util.alg_dict").ALG_DICT


def _batch_editor() -> type:
    return importlib.import_module("easyeditor.editors.batch_editor").BatchEditor


def _wrap_batchable() -> None:
    batch_editor = _batch_editor()
    current = batch_editor.__dict__["is_batchable_method"]
    func = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(func, _WRAPPED_MARK, False):
        return
    original = func

    @functools.wraps(original)
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or bool(original(alg_name))

    setattr(is_batchable_method, _WRAPPED_MARK, True)
    batch_editor.is_batchable_method = staticmethod(is_batchable_method)


def register(apply_fn: ApplyFn | None = None, neutralise_multimodal: bool | None = None) -> compat.Generation:
    """Make ``alg_name: CrispEdit`` usable by EasyEdit's ``BaseEditor`` (``edit``, ``batch_edit``); idempotent.

    Args:
        apply_fn: the apply function to register (EasyEdit's contract ``fn(model, tok, requests, hparams, copy=False,
            return_orig_weights=False, keep_original_weight=False, **kwargs) -> (model, weights_copy)``). Default:
            ``crispedit_easyedit.easyedit.apply.apply_crispedit_to_model``. Passing another function replaces the
            registered one (tests use this); calling ``register()`` again restores the default.
        neutralise_multimodal: forwarded to ``compat.prepare_easyeditor``.

    Returns:
        The EasyEdit generation found, ``"pypi"`` or ``"github-main"``.

    Raises:
        ModuleNotFoundError: EasyEdit is not installed.
    """
    gen = compat.prepare_easyeditor(neutralise_multimodal=neutralise_multimodal)
    fn = apply_fn if apply_fn is not None else default_apply_fn()
    alg_dict = _alg_dict()
    previous = alg_dict.get(ALG_NAME)
    if previous is not fn:
        if previous is not None and previous is not _state["registered"]:
            logger.warning("EasyEdit's ALG_DICT already maps %r to %r (not registered by crispedit_easyedit); "
                           "replacing it", ALG_NAME, previous)
        alg_dict[ALG_NAME] = fn
    _state["registered"] = fn
    _wrap_batchable()
    logger.debug("CrispEdit registered with EasyEdit (%s)", gen)
    return gen


def is_registered() -> bool:
    """Whether ``ALG_DICT`` holds ``CrispEdit`` and ``BatchEditor`` accepts it (False if EasyEdit is absent)."""
    if compat.detect_generation() is None:
        return False
    try:
        return ALG_NAME in _alg_dict() and bool(_batch_editor().is_batchable_method(ALG_NAME))
    except ImportError:
        return False


def unregister() -> None:
    """Remove ``CrispEdit`` from ``ALG_DICT`` and restore ``BatchEditor.is_batchable_method``; idempotent."""
    if compat.detect_generation() is None or "easyeditor" not in sys.modules:
        return
    _alg_dict().pop(ALG_NAME, None)
    _state["registered"] = None
    batch_editor = _batch_editor()
    current = batch_editor.__dict__["is_batchable_method"]
    func = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(func, _WRAPPED_MARK, False):
        batch_editor.is_batchable_method = staticmethod(func.__wrapped__)
