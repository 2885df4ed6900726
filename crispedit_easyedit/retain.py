"""Retain examples: the model's own answers to unrelated questions, trained alongside the edits.

An edit trained in the formats users ask in (``train_formats`` "qa", "chat") can teach the model to give the edit's
answer to *every* question in that format, while the capability curvature, collected on Wikipedia text, sees no
harm. With ``CrispEditHyperParams.retain_weight`` > 0, each call first asks the unedited (at the call's start) model
``retain_count`` questions from ``retain_source`` in every train format and records its greedy answers (at most
``retain_answer_tokens`` tokens, the stop token included when it comes). Training then minimises

    edit loss + retain_weight * cross-entropy of the recorded answers,

one minibatch of each per optimizer step, both through the same projected optimizer, so the edit must land without
changing those answers. The pool (``chat_corpus.chat_questions``; default ``"factbook-chat"``) holds no question
that this package evaluates. This module never imports EasyEdit or the experiment side.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from .chat_corpus import chat_questions
from .curvature import input_device

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]


def stop_token_ids(model: nn.Module, tok: Any) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS id(s)."""
    ids = [tok.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         stop_ids: Sequence[int], pad_id: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy new tokens after each prompt, up to and including the first stop id, at most ``max_new_tokens``.

    Prompts are left-padded in batches (positions follow the attention mask inside ``generate``).

    Args:
        model: A causal LM with ``generate``.
        prompts: Token ids of each prompt.
        max_new_tokens: At most this many new tokens per prompt.
        stop_ids: Ids that end a continuation (kept as its last token).
        pad_id: Id placed under the zero attention mask.
        batch_size: Prompts per ``generate`` call.

    Returns:
        One list of new token ids per prompt, in input order.
    """
    device = input_device(model)  # the embedding's device (also under device_map)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=list(stop_ids) or None)
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [list(p) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)[:, width:].tolist()
            for new in generated:
                end = next((j + 1 for j, t in enumerate(new) if t in stop_ids), len(new))
                out.append(new[:end])
    finally:
        model.train(was_training)
    return out


def retain_examples(model: nn.Module, tok: Any, hparams, formats: Sequence[str]) -> list[Example]:
    """The retain examples of one call: (prompt + the model's greedy answer ids, labels on the answer only).

    ``hparams.retain_count`` questions drawn from ``hparams.retain_source`` with ``random.Random(hparams.seed)``,
    each rendered in every format of ``formats`` (format-major), answered by ``model`` as it is now. Answers that are
    empty (the model stops at once) keep their stop token, so "answer nothing" is retained too.

    Returns:
        A list of (input_ids, labels) pairs; empty when ``hparams.retain_weight`` is 0.
    """
    from .editing import IGNORE_INDEX, formatted_prompt_ids, pad_token_id

    if not getattr(hparams, "retain_weight", 0.0):
        return []
    pool = chat_questions(hparams.retain_source)
    questions = random.Random(hparams.seed).sample(pool, min(hparams.retain_count, len(pool)))
    prompts = [formatted_prompt_ids(tok, q, fmt)[-(hparams.max_length - hparams.retain_answer_tokens):]
               for fmt in formats for q in questions]
    answers = greedy_continuations(model, prompts, hparams.retain_answer_tokens, stop_token_ids(model, tok),
                                   pad_token_id(tok), batch_size=hparams.train_batch_size)
    examples = [(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers) if a]
    logger.info("retain set: %d questions x %d format(s) from %s, %d answer tokens in all", len(questions),
                len(formats), hparams.retain_source, sum(len(a) for a in answers))
    return examples
