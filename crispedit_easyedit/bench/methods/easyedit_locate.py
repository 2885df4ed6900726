"""Find and import a checkout of EasyEdit's GitHub main for the ``easyedit-*`` baseline methods.

EasyEdit's GitHub main has no ``setup.py``: users clone it. The checkout is named by ``config["easyedit_path"]`` or
the environment variable ``EASYEDIT_PATH`` and prepended to ``sys.path``. If ``easyeditor`` is already importable
from elsewhere, it must be the GitHub-main generation (``easyeditor/util/device.py`` exists); the PyPI package
``easyeditor==0.0.1.dev0`` is a different code base (CUDA-only, no AlphaEdit/UltraEdit) and is refused with an
error that says so.

Nothing here imports ``easyeditor`` at module import time; :func:`import_easyeditor` does, at call time, and raises
:class:`EasyEditUnavailable` (naming ``EASYEDIT_PATH`` and what is missing) when it cannot.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_VAR = "EASYEDIT_PATH"
CONFIG_KEY = "easyedit_path"


class EasyEditUnavailable(RuntimeError):
    """EasyEdit's GitHub main cannot be used here (the message says what is missing and how to provide it)."""


@dataclass
class EasyEditInfo:
    """Where the imported ``easyeditor`` comes from.

    Attributes:
        root: the checkout folder (the parent of ``easyeditor/``).
        commit: ``git rev-parse HEAD`` of the checkout, the content of a ``VERSION`` file, or ``"unknown"``.
        source: ``"config"``, ``"env"`` or ``"already importable"``.
        stubbed: easyeditor multimodal modules replaced by stubs at import (see ``easyedit_patches``).
    """

    root: Path
    commit: str
    source: str
    stubbed: list[str] = field(default_factory=list)


_INFO: dict[str, EasyEditInfo] = {}


def _hint() -> str:
    return (f"set {ENV_VAR} (or the method config key {CONFIG_KEY!r}) to a checkout of EasyEdit's GitHub main "
            f"(git clone of zjunlp/EasyEdit) and build its environment with benchmarks/easyedit_main_env.sh")


def checkout_root(config: Mapping[str, Any] | None = None) -> tuple[Path | None, str]:
    """The configured checkout (``config["easyedit_path"]`` first, then ``$EASYEDIT_PATH``) and where it came from.

    Returns:
        ``(folder or None, "config" | "env" | "none")``.

    Raises:
        EasyEditUnavailable: a configured folder that has no ``easyeditor/__init__.py``.
    """
    value, source = (config or {}).get(CONFIG_KEY), "config"
    if not value:
        value, source = os.environ.get(ENV_VAR), "env"
    if not value:
        return None, "none"
    root = Path(str(value)).expanduser().resolve()
    if not (root / "easyeditor" / "__init__.py").is_file():
        name = CONFIG_KEY if source == "config" else ENV_VAR
        raise EasyEditUnavailable(f"{name}={value!r} is not an EasyEdit checkout: {root / 'easyeditor'} has no "
                                  f"__init__.py; {_hint()}")
    return root, source


def read_commit(root: Path) -> str:
    """The checkout's commit: ``git rev-parse HEAD``, else a ``VERSION`` file's first line, else ``"unknown"``."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    version = root / "VERSION"
    if version.is_file():
        lines = version.read_text(encoding="utf-8").strip().splitlines()
        if lines:
            return lines[0].strip()
    return "unknown"


def _found_root() -> Path | None:
    from ...easyedit import compat

    location = compat.easyeditor_location()
    return None if location is None else location.parent


def import_easyeditor(config: Mapping[str, Any] | None = None) -> EasyEditInfo:
    """Make EasyEdit's GitHub main importable, import it, and say where it came from (idempotent per checkout).

    Raises:
        EasyEditUnavailable: nothing configured and no ``easyeditor`` importable; the importable one is the PyPI
            generation; a configured checkout differs from the ``easyeditor`` already imported in this process; or
            the import fails (e.g. a dependency of EasyEdit main is missing in this environment).
    """
    from ...easyedit import compat

    root, source = checkout_root(config)
    if root is not None:
        loaded = sys.modules.get("easyeditor")
        if loaded is not None:
            loaded_root = _found_root()
            if loaded_root is not None and loaded_root != root:
                raise EasyEditUnavailable(
                    f"easyeditor is already imported from {loaded_root}, but {CONFIG_KEY}/{ENV_VAR} names {root}; "
                    "one process can use one EasyEdit checkout")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
            importlib.invalidate_caches()
    else:
        found = _found_root()
        if found is None:
            raise EasyEditUnavailable(f"EasyEdit's GitHub main is not configured: {ENV_VAR} is unset and no "
                                      f"easyeditor package is importable; {_hint()}")
        root, source = found, "already importable"
    generation = compat.detect_generation()
    if generation != compat.GITHUB_MAIN:
        where = compat.easyeditor_location()
        raise EasyEditUnavailable(
            f"the importable easyeditor ({where}) is the {generation!r} generation, not EasyEdit's GitHub main "
            f"(easyeditor/util/device.py is missing); the easyedit-* baselines need GitHub main: {_hint()}")
    key = str(root)
    if key in _INFO and "easyeditor" in sys.modules:
        return _INFO[key]
    try:
        stubbed = _import_with_optional_stubs()
    except Exception as err:  # noqa: BLE001 - re-raised with the hint
        raise EasyEditUnavailable(f"importing EasyEdit's GitHub main from {root} failed ({type(err).__name__}: "
                                  f"{err}); install its text-editing requirements with "
                                  f"benchmarks/easyedit_main_env.sh ({ENV_VAR}={root})") from err
    info = EasyEditInfo(root=root, commit=read_commit(root), source=source, stubbed=stubbed)
    logger.info("EasyEdit GitHub main from %s (commit %s, via %s)", root, info.commit, source)
    _INFO[key] = info
    return info


def _import_with_optional_stubs() -> list[str]:
    """Import ``easyeditor``; only if that fails inside a multimodal module, retry with those modules stubbed."""
    from ...easyedit import compat
    from .easyedit_patches import stub_multimodal_modules

    if "easyeditor" in sys.modules:
        return compat.stubbed_modules()
    try:
        compat.prepare_easyeditor(neutralise_multimodal=False)
        return []
    except Exception as err:  # noqa: BLE001 - only the known multimodal failure is retried
        root = compat.easyeditor_location()
        if root is None or not compat._failed_in_multimodal(err, root):  # noqa: SLF001 - same package
            raise
        compat._purge_easyeditor()  # noqa: SLF001
        return stub_multimodal_modules(reason=f"{type(err).__name__}: {err}")
