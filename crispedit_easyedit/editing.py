"""CrispEdit (Algorithm 1) and CrispEdit-Seq (Algorithm 2) on (model, tokenizer, requests, hparams).

Data flow: requests -> token ids and label masks -> model -> gradients of the edit weights -> projector ->
projected Adam step -> edited weights. The curvature comes in from the side: corpus -> K-FAC factors (cached) ->
Kronecker eigenbasis -> projector.

``requests`` are EasyEdit request dicts; only ``prompt`` and ``target_new`` are used for training. ``hparams`` is a
:class:`crispedit_easyedit.hparams.CrispEditHyperParams` (any object with the same attributes works).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature import (
    FACTOR_DTYPES, FactorSet, cache_path_for, collect_kfac_factors, curvature_identity, layer_shape,
    model_fingerprint, model_inputs, resolve_module, weight_orientation,
)
from .optim import ProjectedAdam, leak_fraction
from .projector import KroneckerProjector, kfac_quadratic_form

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# Requests -> token ids


def _needs_space(prompt: str, target: str) -> bool:
    return bool(prompt) and not prompt[-1].isspace() and not target[:1].isspace()


def tokenize_edit(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target and their labels (IGNORE_INDEX on the prompt).

    Prompt and target are tokenised separately and joined as ids, so the boundary is exact; a leading space is
    added to the target when neither the prompt ends in white space nor the target starts with it (BPE tokenizers
    mark word starts with it). The prompt keeps the tokenizer's BOS if it adds one; a trailing EOS added by the
    tokenizer to the prompt is dropped. If the sequence is longer than ``max_length``, the prompt is cut from the left.

    Returns:
        (input_ids, labels), two lists of equal length.
    """
    if not target or not target.strip():
        raise ValueError(f"empty target_new for prompt {prompt!r}")
    prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if prompt_ids and eos is not None and prompt_ids[-1] == eos and eos != bos:
        prompt_ids = prompt_ids[:-1]
    target_text = (" " + target) if _needs_space(prompt, target) else target
    target_ids = list(tok(target_text, add_special_tokens=False)["input_ids"])
    if len(target_ids) > 1 and tok.convert_ids_to_tokens(target_ids[0]) == "\u2581":  # SentencePiece lone "▁"
        target_ids = target_ids[1:]
    if len(target_ids) >= max_length:
        raise ValueError(f"target {target!r} has {len(target_ids)} tokens, more than max_length={max_length} - 1")
    keep_prompt = max_length - len(target_ids)
    prompt_ids = prompt_ids[-keep_prompt:]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into (batch, T) ``input_ids``, ``attention_mask`` and ``labels`` tensors.

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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
    labels = batch["labels"][:, 1:]
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


def capability_factors(model: nn.Module, tok, hparams, targets: Sequence[EditTarget],
                       progress: bool = True) -> FactorSet:
    """K-FAC factors of the capability loss for the edit weights: from the cache, or collected once and cached.

    The cache key covers the model fingerprint (weights included), layers, corpus, tokenizer, number and length of
    sequences, Fisher type, samples, dtype, sink exclusion and seed; a cache whose metadata does not match raises.
    """
    from .corpora import corpus_fingerprint, load_corpus, spread_windows

    names = [t.name for t in targets]
    texts = load_corpus(hparams.mom2_dataset, split="stats")
    corpus_fp = (f"{corpus_fingerprint(hparams.mom2_dataset, 'stats', texts)}|tokenizer="
                 f"{getattr(tok, 'name_or_path', '')}|vocab={len(tok)}")
    identity = curvature_identity(
        model_fingerprint(model, names), names, {t.name: t.shape for t in targets}, corpus_fp,
        hparams.mom2_n_samples, hparams.curvature_seq_len, hparams.fisher_type, hparams.mc_samples,
        hparams.mom2_dtype, hparams.exclude_first_tokens, hparams.seed)
    path = cache_path_for(hparams.cache_dir, identity) if hparams.cache_dir else None
    device = next(model.parameters()).device
    if path is not None and path.exists():
        logger.info("loading capability curvature from %s", path)
        return FactorSet.load(path, expected=identity, device=device)
    logger.info("collecting capability curvature (%s, %d sequences x %d tokens, fisher %s)%s",
                hparams.mom2_dataset, hparams.mom2_n_samples, hparams.curvature_seq_len, hparams.fisher_type,
                f"; will cache at {path}" if path else "; no cache_dir: not cached")
    packed = spread_windows(texts, tok, hparams.curvature_seq_len, hparams.mom2_n_samples)
    size = hparams.curvature_batch_size
    batches = [{key: value[i : i + size] for key, value in packed.items()}
               for i in range(0, packed["input_ids"].shape[0], size)]
    factors = collect_kfac_factors(
        model, names, batches, fisher_type=hparams.fisher_type, mc_samples=hparams.mc_samples,
        dtype=FACTOR_DTYPES[hparams.mom2_dtype], seed=hparams.seed,
        exclude_first_tokens=hparams.exclude_first_tokens, progress=progress)
    factors.metadata.update(identity)
    if path is not None:
        factors.save(path)
        logger.info("cached capability curvature at %s", path)
    return factors


