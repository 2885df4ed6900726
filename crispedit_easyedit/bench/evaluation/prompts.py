"""WILD prompt templates ("qa", "none", "chat"): prompt text and token ids, answer truncation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ...templates import has_chat_template
from .common import QA_TEMPLATE, STOP_STRINGS, TEMPLATES

logger = logging.getLogger(__name__)


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")


def format_prompt(tok: Any, question: str, template: str) -> str:
    """The WILD prompt text of one question.

    Args:
        tok: A Hugging Face tokenizer (only used by the ``"chat"`` template).
        question: The question; trailing white space is removed.
        template: One of ``TEMPLATES``.

    Returns:
        The prompt text.

    Raises:
        ValueError: For an unknown template, or for ``"chat"`` when the tokenizer has no chat template.
    """
    _check_template(template)
    question = question.rstrip()
    if template == "qa":
        return QA_TEMPLATE.format(question=question)
    if template == "none":
        return question
    if not has_chat_template(tok):
        raise ValueError(
            f"template 'chat' needs a tokenizer with a chat template, and {type(tok).__name__} has none; "
            f"use template 'qa' or 'none', or set tok.chat_template"
        )
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(tok: Any, question: str, template: str) -> list[int]:
    """The token ids a WILD answer is generated from.

    Args:
        tok: A Hugging Face tokenizer.
        question: The question (right-stripped).
        template: One of ``TEMPLATES``.

    Returns:
        The prompt's own token ids: ``tok(text)`` with special tokens for ``"qa"``/``"none"``, without them for
        ``"chat"`` (the chat template already writes BOS and role markers); a trailing EOS is dropped.
    """
    text = format_prompt(tok, question, template)
    ids = list(tok(text, add_special_tokens=(template != "chat"))["input_ids"])
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if len(ids) > 1 and eos is not None and ids[-1] == eos and eos != bos:
        ids = ids[:-1]  # a tokenizer that appends EOS would end the answer before it starts
    if not ids:
        raise ValueError(f"question {question!r} with template {template!r} tokenises to no tokens")
    return ids


def truncate_answer(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """Cut a decoded answer at the first stop string and strip white space.

    Args:
        text: Decoded new tokens.
        stop_strings: The strings that end an answer (default ``"."`` and newline).

    Returns:
        The text before the first stop string, stripped.
    """
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()
