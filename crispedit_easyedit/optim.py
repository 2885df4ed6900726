"""Adam with steps restricted to the low-curvature subspace of each edited weight matrix.

Modes (``projection_mode``):

* ``"gradient"``: project the gradient, then run Adam (the paper's Algorithm 1 and the reference code). Adam's
  elementwise 1/sqrt(v) scaling does not commute with the projection, so part of each step leaks into removed
  directions.
* ``"update"``: run Adam on the raw gradient and project its final step. The accumulated weight change provably
  stays in the kept subspace; converges slowly because Adam's moments see the raw gradients.
* ``"both"``: project the gradient and then the step: no leak and the convergence of "gradient" mode (default).
  Two projections (four rotations) per weight and step.
* ``"eigenbasis"``: rotate the gradient into the Kronecker eigenbasis, mask the removed products, and keep Adam's
  moments there (as EKFAC/SOAP do); the step is unrotated. One rotation and one unrotation per step, half the cost
  of "both", and no leak by construction: a masked coordinate has zero moments and so a zero step. Adam's diagonal
  scaling then acts on eigen-coordinates rather than on weight entries, which departs from the paper's Algorithm 1.
* ``"none"``: plain Adam (fine-tuning without the constraint; for ablations).

The gradient's projection (modes "gradient" and "both") and rotation (mode "eigenbasis") may use a different,
cheaper projection than the step's (``gradient_projections``, e.g. the bf16 eigenbasis of
:meth:`~crispedit_easyedit.projector.KroneckerProjector.in_dtype`): in "both" and "eigenbasis" modes the step's
projection or unrotation in full precision keeps the weight change in the kept subspace whatever the gradient's
rounding, which then only perturbs the step's direction inside that subspace.

The optimizer keeps an fp32 master copy of every parameter stored in a lower precision (bf16/fp16) and does all
math in fp32; the model's weights are overwritten with the rounded master after each step. (Rounding to bf16 then
perturbs removed directions at the level of bf16 resolution; the master copy itself stays in the subspace.)

Adam's scaling (``scaling``): "elementwise" is Adam, one second moment per weight entry (or per eigen-coordinate in
mode "eigenbasis"). "per_matrix" keeps one second moment per weight matrix, the running mean of the squared gradient
over its entries (Adam-mini's one learning rate per block, with the matrix as the block): the step is the
bias-corrected momentum divided by one number, so (weight decay aside) it stays in the span of the (projected)
gradients. Elementwise scaling reshapes each step entry by entry, which moves the change into input directions no
gradient came from (for an edit keyed on one token: directions of the other tokens' inputs). Its step has the same
root-mean-square size as Adam's when the gradient is steady, so a learning rate carries over.

Weight decay is decoupled (AdamW) and, in "update" and "both" modes, part of the projected step; in "eigenbasis"
mode only its kept eigen-coordinates are applied.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

import torch

from .checks import NonFiniteError, check_finite_step  # noqa: F401 - NonFiniteError is what step() raises
from .choices import ADAM_SCALINGS, PROJECTION_MODES

Projection = Callable[[torch.Tensor], torch.Tensor]


class RotatedBasis(Protocol):
    """What mode "eigenbasis" needs of a projection (a :class:`~crispedit_easyedit.projector.KroneckerProjector`)."""

    mask: torch.Tensor  # (d_out, d_in) bool keep-mask in eigen-coordinates

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """Eigen-coordinates (d_out, d_in) of a tensor of the parameter's shape."""

    def unrotate(self, C: torch.Tensor) -> torch.Tensor:
        """The tensor of the parameter's shape with eigen-coordinates C."""