def build_projectors(factors: FactorSet, targets: Sequence[EditTarget], gamma: float,
                     dtype: torch.dtype = torch.float32) -> dict[str, KroneckerProjector]:
    """One Kronecker projector per edit weight, on the weight's device."""
    projectors = {}
    for target in targets:
        f = factors[target.name]
        projectors[target.name] = KroneckerProjector.from_factors(
            f.A.to(target.param.device), f.S.to(target.param.device), gamma, dtype=dtype)
    return projectors


def _projection_fn(target: EditTarget, projector: KroneckerProjector) -> Callable[[torch.Tensor], torch.Tensor]:
    if target.transposed:
        return lambda tensor: projector.project(tensor.T).T
    return projector.project


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class EditReport:
    """What one CrispEdit call did; ``summary()`` is the one-line receipt that is logged."""

    num_edits: int
    epochs: int = 0
    steps: int = 0
    final_loss: float = float("nan")
    loss_history: list[float] = field(default_factory=list)
    projection_mode: str = "both"
    gamma: float = 0.0
    chunks: int = 1
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    predicted_loss_increase: float = 0.0
    seconds_curvature: float = 0.0
    seconds_editing: float = 0.0
    projectors: dict[str, KroneckerProjector] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        kept = ", ".join(f"{name.split('.')[2] if name.count('.') > 2 else name}:{info['kept_fraction']:.4f}"
                         for name, info in self.layers.items())
        mode = ("mode none (plain fine-tuning; the projector below is not applied)" if self.projection_mode == "none"
                else f"mode {self.projection_mode}")
        return (f"CrispEdit: {self.num_edits} edits, {self.chunks} chunk(s), {self.epochs} epochs / {self.steps} "
                f"steps, final loss {self.final_loss:.4f}, {mode}, gamma {self.gamma}, kept "
                f"fraction per layer [{kept}], predicted capability-loss increase {self.predicted_loss_increase:.3g} "
                f"nats/token, curvature {self.seconds_curvature:.1f}s, editing {self.seconds_editing:.1f}s")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the projectors, which hold tensors, are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "projectors"}


def finetune_projected(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                       targets: Sequence[EditTarget], projectors: Mapping[str, KroneckerProjector] | None,
                       progress: bool = True) -> tuple[int, int, list[float]]:
    """Fine-tune the target weights on prompt -> target_new with projected Adam (hparams.projection_mode).

    Up to ``hparams.num_steps`` epochs of shuffled batches of ``hparams.batch_size``; stops early once the epoch's
    mean loss falls below ``hparams.early_stop_loss``. The caller handles requires_grad flags and restoration.

    Returns:
        (epochs run, optimizer steps, mean loss per epoch).
    """
    device = targets[0].param.device
    examples = [tokenize_edit(tok, r["prompt"], r["target_new"], hparams.max_length) for r in requests]
    pad = pad_token_id(tok)
    projections = [None if projectors is None else _projection_fn(t, projectors[t.name]) for t in targets]
    mode = "none" if projectors is None else hparams.projection_mode
    optimizer = ProjectedAdam([t.param for t in targets], projections, mode=mode, lr=hparams.lr,
                              weight_decay=hparams.weight_decay)
    generator = torch.Generator().manual_seed(hparams.seed)
    history: list[float] = []
    steps = 0
    bar = tqdm(range(hparams.num_steps), desc="CrispEdit epochs", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(examples), generator=generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), hparams.batch_size):
            batch = collate([examples[i] for i in order[start : start + hparams.batch_size]], pad)
            batch = {key: value.to(device) for key, value in batch.items()}
            optimizer.zero_grad()
            loss, n = edit_loss(model, batch)
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * n
            count += n
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if history[-1] < hparams.early_stop_loss:
            break
    optimizer.zero_grad()
    return len(history), steps, history


