"""Shared constants and helpers of the evaluation: templates, stop strings, device, eval mode, EOS ids."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ...generation import stop_token_ids
from ...templates import QA_TEMPLATE

__all__ = ["QA_TEMPLATE", "TEMPLATES", "STOP_STRINGS", "Batch", "model_device", "eval_mode", "eos_token_ids", "chunks"]

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = ("qa", "none", "chat")
"""Valid WILD prompt templates."""

STOP_STRINGS: tuple[str, ...] = (".", "\n")
"""A WILD answer ends at the first of these (or at EOS)."""

Batch = Mapping[str, torch.Tensor]
"""A capability batch: ``input_ids`` (n, T) int64 and optionally ``attention_mask`` (n, T) (1 = real token)."""

# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eos_token_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    """The ids that end a WILD answer (``generation.stop_token_ids``: the tokenizer's and the model's EOS ids)."""
    return stop_token_ids(model, tok)


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))
