"""CrispEdit (Algorithm 1) and CrispEdit-Seq (Algorithm 2) on (model, tokenizer, requests, hparams).

Data flow: requests -> token ids and label masks -> model -> gradients of the edit weights -> projector ->
projected Adam step -> edited weights. The curvature comes in from the side: corpus -> K-FAC factors (cached) ->
Kronecker eigenbasis -> projector.

``requests`` are EasyEdit request dicts; only ``prompt`` and ``target_new`` are used for training. ``hparams`` is a
:class:`crispedit_easyedit.hparams.CrispEditHyperParams` (any object with the same attributes works).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .chat_corpus import chat_questions
from .checks import check_finite_step
from .context_null_space import ContextNullSpace, ExactIntersection, context_null_spaces, then_context
from .context_prefixes import prefixed_requests, sample_context_prefixes
from .curvature import (
    FACTOR_DTYPES, FactorSet, check_factors, check_positions, collect_kfac_factors, input_device, model_fingerprint,
    model_inputs, resolve_module, shard_batches, weight_orientation,
)
from .key_positions import edit_only_at, gradient_only_at, key_mask, key_position
from .optim import ProjectedAdam, leak_fraction
from .precision import gradient_projection_dtype
from .projector import Eigenbasis, KroneckerProjector, kfac_quadratic_form
from .retain import retain_examples
from .templates import chat_answer_suffix, prompt_text

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------------
# Requests -> token ids


def _needs_space(prompt: str, target: str) -> bool:
    return bool(prompt) and not prompt[-1].isspace() and not target[:1].isspace()


def validate_requests(requests: Any) -> None:
    """Check EasyEdit request dicts before any work: a non-empty sequence of mappings, each with a non-empty string
    ``prompt`` and ``target_new``.

    Raises:
        ValueError: naming the request index, the field and the value found.
    """
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
        raise ValueError(f"requests must be a list of request dicts with 'prompt' and 'target_new', got a "
                         f"{type(requests).__name__}")
    if not requests:
        raise ValueError("no edit requests given")
    for index, request in enumerate(requests):
        if not isinstance(request, Mapping):
            raise ValueError(f"request {index} must be a dict with 'prompt' and 'target_new', got a "
                             f"{type(request).__name__}: {request!r:.80}")
        for key in ("prompt", "target_new"):
            if key not in request:
                raise ValueError(f"request {index} has no {key!r} (it has {sorted(map(str, request))})")
            value = request[key]
            if not isinstance(value, str):
                raise ValueError(f"request {index}: {key} must be a string, got {type(value).__name__} {value!r:.80}")
            if not value.strip():
                raise ValueError(f"request {index}: {key} is empty ({value!r}); give a non-empty string")


def tokenize_edit(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target and their labels (IGNORE_INDEX on the prompt).

    Prompt and target are tokenised separately and joined as ids, so the boundary is exact; a leading space is
    added to the target when neither the prompt ends in white space nor the target starts with it (BPE tokenizers
    mark word starts with it). The prompt keeps the tokenizer's BOS if it adds one; a trailing EOS added by the
    tokenizer to the prompt is dropped. If the sequence is longer than ``max_length``, the prompt is cut from the left.

    Returns:
        (input_ids, labels), two lists of equal length.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target_new: it must be a non-empty string, got {target!r} (prompt {prompt!r})")
    prompt_ids = formatted_prompt_ids(tok, prompt, "raw")
    target_text = (" " + target) if _needs_space(prompt, target) else target
    target_ids = list(tok(target_text, add_special_tokens=False)["input_ids"])
    if len(target_ids) > 1 and tok.convert_ids_to_tokens(target_ids[0]) == "\u2581":  # SentencePiece lone "▁"
        target_ids = target_ids[1:]
    return _join(prompt_ids, target_ids, max_length, target)


def _join(prompt_ids: list[int], target_ids: list[int], max_length: int, target: str) -> tuple[list[int], list[int]]:
    """prompt + target ids and labels, the prompt cut from the left to fit ``max_length``."""
    if len(target_ids) >= max_length:
        raise ValueError(f"target {target!r} has {len(target_ids)} tokens, more than max_length={max_length} - 1")
    prompt_ids = prompt_ids[-(max_length - len(target_ids)):]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def tokenize_edit_formatted(tok, prompt: str, target: str, fmt: str, max_length: int,
                            eos_after_target: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of one edit rendered in a training format (:mod:`crispedit_easyedit.templates`).

    "raw", "qa" and format strings render the prompt text and go through :func:`tokenize_edit` (so "raw" is exactly
    the unformatted example); with ``eos_after_target`` the tokenizer's EOS follows the target and is learned too.
    "chat" tokenises the chat template's generation prompt (without special tokens: the template writes them) and,
    as the labelled part, the assistant turn: the target plus the template's end-of-turn marker.

    Returns:
        (input_ids, labels), two lists of equal length; labels are IGNORE_INDEX except on the learned tokens.
    """
    if fmt != "chat":
        ids, labels = tokenize_edit(tok, prompt_text(tok, prompt, fmt), target, max_length - int(eos_after_target))
        if eos_after_target and tok.eos_token_id is not None:
            ids, labels = ids + [int(tok.eos_token_id)], labels + [int(tok.eos_token_id)]
        return ids, labels
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target_new: it must be a non-empty string, got {target!r} (prompt {prompt!r})")
    question = prompt.rstrip()
    target_ids = list(tok(chat_answer_suffix(tok, question, target.strip()), add_special_tokens=False)["input_ids"])
    return _join(formatted_prompt_ids(tok, prompt, "chat"), target_ids, max_length, target)


