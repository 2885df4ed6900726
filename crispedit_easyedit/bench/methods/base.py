"""The one signature every editing method has in the side-by-side harness.

A method is a callable ``method(model, tok, requests, config) -> MethodOutcome``:

* ``model``/``tok``: the model object the harness loaded once (the same object for every method of a run); the method
  edits it in place (or returns another module in ``MethodOutcome.model``, e.g. a merged LoRA model).
* ``requests``: EasyEdit-shaped request dicts (``prompt``, ``target_new``, ``ground_truth``, optional ``subject``,
  ``rephrase_prompt``, ``locality``), the package's ``data.load_requests`` output.
* ``config``: the method's resolved settings (a plain mapping: the Hydra ``method`` group, with ``hparams`` the
  path of an EasyEdit-layout YAML and ``overrides`` its overrides), plus the harness keys ``chunk_index`` (0 for the
  first call on a fresh model) and ``sequential`` (True when the harness calls the method once per chunk on the same
  model and earlier chunks' edits must stay).

In a sequential run the harness calls the method once per chunk on the same model; a method keeps whatever state it
needs across those calls (CrispEdit-Seq keeps it on the model, EasyEdit's AlphaEdit in its module globals).

The receipt is JSON-serialisable and says what ran: ``method``, the settings actually used, ``seconds`` per phase
(``{"edit": ..., "statistics": ...}``), ``n_requests`` and, for EasyEdit's methods, the patches applied.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class MethodOutcome:
    """What a method returns: the edited model and its receipt (JSON-serialisable)."""

    model: torch.nn.Module
    receipt: dict[str, Any] = field(default_factory=dict)


class EditMethod(Protocol):
    def __call__(self, model: torch.nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]],
                 config: Mapping[str, Any]) -> MethodOutcome: ...


METHODS: dict[str, EditMethod] = {}
"""Registered methods by name (``register_method``)."""


def register_method(name: str) -> Callable[[EditMethod], EditMethod]:
    """Decorator: register ``fn`` under ``name`` (a second registration of the same name is an error)."""

    def wrap(fn: EditMethod) -> EditMethod:
        if name in METHODS and METHODS[name] is not fn:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> EditMethod:
    """The method registered as ``name``; a ValueError naming the valid choices otherwise (and, for a built-in
    module that could not be imported, why)."""
    from . import UNAVAILABLE, load_all

    load_all()
    if name not in METHODS:
        missing = "".join(f"; module {module!r} is unavailable: {why}" for module, why in UNAVAILABLE.items())
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}{missing}")
    return METHODS[name]


def resolve_path(path: str | os.PathLike) -> Path:
    """A path from a method config: as given when it exists (absolute, or relative to the working directory), else
    relative to the repository root (where ``hparams/`` lives); as given when neither exists (the caller's
    FileNotFoundError then names it)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    from ..job import REPO_ROOT

    return REPO_ROOT / given if (REPO_ROOT / given).exists() else given
