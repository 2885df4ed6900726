"""Edit positions: where an edit's gradient may reach the edited weights.

Fine-tuning a down-projection on prompt -> target changes the MLP's output at *every* position of the prompt, and
the cheapest way to lower the loss is often through the last tokens ("... is located in"), which other subjects
share: the edit then rewrites the relation for every subject (CounterFact's neighbourhood prompts). ROME and MEMIT
key an edit on the subject instead: they change the MLP output only at the subject's last token. With
``CrispEditHyperParams.edit_positions`` = ``"subject_last"`` the edit's gradient reaches each edited weight only
through that position of every training example (the forward pass is unchanged; at every other position the edited
layer's output is detached), so the weight change is spanned by the subject keys' activations,
dW = sum over examples of delta_key x_key^T, and still projected onto the low-curvature subspace. Retain examples
keep every position. This module never imports EasyEdit or the experiment side.

That gradient is not the gradient of the loss the forward pass computes: the changed weights act at every position
of the forward, and what they do at the other positions (the template's tokens, the answer's own tokens) moves the
loss without reaching the gradient. Adam then follows a direction that stops being a descent direction once the
change is large: on 30 ZsRE tuning edits in three formats at lr 5e-3 the epoch loss fell to 0.35 and rose to 1.03,
and 100 edits diverged at lr 2e-3 and 1e-3. ``edit_positions`` = ``"subject_last_only"`` makes objective and
gradient agree: during training the weight change acts only at the subject's last token (the other positions see
the weights the training started from, :func:`edit_only_at`), the way ROME and MEMIT optimise their value vector at
the subject; the same 30 edits then fall at every epoch, to 0.016. The edited model applies the change everywhere,
as ROME/MEMIT's do, and training never sees what it does at the other positions: on 100 format-trained ZsRE edits
the training loss reached 0.03 while the edited model held 0.30 of the target tokens, at perplexity +18 %
(benchmarks/README.md, issue 9). ``context_null_space_energy`` (:mod:`crispedit_easyedit.context_null_space`)
constrains the change at the edit prompts' other positions so that the model deployed is the model trained.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .templates import prompt_text


def subject_last_token(tok: Any, text: str, subject: str, add_special_tokens: bool) -> int:
    """Index of the token that holds the last character of the last occurrence of ``subject`` in ``text`` (case
    folded), in ``tok(text, add_special_tokens=add_special_tokens)``.

    Raises:
        ValueError: ``subject`` is empty or not in ``text``, or the tokenizer gives no character offsets.
    """
    start = text.casefold().rfind(subject.casefold()) if subject.strip() else -1
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {text!r}")
    last = start + len(subject) - 1
    try:
        offsets = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"edit_positions 'subject_last' needs a fast tokenizer with character offsets; "
                         f"{type(tok).__name__} gives none ({exc})") from exc
    for index, (begin, end) in enumerate(offsets):
        if begin <= last < end:
            return index
    raise ValueError(f"no token of {text!r} covers the subject {subject!r}")


def key_position(tok: Any, request: Mapping[str, Any], fmt: str, example: tuple[list[int], list[int]],
                 ignore_index: int) -> int:
    """The subject's last token in a training ``example`` of ``request`` in format ``fmt`` (as
    ``editing.tokenize_edit_formatted`` built it, the prompt possibly cut from the left to fit ``max_length``).

    Raises:
        ValueError: the request has no subject in its prompt (naming both), or the cut removed the subject.
    """
    from .editing import formatted_prompt_ids

    subject = request.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"edit_positions 'subject_last' needs each request's 'subject' (a non-empty string in its "
                         f"prompt); got {subject!r} for prompt {request.get('prompt')!r}")
    text = prompt_text(tok, request["prompt"], fmt)
    index = subject_last_token(tok, text, subject, add_special_tokens=fmt != "chat")
    ids, labels = example
    prompt_length = next((i for i, label in enumerate(labels) if label != ignore_index), len(labels))
    cut = len(formatted_prompt_ids(tok, request["prompt"], fmt)) - prompt_length
    if index - cut < 0:
        raise ValueError(f"max_length cuts the subject {subject!r} off the prompt {request['prompt']!r}; raise "
                         f"max_length")
    return index - cut


def key_mask(positions: Sequence[int], shape: tuple[int, int]) -> torch.Tensor:
    """(batch, T) bool mask, True at one position per row."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[torch.arange(len(positions)), torch.as_tensor(list(positions), dtype=torch.long)] = True
    return mask


@contextmanager
def gradient_only_at(modules: Sequence[nn.Module], mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the forward outputs of ``modules`` (batch, T, d) pass gradient only at the positions where
    ``mask`` (batch, T) is True; their values are unchanged. ``mask`` None: no effect."""
    if mask is None:
        yield
        return

    def hook(module, inputs, output):
        keep = mask.to(output.device).unsqueeze(-1)
        return torch.where(keep, output, output.detach())

    with forward_hooks(modules, hook):
        yield


def _linear_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """A linear layer's output (..., d_out) for input ``x`` (..., d_in) and ``weight`` as the layer stores it:
    (d_out, d_in) for ``nn.Linear``, (d_in, d_out) when ``transposed`` (GPT-2's Conv1D)."""
    out = x @ weight.to(x.dtype) if transposed else F.linear(x, weight.to(x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


@contextmanager
def edit_only_at(modules: Sequence[nn.Module], mask: torch.Tensor | None,
                 starting_weights: Sequence[tuple[torch.Tensor, bool]]) -> Iterator[None]:
    """Within the block, the forward outputs of the linear ``modules`` (batch, T, d_out) are those of their current
    weights where ``mask`` (batch, T) is True and those of ``starting_weights`` elsewhere (one (weight, transposed)
    per module, the weight as the module stores it, e.g. the weights before the edit): the weight change acts only at
    the masked positions, so the loss computed is that of the change applied there and its gradient is exact.
    ``mask`` None: no effect."""
    if mask is None:
        yield
        return
    starts = {id(module): start for module, start in zip(modules, starting_weights, strict=True)}

    def hook(module, inputs, output):
        weight, transposed = starts[id(module)]
        base = _linear_output(inputs[0], weight, getattr(module, "bias", None), transposed)
        return torch.where(mask.to(output.device).unsqueeze(-1), output, base.to(output.dtype))

    with forward_hooks(modules, hook):
        yield


@contextmanager
def forward_hooks(modules: Sequence[nn.Module], hook) -> Iterator[None]:
    """``hook`` registered as a forward hook of every module for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