def formatted_prompt_ids(tok, prompt: str, fmt: str) -> list[int]:
    """The token ids a training format puts before the answer, as :func:`tokenize_edit_formatted` joins them.

    "chat": the template's generation prompt without added special tokens (the template writes them); otherwise
    the formatted text with the tokenizer's special tokens, a trailing EOS dropped.
    """
    if fmt == "chat":
        return list(tok(prompt_text(tok, prompt, "chat"), add_special_tokens=False)["input_ids"])
    ids = list(tok(prompt_text(tok, prompt, fmt), add_special_tokens=True)["input_ids"])
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if ids and eos is not None and ids[-1] == eos and eos != bos:
        ids = ids[:-1]
    return ids


def train_formats(hparams) -> list[str]:
    """The formats each edit is trained in: ``hparams.train_formats``, ["raw"] when unset (EasyEdit-style hparams)."""
    return list(getattr(hparams, "train_formats", None) or ["raw"])


def edit_examples(tok, requests: Sequence[Mapping[str, Any]], hparams,
                  formats: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """The training examples of ``requests``: one per request and format of ``formats`` (default
    ``hparams.train_formats``, itself ``["raw"]`` by default), request-major (all formats of request 0, then
    request 1, ...)."""
    formats = list(formats) if formats is not None else train_formats(hparams)
    eos = bool(getattr(hparams, "train_eos", False))
    return [tokenize_edit_formatted(tok, r["prompt"], r["target_new"], fmt, hparams.max_length, eos)
            for r in requests for fmt in formats]


def edit_key_positions(tok, requests: Sequence[Mapping[str, Any]], hparams,
                       examples: Sequence[tuple[list[int], list[int]]],
                       formats: Sequence[str] | None = None) -> list[int] | None:
    """The position of each example of :func:`edit_examples` (same requests and formats) through which its gradient
    reaches the edit weights: the subject's last token under ``hparams.edit_positions`` "subject_last"
    (:mod:`crispedit_easyedit.key_positions`), None for "all" (every position).

    Raises:
        ValueError: a request without its subject in its prompt, naming it.
    """
    if getattr(hparams, "edit_positions", "all") == "all":
        return None
    formats = list(formats) if formats is not None else train_formats(hparams)
    pairs = [(r, fmt) for r in requests for fmt in formats]
    positions = []
    for index, ((request, fmt), example) in enumerate(zip(pairs, examples)):
        try:
            positions.append(key_position(tok, request, fmt, example, IGNORE_INDEX))
        except ValueError as exc:
            raise ValueError(f"request {index // len(formats)}: {exc}") from exc
    return positions


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
            keys: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into (batch, T) ``input_ids``, ``attention_mask`` and ``labels`` tensors, and with
    ``keys`` (one position per example) a (batch, T) bool ``key_mask`` (:func:`key_positions.key_mask`).

    The pad id only fills masked positions, so any id (e.g. EOS) works and the vocabulary never grows.
    """
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if keys is not None:
        batch["key_mask"] = key_mask(keys, tuple(input_ids.shape))
    return batch


def pad_token_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (only ever placed under a zero attention mask)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def edit_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens of a batch, and the number of target tokens.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` of shape (batch, T) on the model's device.
    """
    logits = model(**model_inputs(model, batch["input_ids"], batch["attention_mask"])).logits
    labels = batch["labels"][:, 1:].to(logits.device)  # the LM head's device, under device_map the last one
    logits = logits[:, :-1]
    counted = labels != IGNORE_INDEX
    n = int(counted.sum())
    log_probs = torch.log_softmax(logits[counted].float(), dim=-1)
    loss = -log_probs.gather(1, labels[counted][:, None]).mean()
    return loss, n


# ----------------------------------------------------------------------------------------------------------------
# Edit targets and capability curvature


@dataclass
class EditTarget:
    """One edited weight: its parameter path, the parameter, and whether it is stored as (d_in, d_out)."""

    name: str
    param: nn.Parameter
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in)."""
        rows, cols = self.param.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor of the parameter's storage shape as (d_out, d_in)."""
        return tensor.T if self.transposed else tensor


