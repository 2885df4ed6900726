"""Retain examples: the model's own answers to unrelated questions, trained alongside the edits.

An edit trained in the formats users ask in (``train_formats`` "qa", "chat") can teach the model to give the edit's
answer to *every* question in that format, while the capability curvature, collected on Wikipedia text, sees no
harm. With ``CrispEditHyperParams.retain_weight`` > 0, each call first asks the unedited (at the call's start) model
``retain_count`` questions from ``retain_source`` in every train format and records its greedy answers (at most
``retain_answer_tokens`` tokens, the stop token included when it comes). Training then minimises

    edit loss + retain_weight * cross-entropy of the recorded answers,

one minibatch of each per optimizer step, both through the same projected optimizer, so the edit must land without
changing those answers. The default pool (``chat_corpus.chat_questions``: ``"factbook-chat"``) holds no question
that this package evaluates; a file pool must be disjoint from the evaluated items too (the pools in
``benchmarks/pools/`` are built so by ``benchmarks/make_question_pool.py``: locality questions of records no run edits
or evaluates). This module never imports EasyEdit or the experiment side.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from torch import nn

from .chat_corpus import chat_questions
from .generation import greedy_decode, stop_token_ids

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]


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
    answers = greedy_decode(model, prompts, hparams.retain_answer_tokens, stop_token_ids(model, tok),
                            pad_token_id(tok), batch_size=hparams.train_batch_size)
    examples = [(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers) if a]
    logger.info("retain set: %d questions x %d format(s) from %s, %d answer tokens in all", len(questions),
                len(formats), hparams.retain_source, sum(len(a) for a in answers))
    return examples
