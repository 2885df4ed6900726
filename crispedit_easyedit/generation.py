"""Greedy decoding in batches with a KV cache, each row leaving the batch as soon as its answer is finished.

``model.generate`` keeps every row of a batch until the last one stops, so one long answer makes the whole batch
pay for 40 decoding steps; here a finished row is dropped from the batch and from the cache at once, so the work is
the sum of the answers' lengths. Leading tokens that all prompts of a batch share (a chat template's system prompt)
are computed once and their cache copied to every row. Prompts are sorted by length and left-padded (after the
shared prefix); positions follow the attention mask, so an answer does not depend on the batch it was decoded in (up
to floating-point reassociation). A model without a KV cache is given the whole sequence at every step. This module
never imports EasyEdit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature import input_device, position_ids_from_mask

MIN_SHARED_PREFIX = 4
"""A batch's common leading tokens are computed once when there are at least this many (else with the rows)."""


def stop_token_ids(model: nn.Module, tok) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS id(s), sorted."""
    ids = [tok.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded batch.

    Returns:
        ``input_ids`` (n, T) int64 with ``pad_id`` in front of shorter rows, and ``attention_mask`` (n, T) int64
        (1 on real tokens), T the longest row's length.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _logits_options(parameters: set[str]) -> dict[str, int]:
    """Keep only the last position's logits where the forward allows it (the name changed across transformers)."""
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


def _cache_of(output):
    """The KV cache a forward returned (``cache`` in transformers >= 5.2x, ``past_key_values`` before), or None."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def _keep_rows(past, rows: torch.Tensor):
    """The KV cache restricted to ``rows`` (a ``transformers`` Cache in place, or legacy (key, value) tuples)."""
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(rows)
        return past
    return tuple(tuple(t[rows] for t in layer) for layer in past)


def _repeat_rows(past, n: int):
    """A batch-1 KV cache repeated to ``n`` rows (a ``transformers`` Cache in place, or legacy tuples)."""
    if hasattr(past, "batch_repeat_interleave"):
        past.batch_repeat_interleave(n)
        return past
    return tuple(tuple(t.expand(n, *t.shape[1:]).contiguous() for t in layer) for layer in past)


def _shared_prefix(forward, batch: list[list[int]], device: torch.device) -> tuple[int, object]:
    """The batch's common leading tokens (chat templates share their system prompt) run once and cached.

    Returns:
        ``(length, cache)``: the prefix length and its KV cache repeated to every row, or ``(0, None)`` when the
        prefix is shorter than ``MIN_SHARED_PREFIX`` or the model keeps no cache. Every row keeps one token at least.
    """
    length = 0
    shortest = min(len(p) for p in batch)
    while length < shortest - 1 and all(p[length] == batch[0][length] for p in batch):
        length += 1
    if len(batch) < 2 or length < MIN_SHARED_PREFIX:
        return 0, None
    ids = torch.tensor([batch[0][:length]], device=device)
    cache = _cache_of(forward(ids, torch.ones_like(ids), torch.arange(length, device=device)[None], None))
    return (length, _repeat_rows(cache, len(batch))) if cache is not None else (0, None)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    batch_size: int = 16,
    is_finished: Callable[[list[int]], bool] | None = None,
    show_progress: bool = False,
) -> list[list[int]]:
    """Greedy new tokens after each prompt, up to and including the first stop id, at most ``max_new_tokens``.

    Args:
        model: A causal LM (``transformers``-style forward: ``input_ids``, ``attention_mask``, optionally
            ``position_ids`` and a KV cache as ``cache`` or ``past_key_values``; output with ``logits`` (n, t, V)).
        prompts: Token ids of each prompt (at least one token each).
        max_new_tokens: At most this many new tokens per prompt.
        stop_ids: Ids that end an answer (kept as its last token).
        pad_id: Id placed under the zero attention mask.
        batch_size: Prompts decoded together.
        is_finished: Optional test on a row's new ids so far (e.g. "its text holds a stop string"); a row for which
            it returns True leaves the batch.
        show_progress: Show a tqdm bar over batches.

    Returns:
        One list of new token ids per prompt, in input order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    device = input_device(model)
    stops = {int(i) for i in stop_ids}
    parameters = _forward_parameters(model)
    options = _logits_options(parameters)
    with_positions = "position_ids" in parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def forward(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past):
        kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=True, **options)
        if with_positions:
            kwargs["position_ids"] = positions
        if past is not None:
            kwargs[cache_argument] = past
        return model(**kwargs)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generate", disable=not show_progress, leave=False):
            rows = order[start : start + batch_size]
            batch = [list(prompts[i]) for i in rows]
            shared, past = _shared_prefix(forward, batch, device)
            suffix_ids, suffix_mask = (t.to(device) for t in left_pad([p[shared:] for p in batch], pad_id))
            prefix = torch.tensor(batch[0][:shared], dtype=torch.long, device=device).expand(len(rows), -1)
            input_ids = torch.cat([prefix, suffix_ids], dim=1)
            mask = torch.cat([suffix_mask.new_ones(len(rows), shared), suffix_mask], 1)
            positions = position_ids_from_mask(mask)
            pending_ids, pending_positions = suffix_ids, positions[:, shared:]
            while True:
                out = forward(pending_ids, mask, positions if past is None else pending_positions, past)
                past = _cache_of(out)
                next_ids = out.logits[:, -1].argmax(dim=-1)  # (n_active,)
                keep = []
                for j, (row, token) in enumerate(zip(rows, next_ids.tolist())):
                    answer = answers[row]
                    answer.append(token)
                    done = token in stops or len(answer) >= max_new_tokens or (is_finished and is_finished(answer))
                    if not done:
                        keep.append(j)
                if not keep:
                    break
                if len(keep) < len(rows):
                    kept = torch.tensor(keep, device=device)
                    rows = [rows[j] for j in keep]
                    input_ids, mask, positions, next_ids = input_ids[kept], mask[kept], positions[kept], next_ids[kept]
                    if past is not None:
                        past = _keep_rows(past, kept)
                input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                # with a cache only the new token is fed; without one, the whole sequence again
                pending_ids = next_ids[:, None] if past is not None else input_ids
                pending_positions = positions[:, -1:]
    finally:
        model.train(was_training)
    return answers