def edit_targets(model: nn.Module, hparams) -> list[EditTarget]:
    """The weights named by ``hparams.rewrite_module_tmp`` and ``hparams.layers``.

    Raises:
        KeyError: a named weight does not exist in the model (the message names it and the closest names).
    """
    params = dict(model.named_parameters())
    targets = []
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer)
        module = resolve_module(model, name)
        targets.append(EditTarget(name, params[name], weight_orientation(module)))
    return targets


def build_projectors(eigenbases: Mapping[str, Eigenbasis], targets: Sequence[EditTarget],
                     gamma: float, curvature_factors: str = "kfac") -> dict[str, KroneckerProjector]:
    """One Kronecker projector per edit weight from its eigenbasis (only the gamma-dependent mask is computed).

    ``curvature_factors`` (``choices.CURVATURE_FACTORS``): "kfac" uses A (x) S; "activation" uses A (x) I (the
    activation covariance alone, Adam-NSCL), so the projector removes the top-energy eigendirections of A.
    """
    if curvature_factors == "activation":
        eigenbases = {t.name: eigenbases[t.name].input_only() for t in targets}
    elif curvature_factors != "kfac":
        raise ValueError(f"curvature_factors must be one of 'kfac', 'activation'; got {curvature_factors!r}")
    return {t.name: KroneckerProjector.from_eigenbasis(eigenbases[t.name], gamma) for t in targets}


class _TransposedBasis:
    """A projector's eigenbasis seen from a weight stored as (d_in, d_out) (GPT-2 Conv1D), for mode "eigenbasis"."""

    def __init__(self, projector: KroneckerProjector):
        self.projector = projector
        self.mask = projector.mask

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """(d_in, d_out) storage-shaped tensor -> (d_out, d_in) eigen-coordinates."""
        return self.projector.rotate(Q.T)

    def unrotate(self, C: torch.Tensor) -> torch.Tensor:
        """(d_out, d_in) eigen-coordinates -> (d_in, d_out) storage-shaped tensor."""
        return self.projector.unrotate(C).T


def _projection_fn(target: EditTarget, projector: KroneckerProjector, mode: str):
    """What ProjectedAdam gets for one weight: the projection callable, or the eigenbasis in mode "eigenbasis"."""
    if mode == "eigenbasis":
        return _TransposedBasis(projector) if target.transposed else projector
    if target.transposed:
        return lambda tensor: projector.project(tensor.T).T
    return projector.project


def _exact_intersection_fn(target: EditTarget, projector: KroneckerProjector, space: ContextNullSpace):
    """The projection onto the intersection of the capability kept span and the context null space, for a tensor of
    the weight's storage shape (:class:`~crispedit_easyedit.context_null_space.ExactIntersection`)."""
    intersection = ExactIntersection(projector, space)
    logger.info("%s: exact intersection of dimension %d (%.1f %% of the capability's kept coordinates given up by "
                "grouping %d row prefixes)", target.name, intersection.dimension, 100 * intersection.dropped_share,
                len(intersection.groups))
    if target.transposed:
        return lambda tensor: intersection(tensor.T).T
    return intersection


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class EditReport:
    """What one CrispEdit call did; ``summary()`` is the one-line receipt that is logged.

    ``weights_status`` says how the weights at the start of the call related to the model's edit state (see
    :mod:`crispedit_easyedit.state`): "first", "base" (a fresh Algorithm 1), "continue" (CrispEdit-Seq across
    calls) or "foreign"; ``past_edits_protected`` counts the earlier edits of the sequence whose statistics were
    merged into the protected curvature. ``eigendecompositions`` counts the eigendecompositions of factor *sets*
    (all layers) done in this call, ``edit_statistics_collections`` the K-FAC collections over past edits.
    """

    num_edits: int
    epochs: int = 0
    steps: int = 0
    final_loss: float = float("nan")
    loss_history: list[float] = field(default_factory=list)
    projection_mode: str = "both"
    gradient_projection_dtype: str = ""
    gamma: float = 0.0
    chunks: int = 1
    weights_status: str = "first"
    past_edits_protected: int = 0
    curvature_source: str = ""
    eigendecompositions: int = 0
    edit_statistics_collections: int = 0
    retain_examples: int = 0
    context_prefixes: list[str] = field(default_factory=list)
    context_protected_directions: list[dict[str, int]] = field(default_factory=list)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    chunk_leak_fractions: list[dict[str, float]] = field(default_factory=list)
    predicted_loss_increase: float = 0.0
    seconds_curvature: float = 0.0
    seconds_editing: float = 0.0
    projectors: dict[str, KroneckerProjector] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        kept = ", ".join(f"{name.split('.')[2] if name.count('.') > 2 else name}:{info['kept_fraction']:.4f}"
                         for name, info in self.layers.items())
        mode = ("mode none (plain fine-tuning; the projector below is not applied)" if self.projection_mode == "none"
                else f"mode {self.projection_mode}")
        sequence = (f"continuing a sequence of {self.past_edits_protected} earlier edits"
                    if self.past_edits_protected else "fresh from the base weights")
        return (f"CrispEdit: {self.num_edits} edits, {self.chunks} chunk(s), {sequence} (weights: "
                f"{self.weights_status}), {self.epochs} epochs / {self.steps} steps, final loss "
                f"{self.final_loss:.4f}, {mode}, gamma {self.gamma}, kept fraction per layer [{kept}], predicted "
                f"capability-loss increase {self.predicted_loss_increase:.3g} nats/token, curvature "
                f"{self.curvature_source} ({self.seconds_curvature:.1f}s), {self.eigendecompositions} "
                f"eigendecomposition(s), {self.edit_statistics_collections} past-edit statistics collection(s), "
                f"{self.retain_examples} retain examples, {len(self.context_prefixes)} context prefixes, "
                f"{self._context_summary()}editing "
                f"{self.seconds_editing:.1f}s")

    def _context_summary(self) -> str:
        if not self.context_protected_directions:
            return ""
        most = max(n for chunk in self.context_protected_directions for n in chunk.values())
        return f"context null space up to {most} protected input directions per layer, "

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the projectors, which hold tensors, are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "projectors"}


