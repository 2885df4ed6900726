"""Teacher-forced metrics: EasyEdit's token_em (rewrite, rephrase, locality) without EasyEdit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...editing import IGNORE_INDEX, collate, pad_token_id, tokenize_edit
from .common import chunks, eval_mode, model_device
from .wild import locality_pairs

logger = logging.getLogger(__name__)


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
    device = model_device(model)
    pad_id = pad_token_id(tok)
    pairs = [prompt_target_ids(tok, p, t) for p, t in zip(prompts, targets)]
    out: list[tuple[list[int], list[int]]] = []
    with eval_mode(model):
        for rows in chunks(len(pairs), batch_size):
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
