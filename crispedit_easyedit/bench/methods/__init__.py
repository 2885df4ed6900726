"""Editing methods for the side-by-side harness, each behind ``base.EditMethod``.

``load_all()`` imports every built-in method module so that it registers itself; a module whose optional
dependency is missing registers nothing and is reported when its method is asked for.
"""

from __future__ import annotations

import importlib
import logging

from .base import METHODS, EditMethod, MethodOutcome, get_method, register_method, resolve_path

logger = logging.getLogger(__name__)

BUILTIN_MODULES: tuple[str, ...] = ("crispedit", "lora", "easyedit_main")
"""Method modules imported by ``load_all``: ``crispedit`` (crispedit, crispedit-seq, ft, ft-seq, adam-nscl),
``lora`` (peft LoRA on the edit layers) and ``easyedit_main`` (EasyEdit's own easyedit-memit, -alphaedit,
-ultraedit, -ft, -lora; it imports without EasyEdit, and its methods raise at call time when no EasyEdit GitHub-main
checkout is configured)."""

UNAVAILABLE: dict[str, str] = {}
"""Built-in method modules that could not be imported (a missing optional dependency), with the reason."""


def load_all() -> None:
    """Import every built-in method module once; one whose optional dependency is missing is recorded in
    :data:`UNAVAILABLE` (and logged) instead of failing the others."""
    for name in BUILTIN_MODULES:
        if name in UNAVAILABLE:
            continue
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                raise  # a listed module that does not exist is a bug, not a missing dependency
            UNAVAILABLE[name] = f"{exc}"
            logger.warning("editing methods of %s are unavailable: %s", name, exc)


__all__ = ["METHODS", "UNAVAILABLE", "EditMethod", "MethodOutcome", "get_method", "register_method", "load_all",
           "resolve_path"]
