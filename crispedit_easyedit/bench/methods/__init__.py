"""Editing methods for the side-by-side harness, each behind ``base.EditMethod``.

``load_all()`` imports every built-in method module so that it registers itself; a module whose optional
dependency is missing registers nothing and is reported when its method is asked for.
"""

from __future__ import annotations

import importlib
import logging

from .base import METHODS, EditMethod, MethodOutcome, get_method, register_method

logger = logging.getLogger(__name__)

BUILTIN_MODULES: tuple[str, ...] = ("easyedit_main",)
"""Method modules imported by ``load_all`` (filled in as methods are added). ``easyedit_main`` imports without
EasyEdit; its methods raise at call time when no EasyEdit checkout is configured."""


def load_all() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{name}")


__all__ = ["METHODS", "EditMethod", "MethodOutcome", "get_method", "register_method", "load_all"]
