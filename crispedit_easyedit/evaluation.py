"""Evaluation of edited models without EasyEdit: WILD generation, teacher-forced accuracy, capability metrics.

This module is part of the core and never imports ``easyeditor``.

Definitions (all of them are what the functions below compute):

* **SQuAD normalisation** (``squad_normalize``): lower case, remove ASCII punctuation (``string.punctuation``),
  remove the articles ``a``/``an``/``the`` as whole words, collapse white space. This is the rule of the official
  SQuAD v1.1 script and of EasyEdit's LLM-judge fallback.
* **Exact match** (``exact_match``): the normalised prediction equals a normalised gold answer.
* **Contains** (``contains``): a normalised gold answer occurs in the normalised prediction as a run of whole words
  ("paris" is in "capital is paris" but not in "parisian"). An answer that normalises to the empty string never
  matches.
* **WILD generation** (``wild_generate``), the protocol of the paper (Yang et al., 2025a): greedy decoding of at most
  40 new tokens from the prompt's own tokens, stopping at EOS, and truncating the decoded answer at the first
  ``"."`` or newline. Templates:

  - ``"qa"``: ``"Please answer the question:\\n\\nQ: {question}\\nA:"``
  - ``"none"``: the question alone,
  - ``"chat"``: the tokenizer's chat template with the question as the user message and the generation prompt
    appended. A tokenizer without a chat template is an error for an explicit ``"chat"`` request (a metric is never
    dropped silently); ``wild_scores(templates=None)`` picks ``("qa", "none", "chat")`` when the tokenizer has a
    chat template and ``("qa", "none")`` otherwise, with a logged warning.

  The question is right-stripped, so the prompt never ends in a white-space token (a trailing space token never
  seen in training ruins greedy answers). ``"qa"``/``"none"`` prompts are tokenised with the tokenizer's special
  tokens (BOS where the tokenizer adds one, as in training); chat prompts without them (the template writes them).
* **Reliability / generalisation** (``wild_scores``): WILD answers to the edit prompt / the rephrased prompt scored
  against ``target_new`` by exact match and by contains; generalisation averages over the requests that have a
  ``rephrase_prompt``.
* **Teacher-forced token accuracy** (``teacher_forced_accuracy``): EasyEdit's ``token_em``. The prompt and the
  target are tokenised separately and joined as ids, exactly like training (see ``prompt_target_ids``); the score
  of one example is the share of target tokens that equal the argmax prediction at the preceding position.
  ``teacher_forced_scores`` gives EasyEdit's set on requests without EasyEdit: ``rewrite_acc``, ``rephrase_acc``,
  ``locality_truth_acc`` (locality prompt vs its ground truth, e.g. ZsRE's ``loc_ans``) and, against the stored
  predictions of the unedited model, ``locality_acc``.
* **Perplexity** (``perplexity``): ``exp`` of the token-weighted mean negative log-likelihood of every token whose
  preceding position is also a real (non-pad) token.
* **KL** (``mean_kl``/``kl_to_reference``): the mean over all real positions of KL(p_before || p_after) of the
  next-token distributions. With ``top_k`` the reference keeps its top-k log-probabilities plus the remaining mass,
  and the KL is that of the coarse-grained (k + 1)-outcome distributions: a lower bound of the full KL, exact when
  the reference puts no mass outside its top k.
* **Locality**: ``locality_unchanged`` = share of greedy (WILD) answers unchanged by the edit;
  ``locality_token_agreement`` = EasyEdit's teacher-forced locality (share of argmax tokens at the positions of the
  locality answer that are unchanged); ``teacher_forced_accuracy`` on the locality prompt and its ground truth
  (``loc_ans``) before and after the edit gives the teacher-forced locality against the truth.
"""

from __future__ import annotations

import contextlib
import logging
import re
import string
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .curvature import model_inputs
from .editing import IGNORE_INDEX, collate, pad_token_id, tokenize_edit

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = ("qa", "none", "chat")
"""Valid WILD prompt templates."""

QA_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"
"""The paper's QA context (WILD)."""