def _edit_factor_batches(tok, requests, hparams) -> list[dict[str, torch.Tensor]]:
    """Batches of whole prompt+target sequences for the K-FAC statistics of past edits (CrispEdit-Seq).

    With ``hparams.edit_kfac_on_full_sequence`` (default, paper App. E) every position counts; otherwise only the
    target tokens do (via ``loss_mask``).
    """
    examples = [tokenize_edit(tok, r["prompt"], r["target_new"], hparams.max_length) for r in requests]
    batches = []
    for start in range(0, len(examples), hparams.batch_size):
        batch = collate(examples[start : start + hparams.batch_size], pad_token_id(tok))
        labels = batch.pop("labels")
        if not getattr(hparams, "edit_kfac_on_full_sequence", True):
            loss_mask = torch.zeros_like(labels, dtype=torch.bool)
            loss_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts target token t+1
            batch["loss_mask"] = loss_mask
        batches.append(batch)
    return batches


def apply_crispedit(model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], hparams,
                    factors: FactorSet | None = None, progress: bool = True) -> EditReport:
    """Edit ``model`` in place with CrispEdit (``hparams.chunk_size`` None) or CrispEdit-Seq (chunks).

    Only the edit weights change; every other parameter stays bit-identical. The edit applies fully or not at
    all: if anything raises, the edit weights are restored before the error propagates. requires_grad flags and
    the training mode are restored in every case.

    Args:
        model: a causal LM (any dtype; optimizer math is fp32).
        tok: its tokenizer (padding side and pad token do not matter; the vocabulary is never changed).
        requests: EasyEdit request dicts with ``prompt`` and ``target_new``.
        hparams: CrispEditHyperParams.
        factors: capability K-FAC factors to use instead of the cache/corpus (e.g. shared across calls).

    Returns:
        An EditReport (also logged as a one-line receipt).
    """
    if not requests:
        raise ValueError("no edit requests given")
    targets = edit_targets(model, hparams)
    originals = {t.name: t.param.detach().clone() for t in targets}
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    report = EditReport(num_edits=len(requests), projection_mode=hparams.projection_mode,
                        gamma=hparams.energy_threshold)
    try:
        started = time.perf_counter()
        if factors is None:
            factors = capability_factors(model, tok, hparams, targets, progress=progress)
        report.seconds_curvature = time.perf_counter() - started
        started = time.perf_counter()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for t in targets:
            t.param.requires_grad_(True)
        eig_dtype = FACTOR_DTYPES[hparams.mom2_dtype]
        use_projection = hparams.projection_mode != "none"
        chunk = hparams.chunk_size or len(requests)
        chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
        accumulated = factors
        projectors = None
        for index, part in enumerate(chunks):
            projectors = build_projectors(accumulated, targets, hparams.energy_threshold, eig_dtype)
            epochs, steps, history = finetune_projected(
                model, tok, part, hparams, targets, projectors if use_projection else None, progress)
            report.epochs += epochs
            report.steps += steps
            report.loss_history += history
            if index < len(chunks) - 1:  # Algorithm 2: protect this chunk's edits in the following chunks
                for t in targets:
                    t.param.requires_grad_(False)
                edit_factors = collect_kfac_factors(
                    model, [t.name for t in targets], _edit_factor_batches(tok, part, hparams),
                    fisher_type=hparams.fisher_type, mc_samples=hparams.mc_samples, dtype=eig_dtype,
                    seed=hparams.seed + index + 1, progress=False)
                accumulated = accumulated.merge(edit_factors)
                for t in targets:
                    t.param.requires_grad_(True)
        report.chunks = len(chunks)
        report.projectors = projectors
        report.final_loss = report.loss_history[-1]
        report.seconds_editing = time.perf_counter() - started
        for t in targets:
            delta = t.as_matrix(t.param.detach().to(eig_dtype) - originals[t.name].to(eig_dtype))
            f = factors[t.name]
            predicted = kfac_quadratic_form(delta, f.A.to(delta.device), f.S.to(delta.device))
            diag = projectors[t.name].diagnostics()
            report.layers[t.name] = {
                "kept_fraction": diag.kept_fraction, "removed_directions": diag.removed,
                "total_directions": diag.total, "removed_energy": diag.removed_energy,
                "top_eigenvalue_share_A": diag.top_share_in, "top_eigenvalue_share_S": diag.top_share_out,
                "predicted_loss_increase": predicted, "delta_norm": float(delta.norm()),
                "leak_fraction": leak_fraction(delta, projectors[t.name].project),
            }
            report.predicted_loss_increase += predicted
    except BaseException:
        with torch.no_grad():
            for t in targets:
                t.param.copy_(originals[t.name])
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