def _batches(examples: Sequence[tuple[list[int], list[int]]], size: int, pad: int,
             keys: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[i : i + size], pad, None if keys is None else keys[i : i + size])
            for i in range(0, len(examples), size)]


def _per_edit(n_requests: int, bare: Sequence[tuple[list[int], list[int]]], bare_keys: Sequence[int] | None,
              extra: Sequence[tuple[list[int], list[int]]], extra_keys: Sequence[int] | None,
              ) -> list[list[tuple[tuple[list[int], list[int]], int | None]]]:
    """Each request's training examples with their key positions (None: every position): its examples in every
    train format (``bare``, request-major as :func:`edit_examples` makes them), then its prefixed raw example of
    this epoch (``extra``, one per request, or none)."""
    per_request = len(bare) // n_requests
    groups = []
    for index in range(n_requests):
        span = range(index * per_request, (index + 1) * per_request)
        group = [(bare[i], None if bare_keys is None else bare_keys[i]) for i in span]
        if extra:
            group.append((extra[index], None if extra_keys is None else extra_keys[index]))
        groups.append(group)
    return groups


def _edit_batches(groups: Sequence[Sequence[tuple[tuple[list[int], list[int]], int | None]]], size: int, pad: int,
                  keyed: bool) -> list[dict[str, torch.Tensor]]:
    """Minibatches of ``size`` edits, each with all of its examples (formats and context prefix; :func:`_per_edit`),
    so that the optimiser steps per epoch are ceil(edits / size) whatever the formats; ``keyed``: pass each
    example's key position to :func:`collate`."""
    batches = []
    for start in range(0, len(groups), size):
        pairs = [pair for group in groups[start : start + size] for pair in group]
        batches.append(collate([example for example, _ in pairs], pad,
                               [key for _, key in pairs] if keyed else None))
    return batches


