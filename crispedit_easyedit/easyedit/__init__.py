"""The EasyEdit adapter: the only part of crispedit_easyedit that imports ``easyeditor``.

Importing this package registers CrispEdit with EasyEdit (``register()``) when an ``easyeditor`` package is
installed; without one it only logs at DEBUG, so ``import crispedit_easyedit.easyedit`` always works. If EasyEdit
is installed but fails to import, a warning is logged and ``register()`` raises the error when called.

Exports (``CrispEditHyperParams`` and ``apply_crispedit_to_model`` are imported lazily, on first access):
    register, unregister, is_registered, generation: registration with EasyEdit (``registry``).
    prepare_easyeditor, ModelPair: compatibility with both EasyEdit generations (``compat``).
    CrispEditHyperParams: ``crispedit_easyedit.hparams.CrispEditHyperParams``.
    apply_crispedit_to_model: EasyEdit's apply entry point (``crispedit_easyedit.easyedit.apply``).
"""

from __future__ import annotations

import logging
from typing import Any

from .compat import ModelPair, easyeditor_available, prepare_easyeditor
from .registry import ALG_NAME, generation, is_registered, register, unregister

logger = logging.getLogger(__name__)

__all__ = [
    "ALG_NAME",
    "CrispEditHyperParams",
    "ModelPair",
    "apply_crispedit_to_model",
    "generation",
    "is_registered",
    "prepare_easyeditor",
    "register",
    "unregister",
]


def __getattr__(name: str) -> Any:
    if name == "CrispEditHyperParams":
        from ..hparams import CrispEditHyperParams

        return CrispEditHyperParams
    if name == "apply_crispedit_to_model":
        from .apply import apply_crispedit_to_model

        return apply_crispedit_to_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_if_available() -> None:
    if not easyeditor_available():
        logger.debug("easyeditor is not installed; CrispEdit is not registered with EasyEdit")
        return
    try:
        register()
    except Exception as exc:  # noqa: BLE001 - importing the adapter must not fail because EasyEdit does
        logger.warning("easyeditor is installed but CrispEdit could not be registered with it (%s: %s); "
                       "call crispedit_easyedit.easyedit.register() to see the full error", type(exc).__name__, exc)


_register_if_available()
