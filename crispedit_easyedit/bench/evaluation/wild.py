"""WILD generation (greedy, stop at "." / newline / EOS) and its reliability, generalisation and locality scores."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...editing import pad_token_id
from ...generation import greedy_decode
from .common import QA_TEMPLATE, STOP_STRINGS, TEMPLATES, eos_token_ids
from .text import _NQ_PREFIX, contains, exact_match, squad_normalize
from .prompts import _check_template, has_chat_template, prompt_token_ids, truncate_answer

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# WILD generation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_from_ids(
    model: torch.nn.Module,
    tok: Any,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 40,
    batch_size: int = 16,
    stop_strings: Sequence[str] = STOP_STRINGS,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers from token-id prompts, truncated at the first stop string (``generation.greedy_decode``).

    Rows are sorted by length and left-padded; positions follow the attention mask, so a batched answer equals the
    answer generated alone; a row leaves its batch at EOS or once its text holds a stop string.

    Args:
        model: A causal LM.
        tok: Its tokenizer (decoding, pad and EOS ids).
        prompts_ids: One list of prompt token ids per answer.
        max_new_tokens: At most this many new tokens (40 in the paper).
        batch_size: Prompts decoded together.
        stop_strings: Decoded text that ends an answer.
        show_progress: Show a tqdm bar over batches.

    Returns:
        One answer per prompt, in input order: the new tokens up to the first EOS, decoded without special tokens,
        cut before the first stop string and stripped.
    """
    eos_ids = eos_token_ids(model, tok)

    def has_stop_string(new_ids: list[int]) -> bool:
        text = tok.decode(new_ids, skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    new_tokens = greedy_decode(model, prompts_ids, max_new_tokens, stop_ids=eos_ids, pad_id=pad_token_id(tok),
                               batch_size=batch_size, is_finished=has_stop_string if stop_strings else None,
                               show_progress=show_progress)
    answers = []
    for new in new_tokens:
        if new and new[-1] in eos_ids:
            new = new[:-1]
        answers.append(truncate_answer(tok.decode(new, skip_special_tokens=True), stop_strings))
    return answers


def wild_generate(
    model: torch.nn.Module,
    tok: Any,
    questions: Sequence[str],
    template: str = "qa",
    max_new_tokens: int = 40,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[str]:
    """WILD answers to questions: greedy, at most ``max_new_tokens``, cut at ``"."``, newline or EOS.

    Args:
        model: A causal LM.
        tok: Its tokenizer.
        questions: The questions (or edit prompts).
        template: ``"qa"``, ``"none"`` or ``"chat"`` (see the module docstring).
        max_new_tokens: At most this many new tokens (40 in the paper).
        batch_size: Prompts decoded together (results do not depend on it).
        show_progress: Show a tqdm bar over batches.

    Returns:
        One answer string per question.

    Raises:
        ValueError: For an unknown template, or ``"chat"`` with a tokenizer that has no chat template.
    """
    _check_template(template)
    ids = [prompt_token_ids(tok, q, template) for q in questions]
    return generate_from_ids(model, tok, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             show_progress=show_progress)


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def locality_pairs(request: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (prompt, ground truth) pairs of a request's ``locality`` field, over all its keys in order.

    Args:
        request: An EasyEdit request; ``request["locality"][key]`` has ``prompt`` and ``ground_truth``, each a string
            or a list of strings.

    Returns:
        A list of pairs (empty when the request has no locality field).
    """
    pairs: list[tuple[str, str]] = []
    for key, item in (request.get("locality") or {}).items():
        prompts, truths = _as_list(item["prompt"]), _as_list(item["ground_truth"])
        if len(prompts) != len(truths):
            raise ValueError(
                f"locality {key!r} has {len(prompts)} prompts but {len(truths)} ground truths; they must pair up"
            )
        pairs.extend(zip(prompts, truths))
    return pairs


def _wild_question(prompt: str) -> str:
    """A locality prompt as a question: ZsRE's ``"nq question: "`` prefix is removed for generation."""
    return _NQ_PREFIX.sub("", prompt)


def _mean(flags: Sequence[bool]) -> float | None:
    return float(sum(flags)) / len(flags) if flags else None


def wild_scores(
    model: torch.nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    templates: Sequence[str] | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    include_locality: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """WILD reliability and generalisation (exact match and contains) per template, with the generated answers.

    Args:
        model: The (edited) causal LM.
        tok: Its tokenizer.
        requests: EasyEdit requests (``prompt``, ``target_new``, optional ``rephrase_prompt`` and ``locality``).
        templates: Templates to run; ``None`` = ``("qa", "none", "chat")`` when the tokenizer has a chat template,
            else ``("qa", "none")`` with a logged warning. An explicit ``"chat"`` without a chat template raises.
        max_new_tokens: At most this many new tokens per answer.
        batch_size: Prompts decoded together.
        include_locality: Also answer every locality prompt (ZsRE's ``"nq question: "`` prefix removed) and score
            it against its ground truth; feed the answers before and after an edit to ``locality_unchanged``.
        show_progress: Show tqdm bars.

    Returns:
        ``{"config": {...}, "n_requests": N, "per_template": {template: scores}}`` where ``scores`` has
        ``reliability_em``, ``reliability_contains`` (means over all requests), ``generalization_em``,
        ``generalization_contains`` (means over requests with a rephrase; None when there is none),
        ``n_generalization``, with ``include_locality`` also ``locality_em``, ``locality_contains``, ``n_locality``,
        and ``answers``: ``{"reliability": [N str], "generalization": [N str or None], "locality": [str]}``.
    """
    if templates is None:
        templates = TEMPLATES if has_chat_template(tok) else ("qa", "none")
        if "chat" not in templates:
            logger.warning("tokenizer %s has no chat template: WILD scores without the 'chat' template",
                           type(tok).__name__)
    for t in templates:
        _check_template(t)
    if "chat" in templates and not has_chat_template(tok):
        raise ValueError(
            f"template 'chat' needs a tokenizer with a chat template, and {type(tok).__name__} has none; "
            f"pass templates=('qa', 'none')"
        )
    prompts = [r["prompt"] for r in requests]
    targets = [r["target_new"] for r in requests]
    reph_idx = [i for i, r in enumerate(requests) if r.get("rephrase_prompt")]
    rephrases = [requests[i]["rephrase_prompt"] for i in reph_idx]
    loc = [p for r in requests for p in locality_pairs(r)] if include_locality else []

    per_template: dict[str, Any] = {}
    for template in templates:
        logger.info("WILD generation with template %r on %d requests", template, len(requests))
        questions = prompts + rephrases + [_wild_question(p) for p, _ in loc]
        answers = wild_generate(model, tok, questions, template, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, show_progress=show_progress)
        rel = answers[: len(prompts)]
        gen_answers = answers[len(prompts): len(prompts) + len(rephrases)]
        loc_answers = answers[len(prompts) + len(rephrases):]
        gen_full: list[str | None] = [None] * len(requests)
        for i, a in zip(reph_idx, gen_answers):
            gen_full[i] = a
        scores: dict[str, Any] = {
            "reliability_em": _mean([exact_match(a, t) for a, t in zip(rel, targets)]),
            "reliability_contains": _mean([contains(a, t) for a, t in zip(rel, targets)]),
            "generalization_em": _mean([exact_match(a, targets[i]) for i, a in zip(reph_idx, gen_answers)]),
            "generalization_contains": _mean([contains(a, targets[i]) for i, a in zip(reph_idx, gen_answers)]),
            "n_generalization": len(reph_idx),
        }
        if include_locality:
            scores["locality_em"] = _mean([exact_match(a, gt) for a, (_, gt) in zip(loc_answers, loc)])
            scores["locality_contains"] = _mean([contains(a, gt) for a, (_, gt) in zip(loc_answers, loc)])
            scores["n_locality"] = len(loc)
        scores["answers"] = {"reliability": rel, "generalization": gen_full, "locality": loc_answers}
        per_template[template] = scores
    return {
        "config": {
            "templates": list(templates),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "stop": [*STOP_STRINGS, "EOS"],
            "normalisation": "squad",
            "qa_template": QA_TEMPLATE,
        },
        "n_requests": len(requests),
        "per_template": per_template,
    }


def locality_unchanged(answers_before: Sequence[str], answers_after: Sequence[str], normalize: bool = True) -> float:
    """Share of greedy answers that the edit left unchanged.

    Args:
        answers_before: Answers of the unedited model.
        answers_after: Answers of the edited model to the same prompts, same order.
        normalize: Compare SQuAD-normalised answers (default) instead of the raw strings.

    Returns:
        The fraction in [0, 1] of positions where the two answers are equal.
    """
    if len(answers_before) != len(answers_after):
        raise ValueError(f"got {len(answers_before)} answers before and {len(answers_after)} after; they must pair up")
    if not answers_before:
        raise ValueError("locality_unchanged needs at least one answer")
    norm = squad_normalize if normalize else (lambda s: s)
    same = [norm(a) == norm(b) for a, b in zip(answers_before, answers_after)]
    return sum(same) / len(same)