def _retain_batches(retain: Sequence[tuple[list[int], list[int]]], size: int, pad: int,
                    generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless minibatches of the retain examples, reshuffled at every pass."""
    while True:
        order = torch.randperm(len(retain), generator=generator).tolist()
        yield from _batches([retain[i] for i in order], size, pad)


def _gradient_dtype(hparams, targets: Sequence[EditTarget]) -> torch.dtype | None:
    """``hparams.gradient_projection_dtype`` resolved on the edit weights' device (None: the eigenbasis' dtype)."""
    return gradient_projection_dtype(getattr(hparams, "gradient_projection_dtype", "basis"), targets[0].param.device)


def finetune_projected(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                       targets: Sequence[EditTarget], projectors: Mapping[str, KroneckerProjector] | None,
                       progress: bool = True,
                       retain: Sequence[tuple[list[int], list[int]]] = (),
                       prefixes: Sequence[str] = (),
                       starting_weights: Mapping[str, torch.Tensor] | None = None,
                       context_spaces: Mapping[str, ContextNullSpace] | None = None) -> tuple[int, int, list[float]]:
    """Fine-tune the target weights on prompt -> target_new with projected Adam (hparams.projection_mode).

    Up to ``hparams.num_steps`` epochs of shuffled minibatches of ``hparams.train_batch_size`` edits (each edit with
    all of its examples: one per train format, plus its prefixed example), with a fresh optimizer; stops early once the epoch's mean edit loss falls below ``hparams.early_stop_loss``. With ``retain``
    examples (:mod:`crispedit_easyedit.retain`) every step adds ``hparams.retain_weight`` times the loss of one
    minibatch of them. With context ``prefixes`` (:mod:`crispedit_easyedit.context_prefixes`) every epoch adds one
    raw example per edit, its prompt after a prefix drawn anew for that epoch. Under ``hparams.edit_positions``
    "subject_last" the edit loss reaches the edit weights only through each example's subject position
    (:mod:`crispedit_easyedit.key_positions`; retain examples keep every position); under "subject_last_only" the
    weight change also acts only there, every other position of the edit examples seeing ``starting_weights``
    (name -> the weight as stored; default: a copy of the weights at the start of this call). With
    ``context_spaces`` (name -> :class:`~crispedit_easyedit.context_null_space.ContextNullSpace`) the gradient's and
    the step's projections are each followed by the context null space's (``context_null_space_rounds`` times in
    turn), or under ``context_null_space_composition`` "exact" replaced by the projection onto the intersection.
    The caller handles requires_grad flags and restoration.

    Returns:
        (epochs run, optimizer steps, mean loss per epoch).

    Raises:
        NonFiniteError: a loss, gradient or step is NaN or inf (the weights may be changed; the caller restores).
    """
    device = input_device(model)  # the embedding's device (not an edited layer's, under device_map)
    bare_examples = edit_examples(tok, requests, hparams)
    bare_keys = edit_key_positions(tok, requests, hparams, bare_examples)
    key_modules = [resolve_module(model, t.name) for t in targets] if bare_keys is not None else []
    keyed = _keyed_forward(hparams, targets, key_modules, starting_weights)
    prefix_generator = torch.Generator().manual_seed(hparams.seed + 2)
    pad = pad_token_id(tok)
    mode = "none" if projectors is None else hparams.projection_mode
    projections = [None if projectors is None else _projection_fn(t, projectors[t.name], mode) for t in targets]
    low = _gradient_dtype(hparams, targets)
    gradient_projections = None if projectors is None or low is None else [
        _projection_fn(t, projectors[t.name].in_dtype(low), mode) for t in targets]
    if context_spaces and projectors is not None:
        if mode not in ("gradient", "update", "both"):
            raise ValueError(f"context_null_space_energy needs projection_mode 'gradient', 'update' or 'both', got "
                             f"{mode!r}")
        if getattr(hparams, "context_null_space_composition", "alternate") == "exact":
            projections = [_exact_intersection_fn(t, projectors[t.name], context_spaces[t.name]) for t in targets]
            gradient_projections = None  # gradient and step alike, in the basis dtype
        else:
            rounds = int(getattr(hparams, "context_null_space_rounds", 1))
            gradient_projections = [then_context(p, context_spaces[t.name], t.transposed, rounds)
                                    for p, t in zip(gradient_projections or projections, targets)]
            projections = [then_context(p, context_spaces[t.name], t.transposed, rounds)
                           for p, t in zip(projections, targets)]
    optimizer = ProjectedAdam([t.param for t in targets], projections, mode=mode, lr=hparams.lr,
                              weight_decay=hparams.weight_decay, gradient_projections=gradient_projections,
                              scaling=getattr(hparams, "adam_scaling", "elementwise"))
    generator = torch.Generator().manual_seed(hparams.seed)
    history: list[float] = []
    steps = 0
    size = hparams.train_batch_size
    retain_weight = float(getattr(hparams, "retain_weight", 0.0))
    retain_stream = (_retain_batches(retain, size, pad, torch.Generator().manual_seed(hparams.seed + 1))
                     if retain and retain_weight > 0 else None)
    bar = tqdm(range(hparams.num_steps), desc="CrispEdit epochs", unit="epoch", disable=not progress)
    for _ in bar:
        prefixed = prefixed_requests(requests, prefixes, prefix_generator)
        extra = edit_examples(tok, prefixed, hparams, formats=["raw"])
        extra_keys = None if bare_keys is None else edit_key_positions(tok, prefixed, hparams, extra, ["raw"])
        groups = _per_edit(len(requests), bare_examples, bare_keys, extra, extra_keys)
        order = torch.randperm(len(requests), generator=generator).tolist()
        total, count = 0.0, 0
        for batch in _edit_batches([groups[i] for i in order], size, pad, bare_keys is not None):
            batch = {key: value.to(device) for key, value in batch.items()}
            optimizer.zero_grad()
            with keyed(batch.pop("key_mask", None)):
                loss, n = edit_loss(model, batch)
            check_finite_step(loss.detach(), f"edit loss at step {steps + 1}")
            if retain_stream is None:
                loss.backward()
            else:
                kept = {key: value.to(device) for key, value in next(retain_stream).items()}
                retain_loss, _ = edit_loss(model, kept)
                check_finite_step(retain_loss.detach(), f"retain loss at step {steps + 1}")
                (loss + retain_weight * retain_loss).backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * n
            count += n
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if history[-1] < hparams.early_stop_loss:
            break
    optimizer.zero_grad()
    rise = loss_rise(history)
    if rise and getattr(hparams, "edit_positions", "all") == "subject_last":
        logger.warning("%s; under edit_positions 'subject_last' the gradient follows only the subject's last token "
                       "while the change acts at every position, so it is not the loss's gradient (a smaller lr, now "
                       "%g, only delays the rise); 'subject_last_only' trains the exact keyed loss", rise, hparams.lr)
    elif rise:
        logger.warning("%s; the step size is too large for this many steps: lower lr (now %g) or num_steps",
                       rise, hparams.lr)
    return len(history), steps, history


def _keyed_forward(hparams, targets: Sequence[EditTarget], modules: Sequence[nn.Module],
                   starting_weights: Mapping[str, torch.Tensor] | None):
    """The context (mask -> context manager) that keys a minibatch's forward on its ``key_mask`` under
    ``hparams.edit_positions``: :func:`~crispedit_easyedit.key_positions.gradient_only_at` for "subject_last",
    :func:`~crispedit_easyedit.key_positions.edit_only_at` with the starting weights for "subject_last_only"."""
    if getattr(hparams, "edit_positions", "all") != "subject_last_only":
        return lambda mask: gradient_only_at(modules, mask)
    given = starting_weights or {}
    starts = [(given[t.name] if t.name in given else t.param.detach().clone(), t.transposed) for t in targets]
    return lambda mask: edit_only_at(modules, mask, starts)


def chunk_context_null_spaces(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                              targets: Sequence[EditTarget]) -> dict[str, ContextNullSpace] | None:
    """The context null space of every edit weight (:mod:`crispedit_easyedit.context_null_space`) from the inputs
    at the other positions of ``requests``' training examples in every train format, at the current weights; None
    when ``hparams.context_null_space_energy`` is 0."""
    energy = float(getattr(hparams, "context_null_space_energy", 0.0))
    if not energy:
        return None
    examples = edit_examples(tok, requests, hparams)
    keys = edit_key_positions(tok, requests, hparams, examples)
    if keys is None:
        raise ValueError(f"context_null_space_energy {energy!r} needs a keyed edit_positions ('subject_last' or "
                         f"'subject_last_only'), got {getattr(hparams, 'edit_positions', 'all')!r}")
    batches = _batches(examples, hparams.train_batch_size, pad_token_id(tok), keys)
    modules = {t.name: resolve_module(model, t.name) for t in targets}
    return context_null_spaces(model, modules, batches, energy)


def loss_rise(history: Sequence[float], factor: float = 1.5, margin: float = 0.1) -> str | None:
    """Why an edit's training diverged, or None: the last epoch's mean edit loss ``history[-1]`` ended more than
    ``factor`` times and ``margin`` nats above the lowest epoch mean (Adam at too large a step, or following a gradient
    that is not the loss's, as under ``edit_positions`` "subject_last"; the edit then does not land, and the weights
    may have moved far: a 100-edit ZsRE run at lr 2e-3 rose 2.98 -> 6.05 with perplexity x7)."""
    if len(history) < 2:
        return None
    best = min(range(len(history)), key=history.__getitem__)
    last = history[-1]
    if last > factor * history[best] and last - history[best] > margin:
        return (f"the edit loss rose from {history[best]:.4f} (epoch {best + 1}) to {last:.4f} (epoch "
                f"{len(history)})")
    return None


def edit_statistics(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                    targets: Sequence[EditTarget], seed: int) -> FactorSet:
    """K-FAC statistics of a chunk's edits on the current (just edited) weights, for CrispEdit-Seq.

    With ``hparams.edit_kfac_on_full_sequence`` (default, paper App. E) every position of prompt+target counts,
    otherwise only the positions predicting target tokens; the first ``hparams.exclude_first_tokens`` positions of
    each sequence are left out as for the capability statistics. Batches of ``hparams.train_batch_size``.
    """
    examples = edit_examples(tok, requests, hparams)
    batches = []
    for batch in _batches(examples, hparams.train_batch_size, pad_token_id(tok)):
        labels = batch.pop("labels")
        if not hparams.edit_kfac_on_full_sequence:
            loss_mask = torch.zeros_like(labels, dtype=torch.bool)
            loss_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts target token t+1
            batch["loss_mask"] = loss_mask
        batches.append(batch)
    return collect_kfac_factors(  # sharded across ranks under torch.distributed, like the capability statistics
        model, [t.name for t in targets], shard_batches(batches), fisher_type=hparams.fisher_type,
        mc_samples=hparams.mc_samples,
        dtype=FACTOR_DTYPES[hparams.mom2_dtype], seed=seed, exclude_first_tokens=hparams.exclude_first_tokens,
        progress=False)


def apply_crispedit(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                    factors: FactorSet | None = None, progress: bool = True) -> EditReport:
    """Edit ``model`` in place with CrispEdit (Algorithm 1), or CrispEdit-Seq (Algorithm 2) in chunks of
    ``hparams.chunk_size`` and across calls.

    The model's edit state (:mod:`crispedit_easyedit.state`) supplies the capability curvature and its eigenbases,
    computed once at the base weights, and, when the weights are those the previous call left, the statistics of the
    earlier edits of the sequence. Only the edit weights change; every other parameter stays bit-identical. The edit
    applies fully or not at all: if anything raises, the edit weights and the edit state are restored before the
    error propagates. requires_grad flags and the training mode are restored in every case.

    Args:
        model: a causal LM (any dtype; optimizer math is fp32).
        tok: its tokenizer (padding side and pad token do not matter; the vocabulary is never changed).
        requests: EasyEdit request dicts with ``prompt`` and ``target_new``.
        hparams: CrispEditHyperParams.
        factors: capability K-FAC factors to use instead of the edit state's; the call then stands alone (no
            sequence across calls, nothing cached).

    Returns:
        An EditReport (also logged as a one-line receipt).

    Raises:
        ValueError: a bad request (naming its index and field), invalid hparams (they are validated again here, so
            a field set after construction is checked too), ``factors`` that lack an edited layer, or
            ``max_length`` beyond the model's positions; all before any work.
        NonFiniteError: the edit diverged (non-finite loss or step); the weights and state are restored.
        CurvatureError: the capability factors are not finite, symmetric and positive semi-definite.
    """
    from .state import CapabilityCurvature, EditState, UnrecordedChunk, _eigenbases_for, attach_state, layer_devices

    targets = check_edit_inputs(model, requests, hparams, factors)
    # a format the tokenizer cannot render, or a subject missing from its prompt, fails here, before any work
    edit_key_positions(tok, requests, hparams, edit_examples(tok, requests, hparams))
    if getattr(hparams, "retain_weight", 0.0):
        chat_questions(hparams.retain_source)  # so does a retain source that is not there
    names = [t.name for t in targets]
    originals = {t.name: t.param.detach().clone() for t in targets}
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    gradient_dtype = _gradient_dtype(hparams, targets) or FACTOR_DTYPES[hparams.mom2_dtype]
    report = EditReport(num_edits=len(requests), projection_mode=hparams.projection_mode,
                        gradient_projection_dtype=str(gradient_dtype).removeprefix("torch."),
                        gamma=hparams.energy_threshold)
    state, checkpoint = None, None
    try:
        started = time.perf_counter()
        if factors is None:
            state, status, fingerprint = attach_state(model, names)
        else:
            fingerprint = model_fingerprint(model, names)
            state, status = EditState(names, fingerprint), "first"
        checkpoint = state.checkpoint()
        if status in ("first", "base"):
            state.start_sequence()
        elif hparams.projection_mode != "none":
            report.edit_statistics_collections += int(state.record_unrecorded(model, tok, targets))
        if factors is None:
            curvature = state.capability(model, tok, hparams, targets, fingerprint, progress=progress)
        else:
            curvature = CapabilityCurvature(dict(factors.metadata), factors, _eigenbases_for(
                factors, layer_devices(targets), FACTOR_DTYPES[hparams.mom2_dtype]), "given", "computed")
        report.weights_status, report.past_edits_protected = status, state.num_edits
        report.curvature_source = curvature.source
        report.eigendecompositions = int(curvature.eigen_source == "computed")
        report.seconds_curvature = time.perf_counter() - started
        started = time.perf_counter()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        use_projection = hparams.projection_mode != "none"
        chunk = hparams.chunk_size or len(requests)
        chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
        projectors: dict[str, KroneckerProjector] = {}
        # the answers to keep are the model's own at the start of the call (empty unless retain_weight > 0)
        retain = retain_examples(model, tok, hparams, train_formats(hparams))
        report.retain_examples = len(retain)
        prefixes = (sample_context_prefixes(model, tok, hparams.context_prefixes, hparams.context_prefix_tokens,
                                            hparams.seed) if getattr(hparams, "context_prefixes", 0) else [])
        report.context_prefixes = prefixes
        for index, part in enumerate(chunks):
            eigenbases, fresh = state.protected_eigenbases(curvature, hparams, targets)
            report.eigendecompositions += int(fresh)
            projectors = build_projectors(eigenbases, targets, hparams.energy_threshold,
                                          getattr(hparams, "curvature_factors", "kfac"))
            start_of_chunk = {t.name: t.param.detach().clone() for t in targets}
            context_spaces = chunk_context_null_spaces(model, tok, part, hparams, targets) if use_projection else None
            if context_spaces:
                report.context_protected_directions.append(
                    {name: space.protected_directions for name, space in context_spaces.items()})
            for t in targets:
                t.param.requires_grad_(True)
            epochs, steps, history = finetune_projected(
                model, tok, part, hparams, targets, projectors if use_projection else None, progress, retain,
                prefixes, start_of_chunk, context_spaces)
            for t in targets:
                t.param.requires_grad_(False)
            report.epochs += epochs
            report.steps += steps
            report.loss_history += history
            report.chunk_leak_fractions.append({
                t.name: leak_fraction(t.as_matrix(t.param.detach().float() - start_of_chunk[t.name].float()),
                                      projectors[t.name].project) for t in targets})
            if use_projection:  # Algorithm 2: this chunk's edits are protected in every later chunk and call
                seed = hparams.seed + state.num_chunks + 1
                if index < len(chunks) - 1:
                    state.add_statistics(edit_statistics(model, tok, part, hparams, targets, seed=seed), len(part))
                    report.edit_statistics_collections += 1
                else:  # collected by the next call if it continues the sequence (nothing if EasyEdit restores)
                    state.unrecorded = UnrecordedChunk([dict(r) for r in part], copy.copy(hparams), seed)
            state.num_edits += len(part)
            state.num_chunks += 1
        state.last_digest = model_fingerprint(model, names)["weights_sha256"]
        state.last_capability = curvature.identity
        report.chunks = len(chunks)
        report.projectors = projectors
        report.final_loss = report.loss_history[-1]
        report.seconds_editing = time.perf_counter() - started
        _layer_diagnostics(report, targets, originals, curvature.factors, FACTOR_DTYPES[hparams.mom2_dtype])
    except BaseException:
        with torch.no_grad():
            for t in targets:
                t.param.copy_(originals[t.name])
        if state is not None and checkpoint is not None:
            state.rollback(checkpoint)
        logger.error("CrispEdit failed; the edit weights were restored to their values before the call")
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
        for t in targets:
            t.param.grad = None
        model.train(was_training)
    logger.info(report.summary())
    return report


def check_edit_inputs(model: nn.Module, requests: Sequence[Mapping[str, Any]], hparams,
                      factors: FactorSet | None = None) -> list[EditTarget]:
    """Everything :func:`apply_crispedit` can check before it starts: the requests, the hparams (validated again,
    so a field changed after construction is caught), the edit weights, ``max_length`` against the model's
    positions, and that given ``factors`` cover every edited layer with its shape.

    Returns:
        The edit targets (:func:`edit_targets`).

    Raises:
        ValueError or KeyError: naming the bad value and what is allowed.
    """
    validate_requests(requests)
    if callable(getattr(hparams, "validate", None)):
        hparams.validate()
    targets = edit_targets(model, hparams)
    check_positions(model, hparams.max_length, "max_length")
    for t in targets if factors is not None else ():
        if t.name not in factors.factors:
            raise ValueError(f"the given factors have no layer {t.name!r} (an edited layer); they hold "
                             f"{sorted(factors.factors)}: collect them for hparams.layers {list(hparams.layers)}")
        found = (factors[t.name].S.shape[0], factors[t.name].A.shape[0])
        if found != t.shape:
            raise ValueError(f"the given factors of {t.name} are for (d_out, d_in) = {found}, the weight is {t.shape}")
        check_factors(t.name, factors[t.name].A, factors[t.name].S, source="given")
    return targets


def _layer_diagnostics(report: EditReport, targets: Sequence[EditTarget], originals: Mapping[str, torch.Tensor],
                       factors: FactorSet, dtype: torch.dtype) -> None:
    """Per-layer receipt: kept fraction of the last projector, predicted capability-loss increase of the call's
    whole change (K-FAC quadratic form of the capability factors), and the worst per-chunk leak."""
    for t in targets:
        delta = t.as_matrix(t.param.detach().to(dtype) - originals[t.name].to(dtype))
        f = factors[t.name]
        predicted = kfac_quadratic_form(delta, f.A.to(delta.device), f.S.to(delta.device))
        diag = report.projectors[t.name].diagnostics()
        report.layers[t.name] = {
            "kept_fraction": diag.kept_fraction, "removed_directions": diag.removed,
            "total_directions": diag.total, "removed_energy": diag.removed_energy,
            "top_eigenvalue_share_A": diag.top_share_in, "top_eigenvalue_share_S": diag.top_share_out,
            "predicted_loss_increase": predicted, "delta_norm": float(delta.norm()),
            "leak_fraction": max(chunk[t.name] for chunk in report.chunk_leak_fractions),
        }
        report.predicted_loss_increase += predicted
