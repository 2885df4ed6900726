"""The edit prompts' other positions as a constraint: a keyed edit that acts at the subject key and not elsewhere.

Under ``edit_positions`` "subject_last_only" (:mod:`crispedit_easyedit.key_positions`) the weight change acts only at
the subject's last token during training, but the edited model applies it at every position. What it does at the
edit prompts' other positions (the template, the system prompt, the answer's own tokens) was never trained: on 100
ZsRE edits in three formats the training loss reached 0.03 while the edited model held 0.30 of the target tokens
(benchmarks/README.md, issue 9). This module closes that gap the way AlphaEdit protects preserved knowledge, with
the edit prompts' own activations instead of Wikipedia's: the inputs ``x`` (d_in,) of each edited linear layer at
every attended non-key position of the chunk's training examples, taken at the weights the chunk starts from (which
those positions see during keyed training), give a covariance ``C = sum x x^T`` (d_in, d_in). Its top eigenvectors
``U`` (d_in, r), holding the fraction ``hparams.context_null_space_energy`` of its trace (the energy rule of
:func:`crispedit_easyedit.projector.energy_mask` with S = I), are the input directions the change may not act on:
every step of the change ``dW`` (d_out, d_in) is projected as ``dW - (dW U) U^T`` after the capability projection,
so that ``dW x`` for a context input ``x`` is bounded by ``||dW||_2 * ||(I - U U^T) x||`` and the model trained is,
on the edit prompts, the model deployed. The subject keys keep their component outside ``U`` (on 100 ZsRE edits in
three formats at 99 % energy about a quarter of their norm) through which the edit is made.

Only the examples in the train formats count (a context-prefixed example's prefix, drawn anew every epoch, is not
protected), and each chunk of CrispEdit-Seq builds its own null space at the weights it starts from. Memory: one
(d_in, d_in) float64 covariance per edited layer while it is built (19 MiB at d_in 1536, 1.6 GiB at 14336).

Under ``projection_mode`` "update" and "both" the step is projected, so the change lies in the null space exactly;
under "gradient" only the gradient is, and Adam's elementwise scaling lets part of the step out.

The two projections do not commute: the step ends in the context null space exactly, and the share of the change
in the capability projector's removed directions is measured per chunk (``EditReport.chunk_leak_fractions``);
``hparams.context_null_space_rounds`` alternates the two projections that many times per projection (von Neumann's
alternating projections converge to the projection onto the intersection), which lowers that share.
They converge slowly (on 30 ZsRE edits of SmolLM2 the share of a gradient left in the removed directions
is 0.35-0.40, 0.14-0.17, 0.05-0.06 and 0.01-0.02 per layer after 1, 4, 16 and 64 rounds:
benchmarks/probe_intersection.py); ``context_null_space_composition`` "exact" projects onto the intersection in
one step instead (:class:`ExactIntersection`), leaving nothing in either removed set.
This module never imports EasyEdit or the experiment side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .curvature import input_device, model_inputs
from .key_positions import forward_hooks
from .projector import KroneckerProjector, energy_mask, stable_eigh


@dataclass
class ContextNullSpace:
    """The input directions of one edited weight that its change may not act on.

    Attributes:
        basis: (d_in, r) orthonormal columns: the protected directions (the top-energy eigenvectors of the context
            inputs' covariance).
        context_tokens: how many context positions the covariance summed.
        energy: the fraction of the covariance's trace the protected directions hold (at least the requested one).
    """

    basis: torch.Tensor
    context_tokens: int
    energy: float

    @property
    def protected_directions(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def from_covariance(cls, covariance: torch.Tensor, energy: float, context_tokens: int,
                        label: str = "context covariance") -> "ContextNullSpace":
        """The smallest set of top eigenvectors of ``covariance`` (d_in, d_in) that holds ``energy`` of its trace
        (ties at the threshold are protected too), in float64 for the decomposition."""
        eigenvalues, eigenvectors = stable_eigh(covariance, torch.float64, label)
        protected = ~energy_mask(torch.ones(1, dtype=torch.float64, device=eigenvalues.device), eigenvalues,
                                 energy)[0]  # no energy at all: nothing is protected
        total = float(eigenvalues.sum())
        held = float(eigenvalues[protected].sum()) / total if total > 0 else 0.0
        return cls(eigenvectors[:, protected].to(torch.float32).contiguous(), context_tokens, held)

    def project(self, tensor: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``tensor`` with its action on the protected directions removed: for (d_out, d_in) ``dW - (dW U) U^T``;
        for a weight stored as (d_in, d_out) (``transposed``, GPT-2's Conv1D) ``dW - U (U^T dW)``."""
        basis = self.basis.to(tensor.device, tensor.dtype)
        if transposed:
            return tensor - basis @ (basis.T @ tensor)
        return tensor - (tensor @ basis) @ basis.T


def context_covariances(model: nn.Module, modules: Mapping[str, nn.Module],
                        batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, int]]:
    """Covariance (d_in, d_in) of each module's inputs at the attended positions outside ``key_mask``, and the number
    of those positions, over ``batches`` (``input_ids``, ``attention_mask``, ``key_mask``, all (batch, T)) at the
    model's current weights. float64 on each module's weight device."""
    names = {id(module): name for name, module in modules.items()}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    context = torch.zeros(0, dtype=torch.bool)  # (batch, T) of the batch in flight

    def hook(module, inputs, output):
        name = names[id(module)]
        rows = inputs[0].detach()[context.to(inputs[0].device)].to(torch.float64)  # (tokens, d_in)
        gram = rows.T @ rows
        sums[name] = gram if name not in sums else sums[name] + gram
        counts[name] += int(rows.shape[0])

    device = input_device(model)
    with forward_hooks(list(modules.values()), hook), torch.no_grad():
        for batch in batches:
            context = batch["attention_mask"].bool() & ~batch["key_mask"]
            model(**model_inputs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return {name: (sums[name], counts[name]) for name in modules}


def context_null_spaces(model: nn.Module, modules: Mapping[str, nn.Module],
                        batches: Sequence[Mapping[str, torch.Tensor]], energy: float) -> dict[str, ContextNullSpace]:
    """One :class:`ContextNullSpace` per module (name -> module) from the context inputs of ``batches``
    (:func:`context_covariances`) at the energy fraction ``energy`` in (0, 1)."""
    if not 0.0 < energy < 1.0:
        raise ValueError(f"context_null_space_energy must be in (0, 1) to build a null space, got {energy!r}")
    return {name: ContextNullSpace.from_covariance(covariance, energy, tokens, f"context covariance of {name}")
            for name, (covariance, tokens) in context_covariances(model, modules, batches).items()}


class ExactIntersection:
    """The orthogonal projection onto the intersection of a capability projector's kept span and a context null space.

    The two subspaces of (d_out, d_in) changes are K = {U_S (M * Y) U_A^T} (the Kronecker eigenvectors the mask M
    keeps; :class:`~crispedit_easyedit.projector.KroneckerProjector`) and N = {dW : dW U = 0} (U (d_in, r) the
    protected context directions). Rotating into the Kronecker eigenbasis, Y = U_S^T dW U_A (an isometry), dW lies
    in both iff Y is supported on M and ``Y B = 0`` with B = U_A^T U (d_in, r): the constraint acts on each row of Y
    alone, so the projection is, row by row, the projection of that row's kept coordinates J_i onto the orthogonal
    complement of the column span of B[J_i] (|J_i|, r). The energy mask keeps a prefix of the input eigenvalues in
    ascending order in every row (a row with a larger output eigenvalue keeps fewer), so the rows fall into groups
    by the length k of that prefix, each with one orthonormal basis Q_k (k, rank) of span(B[:k]):
    ``y -> y - (y Q_k) Q_k^T``. No alternation and no leak: the result lies in K and in N exactly.

    With more distinct prefix lengths than ``max_groups``, each row's prefix is shortened to the nearest group length
    at or below it: a smaller subspace of K (the projection is still orthogonal, onto that subspace), the share of
    kept coordinates given up is ``dropped_share``. Memory: one (k, rank) basis per group (at most
    ``max_groups`` x d_in x r elements per layer; 32 x 1536 x 700 float32 = 138 MiB on SmolLM2 at 100 edits).
    Works in the projector's basis dtype (at least float32); the group bases are built in float64.

    Attributes:
        dimension: dim of the subspace projected onto (sum over rows of prefix length minus span rank).
        dropped_share: share of the mask's kept coordinates outside that subspace's coordinate sets by the grouping.
    """

    def __init__(self, projector: KroneckerProjector, space: ContextNullSpace, max_groups: int = 32):
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups!r}")
        self.projector = projector
        mask = projector.mask
        kept = mask.sum(dim=1)  # (d_out,) prefix length of each row
        order = torch.argsort(mask.sum(dim=0), descending=True, stable=True)  # columns, most-kept first
        if not bool((mask[:, order] == (torch.arange(mask.shape[1], device=mask.device)[None, :]
                                        < kept[:, None])).all()):
            raise ValueError("the capability mask does not keep a prefix of one column order in every row; the "
                             "exact intersection needs the energy rule's nested mask (use the alternating rounds)")
        lengths = torch.unique(kept)
        if lengths.numel() > max_groups:  # group lengths at evenly spaced quantiles of the rows' prefix lengths
            ranked = torch.sort(kept).values
            picks = torch.linspace(0, ranked.numel() - 1, max_groups, device=kept.device).round().long()
            lengths = torch.unique(ranked[picks])
        # each row takes the longest group length that does not exceed its own prefix (0: the row is not edited)
        slot = torch.searchsorted(lengths, kept, right=True) - 1  # (d_out,) index into lengths, -1 for none
        self.order = order
        self.dtype = torch.promote_types(projector.basis_in.dtype, torch.float32)
        self.groups: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (rows, k, Q (k, rank))
        basis_in = projector.basis_in.to(torch.float64)
        coupling = (basis_in.T @ space.basis.to(basis_in.device, torch.float64))[order]  # (d_in, r): B, rows sorted
        dimension, covered = 0, 0
        for index, length in enumerate(lengths.tolist()):
            rows = torch.nonzero(slot == index).flatten()
            if length == 0 or rows.numel() == 0:
                continue
            head = coupling[:length]  # (k, r)
            gram_values, gram_vectors = stable_eigh(head.T @ head, torch.float64,  # (r,), (r, r); clamped >= 0
                                                    f"context Gram matrix of the first {length} input eigenvectors")
            tolerance = float(gram_values.max()) * head.shape[1] * torch.finfo(torch.float64).eps * 1e3
            spanned = gram_values > tolerance
            span = head @ (gram_vectors[:, spanned] / gram_values[spanned].sqrt())  # (k, rank) orthonormal
            dimension += rows.numel() * (length - span.shape[1])
            covered += rows.numel() * length
            self.groups.append((rows, length, span.to(self.dtype).contiguous()))
        total = int(kept.sum())
        self.dimension = int(dimension)
        self.dropped_share = 1.0 - covered / total if total else 0.0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Project ``tensor`` (d_out, d_in), returned in its dtype."""
        rotated = self.projector.rotate(tensor).to(self.dtype)  # (d_out, d_in) eigen-coordinates
        projected = torch.zeros_like(rotated)
        for rows, length, span in self.groups:
            index = (rows[:, None], self.order[None, :length])
            block = rotated[index]  # (rows, k): one gather
            projected[index] = block - (block @ span) @ span.T
        return self.projector.unrotate(projected).to(tensor.dtype)


def then_context(projection: Callable[[torch.Tensor], torch.Tensor] | None, space: ContextNullSpace,
                 transposed: bool, rounds: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """A projection (of a tensor of the weight's storage shape) followed by the context null space's, ``rounds``
    times in turn (alternating projections, which converge to the projection onto the intersection of the two
    subspaces: more rounds leave less of the result in ``projection``'s removed directions). The result always
    ends in the context null space."""
    if rounds < 1:
        raise ValueError(f"context_null_space_rounds must be >= 1, got {rounds!r}")
    if projection is None:
        return lambda tensor: space.project(tensor, transposed)

    def alternate(tensor: torch.Tensor) -> torch.Tensor:
        for _ in range(rounds):
            tensor = space.project(projection(tensor), transposed)
        return tensor

    return alternate