STOP_STRINGS: tuple[str, ...] = (".", "\n")
"""A WILD answer ends at the first of these (or at EOS)."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", flags=re.IGNORECASE)

Batch = Mapping[str, torch.Tensor]
"""A capability batch: ``input_ids`` (n, T) int64 and optionally ``attention_mask`` (n, T) (1 = real token)."""


# ----------------------------------------------------------------------------------------------------------------
# String metrics
# ----------------------------------------------------------------------------------------------------------------
def squad_normalize(text: str) -> str:
    """Normalise an answer by the SQuAD rule.

    Args:
        text: Any string.

    Returns:
        ``text`` lower-cased, without ASCII punctuation, without the articles a/an/the, with runs of white space
        collapsed to one space and no leading or trailing white space.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_golds(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    golds = list(gold)
    if not golds:
        raise ValueError("gold must be a string or a non-empty sequence of strings, got an empty sequence")
    return golds


def exact_match(pred: str, gold: str | Sequence[str]) -> bool:
    """Whether the SQuAD-normalised prediction equals a SQuAD-normalised gold answer.

    Args:
        pred: The model's answer.
        gold: One acceptable answer or a sequence of acceptable answers (any one suffices).

    Returns:
        True when ``squad_normalize(pred) == squad_normalize(g)`` for some gold answer ``g``.
    """
    p = squad_normalize(pred)
    return any(p == squad_normalize(g) for g in _as_golds(gold))


def contains(pred: str, gold: str | Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs in the normalised prediction as a run of whole words.

    Args:
        pred: The model's answer.
        gold: One acceptable answer or a sequence of acceptable answers (any one suffices).

    Returns:
        True when ``" " + squad_normalize(g) + " "`` is a substring of ``" " + squad_normalize(pred) + " "`` for
        some gold answer ``g`` whose normalisation is not empty.
    """
    p = f" {squad_normalize(pred)} "
    for g in _as_golds(gold):
        ng = squad_normalize(g)
        if ng and f" {ng} " in p:
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _eos_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for i in extra or []:
        if int(i) not in ids:
            ids.append(int(i))
    return ids


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` carries a chat template (``tok.chat_template`` is set)."""
    return bool(getattr(tok, "chat_template", None))


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


class _StopOnStrings(StoppingCriteria):
    """Per-row stop once the decoded new tokens contain a stop string (EOS is handled by ``generate``)."""

    def __init__(self, tok: Any, prompt_len: int, stop_strings: Sequence[str]) -> None:
        self.tok = tok
        self.prompt_len = prompt_len
        self.stop_strings = tuple(stop_strings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


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
    """Greedy answers from token-id prompts, left-padded in batches, truncated at the first stop string.

    Rows are sorted by length so batches carry little padding; positions come from the attention mask inside
    ``model.generate``, so a batched answer equals the answer generated alone.

    Args:
        model: A causal LM (``generate`` capable).
        tok: Its tokenizer (decoding, pad and EOS ids).
        prompts_ids: One list of prompt token ids per answer.
        max_new_tokens: At most this many new tokens (40 in the paper).
        batch_size: Prompts per ``generate`` call.
        stop_strings: Decoded text that ends an answer.
        show_progress: Show a tqdm bar over batches.

    Returns:
        One answer per prompt, in input order: the new tokens up to the first EOS, decoded without special tokens,
        cut before the first stop string and stripped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    pad_id = pad_token_id(tok)
    eos_ids = _eos_ids(model, tok)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    answers: list[str] = [""] * len(prompts_ids)
    with _eval_mode(model):
        for rows in tqdm(list(_chunks(len(order), batch_size)), desc="generate", disable=not show_progress,
                         leave=False):
            idx = [order[r] for r in rows]
            seqs = [list(prompts_ids[i]) for i in idx]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                input_ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                attention_mask[r, width - len(s):] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=gen_cfg,
                stopping_criteria=StoppingCriteriaList([_StopOnStrings(tok, width, stop_strings)]),
            )
            for r, i in enumerate(idx):
                new = out[r, width:].tolist()
                for j, t in enumerate(new):
                    if t in eos_ids:
                        new = new[:j]
                        break
                text = tok.decode(new, skip_special_tokens=True)
                answers[i] = truncate_answer(text, stop_strings)
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
        batch_size: Prompts per ``generate`` call (results do not depend on it).
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
        batch_size: Prompts per ``generate`` call.
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


# ----------------------------------------------------------------------------------------------------------------
# Teacher-forced metrics (EasyEdit's token_em without EasyEdit)
# ----------------------------------------------------------------------------------------------------------------
def prompt_target_ids(tok: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its target, tokenised separately and joined like training.

    This is ``crispedit_easyedit.editing.tokenize_edit``, the tokenisation CrispEdit trains on: a leading space is
    added to the target when the prompt does not end in white space and the target does not start with it; the
    prompt is tokenised with the tokenizer's special tokens (a trailing EOS dropped), the target without. (EasyEdit
    itself tokenises the joined text ``prompt + " " + target``; for BPE tokenizers the two agree when the target
    starts a new word.)

    Args:
        tok: A Hugging Face tokenizer.
        prompt: The prompt text.
        target: The target text (non-empty).

    Returns:
        ``(prompt_ids, target_ids)``; the model input is ``prompt_ids + target_ids``.
    """
    if not target or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r} for prompt {prompt!r}")
    ids, labels = tokenize_edit(tok, prompt, target, max_length=sys.maxsize)
    n_prompt = sum(1 for lab in labels if lab == IGNORE_INDEX)
    if n_prompt == 0:
        raise ValueError(f"prompt {prompt!r} tokenises to no tokens; teacher forcing needs at least one")
    return ids[:n_prompt], ids[n_prompt:]


@torch.no_grad()
def teacher_forced_predictions(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
) -> list[tuple[list[int], list[int]]]:
    """Argmax predictions at the target positions under teacher forcing.

    Args:
        model: A causal LM.
        tok: Its tokenizer.
        prompts: Prompts.
        targets: One target per prompt.
        batch_size: Examples per forward pass (right-padded; results do not depend on it).

    Returns:
        Per example ``(predicted_ids, target_ids)``, both of length len(target_ids): the argmax of the logits at
        the position before each target token, and the target tokens.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts and {len(targets)} targets; they must pair up")
    device = _model_device(model)
    pad_id = pad_token_id(tok)
    pairs = [prompt_target_ids(tok, p, t) for p, t in zip(prompts, targets)]
    out: list[tuple[list[int], list[int]]] = []
    with _eval_mode(model):
        for rows in _chunks(len(pairs), batch_size):
            seqs = [pairs[i][0] + pairs[i][1] for i in rows]
            batch = collate([(s, s) for s in seqs], pad_id)  # right-padded; labels unused here
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            pred = logits.argmax(-1).cpu()
            for r, i in enumerate(rows):
                p, t = pairs[i]
                out.append((pred[r, len(p) - 1: len(p) - 1 + len(t)].tolist(), t))
    return out


def teacher_forced_accuracy(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """EasyEdit's ``token_em``: per example, the share of target tokens predicted by argmax under teacher forcing.

    Args:
        model: A causal LM.
        tok: Its tokenizer.
        prompts: Prompts (edit prompts, rephrases or locality prompts).
        targets: One target per prompt (``target_new``, or the locality ground truth for teacher-forced locality).
        batch_size: Examples per forward pass.

    Returns:
        One accuracy in [0, 1] per example.
    """
    preds = teacher_forced_predictions(model, tok, prompts, targets, batch_size=batch_size)
    return [sum(int(a == b) for a, b in zip(p, t)) / len(t) for p, t in preds]


def locality_token_agreement(preds_before: Sequence[Sequence[int]], preds_after: Sequence[Sequence[int]]) -> float:
    """EasyEdit's teacher-forced locality: mean over examples of the share of argmax tokens left unchanged.

    Args:
        preds_before: Per example the argmax ids at the locality answer positions of the unedited model
            (``[p for p, _ in teacher_forced_predictions(...)]``).
        preds_after: The same for the edited model.

    Returns:
        The mean agreement in [0, 1].
    """
    if len(preds_before) != len(preds_after) or not preds_before:
        raise ValueError(f"need the same non-zero number of examples, got {len(preds_before)} and {len(preds_after)}")
    per = []
    for a, b in zip(preds_before, preds_after):
        if len(a) != len(b) or not a:
            raise ValueError(f"prediction lengths differ or are empty: {len(a)} vs {len(b)}")
        per.append(sum(int(x == y) for x, y in zip(a, b)) / len(a))
    return sum(per) / len(per)


def teacher_forced_scores(
    model: torch.nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    pre: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """EasyEdit-style teacher-forced metrics of a set of requests, without EasyEdit.

    Args:
        model: The (edited) causal LM.
        tok: Its tokenizer.
        requests: EasyEdit requests (``prompt``, ``target_new``, optional ``rephrase_prompt`` and ``locality``).
        pre: The result of ``teacher_forced_scores`` for the unedited model on the same requests; gives
            ``locality_acc`` (EasyEdit's locality: argmax agreement at the locality answer positions).
        batch_size: Examples per forward pass.

    Returns:
        ``rewrite_acc`` (mean token accuracy of ``target_new`` after the prompt), ``rephrase_acc`` (after the
        rephrase; None when no request has one), ``n_rephrase``, ``locality_truth_acc`` (token accuracy of the
        locality ground truth, e.g. ZsRE's ``loc_ans``; None without locality prompts), ``locality_acc`` (None
        without ``pre``), ``n_locality``, ``rewrite`` / ``rephrase`` (per request; None where no rephrase) and
        ``locality_predictions`` (per locality prompt, the argmax ids; what ``pre`` needs). Locality means are over
        locality prompts.
    """
    if not requests:
        raise ValueError("teacher_forced_scores needs at least one request")
    targets = [r["target_new"] for r in requests]
    rewrite = teacher_forced_accuracy(model, tok, [r["prompt"] for r in requests], targets, batch_size=batch_size)
    reph_idx = [i for i, r in enumerate(requests) if r.get("rephrase_prompt")]
    reph_acc = teacher_forced_accuracy(model, tok, [requests[i]["rephrase_prompt"] for i in reph_idx],
                                       [targets[i] for i in reph_idx], batch_size=batch_size) if reph_idx else []
    rephrase: list[float | None] = [None] * len(requests)
    for i, a in zip(reph_idx, reph_acc):
        rephrase[i] = a
    loc = [pair for r in requests for pair in locality_pairs(r)]
    loc_preds = teacher_forced_predictions(model, tok, [p for p, _ in loc], [g for _, g in loc],
                                           batch_size=batch_size) if loc else []
    truth = [sum(int(a == b) for a, b in zip(p, t)) / len(t) for p, t in loc_preds]
    predictions = [p for p, _ in loc_preds]
    locality_acc = None
    if pre is not None:
        locality_acc = locality_token_agreement(pre["locality_predictions"], predictions) if loc else None
    return {
        "rewrite_acc": sum(rewrite) / len(rewrite),
        "rephrase_acc": (sum(reph_acc) / len(reph_acc)) if reph_acc else None,
        "n_rephrase": len(reph_acc),
        "locality_truth_acc": (sum(truth) / len(truth)) if truth else None,
        "locality_acc": locality_acc,
        "n_locality": len(loc),
        "rewrite": rewrite,
        "rephrase": rephrase,
        "locality_predictions": predictions,
    }


# ----------------------------------------------------------------------------------------------------------------
# Capability metrics against the unedited model
# ----------------------------------------------------------------------------------------------------------------
def _batch_tensors(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in batch:
        raise KeyError(f"a capability batch needs 'input_ids' (and optionally 'attention_mask'); got {list(batch)}")
    input_ids = batch["input_ids"].to(device)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (n, T), got {tuple(input_ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    return input_ids, mask


def _logits(
    model: torch.nn.Module | Callable[[Batch], torch.Tensor], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (n, T, V) and mask (n, T) of a batch; positions follow the mask (left or right padding)."""
    if isinstance(model, torch.nn.Module):
        input_ids, mask = _batch_tensors(batch, _model_device(model))
        with _eval_mode(model):
            logits = model(**model_inputs(model, input_ids, mask)).logits
    else:
        logits = model(batch)
        _, mask = _batch_tensors(batch, logits.device)
    if logits.shape[:2] != mask.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch {tuple(mask.shape)}")
    return logits.float(), mask.bool()


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[Batch], show_progress: bool = True) -> float:
    """Token-weighted perplexity over the non-pad positions of a set of batches.

    Args:
        model: A causal LM.
        batches: Dicts with ``input_ids`` (n, T) and optionally ``attention_mask`` (n, T); left or right padding.
        show_progress: Show a tqdm bar.

    Returns:
        ``exp(sum of -log p(x_{t+1} | x_{<=t}) / count)`` over every pair of consecutive real tokens.
    """
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not show_progress, leave=False):
        logits, mask = _logits(model, batch)
        input_ids = batch["input_ids"].to(logits.device)
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        keep = mask[:, :-1] & mask[:, 1:]
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("perplexity needs at least one pair of consecutive non-pad tokens; got none")
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


@dataclass
class ReferenceLogprobs:
    """Next-token log-probabilities of a reference (unedited) model at the real positions of each batch.

    Attributes:
        top_k: None when full distributions are kept, else the number of kept tokens per position.
        logprobs: Per batch, (m_b, V) full log-probs, or (m_b, k) top-k log-probs; fp32 on CPU. ``m_b`` is the
            number of real positions of the batch, in row-major order of the (n, T) mask.
        indices: Per batch, (m_b, k) vocabulary ids of the top-k entries (top-k only).
        rest_logprob: Per batch, (m_b,) log of the mass outside the top k (``-inf`` when it is zero; top-k only).
        counts: Per batch, m_b (checked against the batches at comparison time).
    """

    top_k: int | None
    logprobs: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    rest_logprob: list[torch.Tensor] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def _log_rest(logprobs: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the mass outside ``top_idx``: logsumexp over the other entries (no cancellation; ``-inf`` if none).

    Args:
        logprobs: (m, V) log-probabilities.
        top_idx: (m, k) indices of the kept entries.

    Returns:
        (m,) log rest mass.
    """
    return torch.logsumexp(logprobs.scatter(-1, top_idx, float("-inf")), dim=-1)


@torch.no_grad()
def next_token_logprobs(
    model: torch.nn.Module | Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    top_k: int | None = None,
    show_progress: bool = True,
) -> ReferenceLogprobs:
    """Store a reference model's next-token log-probs at every real position, batch by batch, on CPU.

    Memory: full distributions take 4 * V bytes per position (a 49k vocabulary: 200 kB per position); with
    ``top_k`` it is 12 * k + 4 bytes per position. The reference model can then be freed before the edited model is
    evaluated with ``kl_to_reference``.

    Args:
        model: The unedited model, or a function from a batch to logits (n, T, V).
        batches: Dicts with ``input_ids`` (n, T) and optionally ``attention_mask`` (n, T).
        top_k: None to keep full distributions; else keep the k most likely tokens and the rest mass.
        show_progress: Show a tqdm bar.

    Returns:
        A ``ReferenceLogprobs``.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    ref = ReferenceLogprobs(top_k=top_k)
    for batch in tqdm(batches, desc="reference log-probs", disable=not show_progress, leave=False):
        logits, mask = _logits(model, batch)
        logp = F.log_softmax(logits[mask], dim=-1)  # (m, V)
        ref.counts.append(int(logp.shape[0]))
        if top_k is None:
            ref.logprobs.append(logp.cpu())
        else:
            k = min(top_k, logp.shape[-1])
            vals, idx = logp.topk(k, dim=-1)
            ref.logprobs.append(vals.cpu())
            ref.indices.append(idx.cpu())
            ref.rest_logprob.append(_log_rest(logp, idx).cpu())
    return ref


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) along the last axis, with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


@torch.no_grad()
def kl_to_reference(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    reference: ReferenceLogprobs,
    show_progress: bool = True,
) -> float:
    """Mean over real positions of KL(p_reference || p_model) of next-token distributions.

    Args:
        model: The edited model.
        batches: The same batches, in the same order, as given to ``next_token_logprobs``.
        reference: The stored reference log-probs.
        show_progress: Show a tqdm bar.

    Returns:
        The mean KL in nats (top-k references: the KL of the (k + 1)-outcome coarse-graining, a lower bound).
    """
    total, count, b = 0.0, 0, -1
    for b, batch in enumerate(tqdm(batches, desc="KL", disable=not show_progress, leave=False)):
        if b >= len(reference.counts):
            raise ValueError(f"more batches than the reference holds ({len(reference.counts)})")
        logits, mask = _logits(model, batch)
        logq = F.log_softmax(logits[mask], dim=-1)  # (m, V)
        if logq.shape[0] != reference.counts[b]:
            raise ValueError(
                f"batch {b} has {logq.shape[0]} real positions but the reference has {reference.counts[b]}; "
                "pass the same batches in the same order"
            )
        logp = reference.logprobs[b].to(logq.device)
        if reference.top_k is None:
            if logp.shape != logq.shape:
                raise ValueError(f"reference log-probs {tuple(logp.shape)} do not match {tuple(logq.shape)}")
            kl = _kl_terms(logp, logq)
        else:
            idx = reference.indices[b].to(logq.device)
            logq_top = logq.gather(-1, idx)
            logq_rest = _log_rest(logq, idx)
            logp_rest = reference.rest_logprob[b].to(logq.device)
            kl = _kl_terms(torch.cat([logp, logp_rest[:, None]], -1), torch.cat([logq_top, logq_rest[:, None]], -1))
        total += float(kl.double().sum())
        count += int(kl.numel())
    if b + 1 != len(reference.counts):
        raise ValueError(f"got {b + 1} batches but the reference holds {len(reference.counts)}")
    if count == 0:
        raise ValueError("KL needs at least one real position; got none")
    return total / count


def mean_kl(
    model_before: torch.nn.Module | Callable[[Batch], torch.Tensor],
    model_after: torch.nn.Module,
    batches: Iterable[Batch],
    top_k: int | None = None,
    show_progress: bool = True,
) -> float:
    """Mean over real positions of KL(p_before || p_after), computed batch by batch.

    Args:
        model_before: The unedited model, or a function from a batch to its logits (n, T, V).
        model_after: The edited model.
        batches: Dicts with ``input_ids`` (n, T) and optionally ``attention_mask`` (n, T); iterated twice.
        top_k: Optional top-k storage of the reference (see ``next_token_logprobs``).
        show_progress: Show tqdm bars.

    Returns:
        The mean KL in nats.
    """
    batches = list(batches)
    ref = next_token_logprobs(model_before, batches, top_k=top_k, show_progress=show_progress)
    return kl_to_reference(model_after, batches, ref, show_progress=show_progress)


# ----------------------------------------------------------------------------------------------------------------
# Optional: lm-evaluation-harness
# ----------------------------------------------------------------------------------------------------------------
def lm_eval_scores(
    model: torch.nn.Module,
    tok: Any,
    tasks: Sequence[str],
    limit: int | float | None = 200,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on the in-memory model (the paper: 200 samples per task).

    Args:
        model: The causal LM (used in place through lm_eval's ``HFLM``).
        tok: Its tokenizer.
        tasks: lm_eval task names, e.g. ``["mmlu", "gsm8k_cot", "ifeval", "arc_challenge", "truthfulqa_mc2"]``.
        limit: Samples per task (None = all).
        num_fewshot: Few-shot examples (None = each task's default).
        batch_size: lm_eval batch size.

    Returns:
        ``{"results": lm_eval's per-task results, "config": {tasks, limit, num_fewshot, lm_eval_version}}``.

    Raises:
        ImportError: When lm-evaluation-harness is not installed (``pip install lm-eval``).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            "lm_eval_scores needs lm-evaluation-harness, which is not installed: pip install lm-eval"
        ) from err
    if not tasks:
        raise ValueError("tasks must name at least one lm_eval task")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    return {
        "results": out["results"],
        "config": {
            "tasks": list(tasks),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        },
    }
