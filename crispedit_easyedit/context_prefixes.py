"""Context prefixes: short texts the model writes itself, put before an edit's prompt during training.

A prompt is rarely asked bare. CounterFact's paraphrases put an unrelated sentence before a rephrased prompt, and a
user's question comes after other text. ROME and MEMIT make their edit robust to what comes before by averaging the
edit loss over "context templates": a few short texts sampled from the model itself, each followed by ". " and the
prompt. With ``CrispEditHyperParams.context_prefixes`` > 0, each call first samples that many prefixes from the model
as it is at the call's start (``context_prefix_tokens`` tokens each, top-k sampling from ROME/MEMIT's start words,
seeded by ``hparams.seed``), and every training epoch adds, per edit, one raw-format example whose prompt follows
a prefix drawn at random (:func:`prefixed_requests`). The bare examples of ``train_formats`` stay in every epoch,
so the edit is still learned in the form it is asked in. This module never imports EasyEdit or the experiment side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .curvature import input_device

logger = logging.getLogger(__name__)

CONTEXT_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
"""The start words of the sampled prefixes (ROME/MEMIT's context templates), used in turn."""

TOP_K = 5
"""Each prefix token is drawn from the model's TOP_K most likely next tokens (ROME/MEMIT: 5)."""


@torch.no_grad()
def sample_prefix_ids(model: nn.Module, tok: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """Token ids of ``count`` prefixes: a start word of :data:`CONTEXT_STARTS` (in turn, with the tokenizer's special
    tokens) followed by up to ``length`` tokens sampled from ``model``, each from its top-:data:`TOP_K` next tokens
    at temperature 1 with a CPU ``torch.Generator`` seeded with ``seed`` (so a device gives the same draws from the
    same fp32 logits). A row ends early at a stop token (not included). The model's train/eval mode is restored.
    """
    from .generation import stop_token_ids

    generator = torch.Generator().manual_seed(int(seed))
    stops = set(stop_token_ids(model, tok))
    device = input_device(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for index in range(count):
            ids = list(tok(CONTEXT_STARTS[index % len(CONTEXT_STARTS)], add_special_tokens=True)["input_ids"])
            for _ in range(length):
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                top = torch.topk(logits, TOP_K)
                choice = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)])
                if choice in stops:
                    break
                ids.append(choice)
            rows.append(ids)
    finally:
        model.train(was_training)
    return rows


def sample_context_prefixes(model: nn.Module, tok: Any, count: int, length: int, seed: int) -> list[str]:
    """The texts of :func:`sample_prefix_ids`: decoded without special tokens, braces replaced by spaces, white space
    collapsed (a prefix the model ends at once is its start word alone).

    Returns:
        A list of ``count`` non-empty strings, the i-th starting with ``CONTEXT_STARTS[i % 5]``.
    """
    prefixes = []
    for index, ids in enumerate(sample_prefix_ids(model, tok, count, length, seed)):
        text = tok.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        prefixes.append(" ".join(text.split()) or CONTEXT_STARTS[index % len(CONTEXT_STARTS)])
    logger.info("context prefixes (%d, %d tokens each): %s", count, length, prefixes)
    return prefixes


def prefixed_prompt(prefix: str, prompt: str) -> str:
    """``prefix`` and ``prompt`` joined as ROME/MEMIT's context templates do: ``"{prefix}. {prompt}"``."""
    return f"{prefix.rstrip().rstrip('.')}. {prompt.lstrip()}"


def prefixed_requests(requests: Sequence[Mapping[str, Any]], prefixes: Sequence[str],
                      generator: torch.Generator) -> list[dict[str, Any]]:
    """A copy of each request whose prompt follows a prefix drawn uniformly from ``prefixes`` with ``generator``
    (one draw per request, in request order; :func:`prefixed_prompt`). Empty when ``prefixes`` is empty.

    ``editing`` trains them in the "raw" format, one example each per epoch.
    """
    if not prefixes:
        return []
    picks = torch.randint(len(prefixes), (len(requests),), generator=generator).tolist()
    return [dict(r, prompt=prefixed_prompt(prefixes[pick], r["prompt"])) for r, pick in zip(requests, picks)]
