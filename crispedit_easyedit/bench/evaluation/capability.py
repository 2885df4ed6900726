"""Capability metrics against the unedited model: perplexity, KL (full or top-k reference) in one pass, lm-eval."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...curvature import model_inputs
from .common import Batch, eval_mode, model_device

logger = logging.getLogger(__name__)


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
        input_ids, mask = _batch_tensors(batch, model_device(model))
        with eval_mode(model):
            logits = model(**model_inputs(model, input_ids, mask)).logits
    else:
        logits = model(batch)
        _, mask = _batch_tensors(batch, logits.device)
    if logits.shape[:2] != mask.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch {tuple(mask.shape)}")
    return logits.float(), mask.bool()


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


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) along the last axis, with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _row_groups(batch: Batch, max_positions: int) -> Iterator[tuple[Batch, int]]:
    """Consecutive rows of a batch with at most ``max_positions`` positions in all (at least one row), and the
    number of real positions before each group (its offset into the batch's row-major real positions)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    rows = max(1, max_positions // max(1, input_ids.shape[1]))
    offset = 0
    for start in range(0, input_ids.shape[0], rows):
        group = {"input_ids": input_ids[start : start + rows]}
        if mask is not None:
            group["attention_mask"] = mask[start : start + rows]
        yield group, offset
        offset += int(mask[start : start + rows].sum()) if mask is not None else group["input_ids"].numel()


@dataclass
class HeldoutScores:
    """What one pass over held-out batches measures.

    Attributes:
        perplexity: token-weighted perplexity over every pair of consecutive real tokens.
        kl: mean KL(p_reference || p_model) over real positions (nats), when a reference was given.
        reference: this model's next-token log-probs, when recording was asked for.
    """

    perplexity: float
    kl: float | None = None
    reference: ReferenceLogprobs | None = None


@torch.no_grad()
def heldout_scores(
    model: torch.nn.Module | Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    reference: ReferenceLogprobs | None = None,
    record_reference: bool = False,
    top_k: int | None = None,
    max_positions: int = 512,
    show_progress: bool = True,
) -> HeldoutScores:
    """Perplexity, KL to a reference and (optionally) the reference log-probs of this model, in one forward pass.

    Each batch is run in groups of consecutive rows of at most ``max_positions`` positions, so the full-vocabulary
    temporaries stay near ``max_positions * V * 4`` bytes each (a 49k vocabulary: 100 MB at 512) whatever the
    batch size; the result does not depend on the grouping.

    Args:
        model: A causal LM, or a function from a batch to logits (n, T, V).
        batches: Dicts with ``input_ids`` (n, T) and optionally ``attention_mask`` (n, T); left or right padding.
        reference: Log-probs of the unedited model on the same batches in the same order (``kl`` is then set).
        record_reference: Also return this model's log-probs (``reference``), full or top-k as ``top_k`` says.
        top_k: With ``record_reference``: None keeps full distributions (4 * V bytes per position), else the k most
            likely tokens and the rest mass (12 * k + 4 bytes per position).
        max_positions: Positions per forward.
        show_progress: Show a tqdm bar.

    Returns:
        A ``HeldoutScores``.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    nll_sum, nll_count, kl_sum, kl_count = 0.0, 0, 0.0, 0
    recorded = ReferenceLogprobs(top_k=top_k) if record_reference else None
    b = -1
    for b, batch in enumerate(tqdm(batches, desc="held-out text", disable=not show_progress, leave=False)):
        if reference is not None and b >= len(reference.counts):
            raise ValueError(f"more batches than the reference holds ({len(reference.counts)})")
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "indices": [], "rest": []}
        batch_positions = 0
        for group, offset in _row_groups(batch, max_positions):
            logits, mask = _logits(model, group)
            input_ids = group["input_ids"].to(logits.device)
            logp_all = F.log_softmax(logits, dim=-1)  # (n, t, V)
            nll = -logp_all[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            keep = mask[:, :-1] & mask[:, 1:]
            nll_sum += float(nll[keep].double().sum())
            nll_count += int(keep.sum())
            logq = logp_all[mask]  # (m, V) real positions, row-major
            del logits, logp_all
            batch_positions += logq.shape[0]
            if reference is not None:
                kl = _kl_to_slice(logq, reference, b, offset)
                kl_sum += float(kl.double().sum())
                kl_count += int(kl.numel())
            if recorded is not None:
                if top_k is None:
                    parts["logprobs"].append(logq.cpu())
                else:
                    vals, idx = logq.topk(min(top_k, logq.shape[-1]), dim=-1)
                    parts["logprobs"].append(vals.cpu())
                    parts["indices"].append(idx.cpu())
                    parts["rest"].append(_log_rest(logq, idx).cpu())
        if reference is not None and batch_positions != reference.counts[b]:
            raise ValueError(
                f"batch {b} has {batch_positions} real positions but the reference has {reference.counts[b]}; "
                "pass the same batches in the same order"
            )
        if recorded is not None:
            recorded.counts.append(batch_positions)
            recorded.logprobs.append(torch.cat(parts["logprobs"]))
            if top_k is not None:
                recorded.indices.append(torch.cat(parts["indices"]))
                recorded.rest_logprob.append(torch.cat(parts["rest"]))
    if reference is not None and b + 1 != len(reference.counts):
        raise ValueError(f"got {b + 1} batches but the reference holds {len(reference.counts)}")
    if nll_count == 0:
        raise ValueError("perplexity needs at least one pair of consecutive non-pad tokens; got none")
    if reference is not None and kl_count == 0:
        raise ValueError("KL needs at least one real position; got none")
    return HeldoutScores(
        perplexity=float(torch.exp(torch.tensor(nll_sum / nll_count, dtype=torch.float64))),
        kl=kl_sum / kl_count if reference is not None else None,
        reference=recorded,
    )


def _kl_to_slice(logq: torch.Tensor, reference: ReferenceLogprobs, b: int, offset: int) -> torch.Tensor:
    """Per-position KL(reference || model) of the model's log-probs ``logq`` (m, V) against the reference's rows
    ``offset .. offset + m`` of batch ``b``."""
    rows = slice(offset, offset + logq.shape[0])
    logp = reference.logprobs[b][rows].to(logq.device)
    if logp.shape[0] != logq.shape[0]:
        raise ValueError(f"batch {b} has more real positions than the reference holds ({reference.counts[b]}); "
                         "pass the same batches in the same order")
    if reference.top_k is None:
        if logp.shape != logq.shape:
            raise ValueError(f"reference log-probs {tuple(logp.shape)} do not match {tuple(logq.shape)}")
        return _kl_terms(logp, logq)
    idx = reference.indices[b][rows].to(logq.device)
    logp_rest = reference.rest_logprob[b][rows].to(logq.device)
    return _kl_terms(torch.cat([logp, logp_rest[:, None]], -1),
                     torch.cat([logq.gather(-1, idx), _log_rest(logq, idx)[:, None]], -1))


def perplexity(model: torch.nn.Module, batches: Iterable[Batch], show_progress: bool = True) -> float:
    """Token-weighted perplexity over the non-pad positions of a set of batches.

    Args:
        model: A causal LM.
        batches: Dicts with ``input_ids`` (n, T) and optionally ``attention_mask`` (n, T); left or right padding.
        show_progress: Show a tqdm bar.

    Returns:
        ``exp(sum of -log p(x_{t+1} | x_{<=t}) / count)`` over every pair of consecutive real tokens.
    """
    return heldout_scores(model, batches, show_progress=show_progress).perplexity


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
    return heldout_scores(model, batches, record_reference=True, top_k=top_k, show_progress=show_progress).reference


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
    return heldout_scores(model, batches, reference=reference, show_progress=show_progress).kl


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