class ProjectedAdam:
    """Adam/AdamW over a fixed list of parameters, each with its own projection of (d_out, d_in)-shaped tensors.

    Args:
        params: the edited weights (any float dtype).
        projections: one callable per parameter mapping a tensor of the parameter's shape (fp32) to its projection,
            or None for no projection of that parameter. For transposed weights (GPT-2 Conv1D) the callable must
            handle the transpose. Mode "eigenbasis" needs :class:`RotatedBasis` objects (rotate, unrotate, mask)
            instead of callables.
        mode: one of ``PROJECTION_MODES``.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW.
        scaling: one of ``ADAM_SCALINGS``: Adam's second moment per entry ("elementwise") or per matrix.
        gradient_projections: what projects (modes "gradient", "both") or rotates (mode "eigenbasis") the gradient,
            one per parameter like ``projections`` (default: ``projections``); the step always goes through
            ``projections``. An "eigenbasis" gradient projection must rotate into the same eigenbasis (its mask is
            the one of ``projections``; only its ``rotate`` is used).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], projections: Iterable[Projection | None],
                 mode: str = "both", lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gradient_projections: Iterable[Projection | None] | None = None,
                 scaling: str = "elementwise"):
        if mode not in PROJECTION_MODES:
            raise ValueError(f"projection_mode must be one of {PROJECTION_MODES}, got {mode!r}")
        if scaling not in ADAM_SCALINGS:
            raise ValueError(f"adam_scaling must be one of {ADAM_SCALINGS}, got {scaling!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be > 0 and finite, got {lr!r}")
        self.params = list(params)
        self.projections = list(projections)
        if len(self.params) != len(self.projections):
            raise ValueError(f"got {len(self.params)} parameters but {len(self.projections)} projections")
        self.gradient_projections = (self.projections if gradient_projections is None
                                     else list(gradient_projections))
        if len(self.gradient_projections) != len(self.params):
            raise ValueError(f"got {len(self.params)} parameters but {len(self.gradient_projections)} gradient "
                             f"projections")
        self.mode = mode
        if mode == "eigenbasis":
            for i, projection in enumerate(self.projections):
                if projection is not None and not all(hasattr(projection, a) for a in ("rotate", "unrotate", "mask")):
                    raise TypeError(f"projection_mode 'eigenbasis' needs projections with rotate, unrotate and mask "
                                    f"(a KroneckerProjector); projection {i} is {type(projection).__name__}")
            for i, projection in enumerate(self.gradient_projections):
                if (projection is None) != (self.projections[i] is None) or not (
                        projection is None or hasattr(projection, "rotate")):
                    raise TypeError(f"projection_mode 'eigenbasis' needs a gradient projection with rotate wherever "
                                    f"there is a projection; gradient projection {i} is {type(projection).__name__}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.scaling = scaling
        self.step_count = 0
        self.master = [p.detach().to(torch.float32).clone() if p.dtype != torch.float32 else None for p in self.params]
        # Adam's moments (fp32, beside each parameter): of the parameter's shape, or of the (d_out, d_in)
        # eigen-coordinates in mode "eigenbasis" (on the basis' device)
        self.exp_avg = [self._zero_moment(p, q) for p, q in zip(self.params, self.projections)]
        self.exp_avg_sq = [self._zero_moment(p, q) if scaling == "elementwise" else torch.zeros((), device=m.device)
                           for p, q, m in zip(self.params, self.projections, self.exp_avg)]  # per_matrix: a scalar

    def _zero_moment(self, param: torch.nn.Parameter, projection) -> torch.Tensor:
        if self.mode == "eigenbasis" and projection is not None:
            return torch.zeros(projection.mask.shape, dtype=torch.float32, device=projection.mask.device)
        return torch.zeros_like(param, dtype=torch.float32)

    def _project(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        projection = self.projections[index]
        return tensor if projection is None else projection(tensor)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on every parameter that has a gradient.

        Raises:
            NonFiniteError: a gradient or a step holds NaN or inf. The parameter it concerns is left unchanged
                (earlier parameters of the same step may have moved: callers restore the weights, as
                :func:`crispedit_easyedit.editing.apply_crispedit` does).
        """
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2 = 1 - beta2 ** self.step_count
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad.to(torch.float32)
            check_finite_step(grad, f"gradient of parameter {i} at step {self.step_count}")
            weights = self.master[i] if self.master[i] is not None else p.data
            basis = self.projections[i] if self.mode == "eigenbasis" else None
            if basis is not None:
                rotation = self.gradient_projections[i]
                grad = rotation.rotate(grad.to(basis.mask.device)).mul_(basis.mask).to(torch.float32)
            elif self.mode in ("gradient", "both") and self.gradient_projections[i] is not None:
                grad = self.gradient_projections[i](grad).to(torch.float32)
            self.exp_avg[i].mul_(beta1).add_(grad, alpha=1 - beta1)
            if self.scaling == "elementwise":
                self.exp_avg_sq[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            else:  # one second moment for the matrix: the mean square of its gradient's entries (no squared copy)
                mean_square = torch.linalg.vector_norm(grad).square() / grad.numel()
                self.exp_avg_sq[i].mul_(beta2).add_(mean_square, alpha=1 - beta2)
            denom = (self.exp_avg_sq[i] / bias2).sqrt_().add_(self.eps)
            update = (self.exp_avg[i] / bias1) / denom
            if basis is not None:
                if self.weight_decay:  # the decay's kept part: a decayed removed coordinate would leak
                    decay = basis.rotate(weights.to(basis.mask.device)).mul_(basis.mask)
                    update += self.weight_decay * decay.to(torch.float32)
                update = basis.unrotate(update).to(weights.device, torch.float32)
            elif self.weight_decay:
                update = update + self.weight_decay * weights
            if self.mode in ("update", "both"):
                update = self._project(i, update)
            check_finite_step(update, f"update of parameter {i} at step {self.step_count}")
            weights.add_(update, alpha=-self.lr)
            if self.master[i] is not None:
                p.data.copy_(weights.to(p.dtype))

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


def leak_fraction(delta: torch.Tensor, projection: Projection) -> float:
    """||delta - P(delta)|| / ||delta||: the share of a weight change lying in removed directions."""
    norm = float(delta.norm())
    if norm == 0 or math.isnan(norm):
        return 0.0
    return float((delta - projection(delta)).norm()) / norm
