"""Kronecker eigenbasis projectors onto the low-curvature subspace of a K-FAC factor pair.

For a weight matrix W of shape (d_out, d_in) the K-FAC curvature is G ~ A (x) S in column-major vec order
(vec(W) stacks columns; equivalently S (x) A for PyTorch's row-major ``W.flatten()``), where
A = E[a a^T] (d_in x d_in) is the input-activation covariance and S = E[g g^T] (d_out x d_out) the covariance of
the gradients w.r.t. the layer's outputs. With A = U_A diag(l_A) U_A^T and S = U_S diag(l_S) U_S^T, the
eigenvectors of G are u^A_j (x) u^S_i with eigenvalues l^S_i * l^A_j. The matrix-free projection onto the kept
eigenvectors (paper eq. 6 / Proposition 3) is

    P(Q) = U_S ((U_S^T Q U_A) * M) U_A^T,     M_ij = 1 if the product l^S_i l^A_j is kept.

Energy rule (``energy_mask``): sort the products in decreasing order and remove the fewest largest ones whose sum
reaches ``gamma`` times the total. Tie rule: every product within a relative ``1000 * eps`` (of the eigenvalue dtype)
of the smallest removed product is removed too. Numerically repeated eigenvalues thus share one fate, so the projector
never splits a degenerate eigenspace (whose eigenvectors are arbitrary) and depends only on the factors, not on how
eigh or a sort orders equal values; it may remove slightly more than gamma of the energy. Products equal to 0 are never removed, so ``gamma = 1`` removes exactly the
directions with non-zero curvature.

Memory per layer (factor dtype, 4 bytes for fp32; :func:`projector_memory_bytes` computes it): U_A d_in^2,
U_S d_out^2, the mask d_out*d_in (bool, 1 byte), plus two (d_out, d_in) temporaries during a projection. The energy
rule itself needs only O(d_out + d_in) besides the mask (no product matrix, no sort). Llama-3-8B down_proj
(4096 x 14336), fp32: 822 MB + 67 MB + 59 MB resident, 2 x 235 MB transient per projection, and up to 3.3 GB extra
while eigh decomposes A (the symmetrised copy, the eigenvectors and LAPACK's syevd workspace).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .checks import CurvatureError, check_spectrum

logger = logging.getLogger(__name__)

EIGH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def stable_eigh(matrix: torch.Tensor, dtype: torch.dtype = torch.float32,
                label: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition in ``dtype`` with negative eigenvalues clamped to zero, after checking that the
    matrix is positive semi-definite within tolerance (:func:`crispedit_easyedit.checks.check_spectrum`: each
    eigenvalue >= -1e-3 * trace and the clamped mass <= 1e-2 * trace).

    Args:
        matrix: (n, n) symmetric positive semi-definite matrix (any float dtype).
        dtype: float32 or float64; the computation dtype whatever the input dtype.
        label: what the matrix is, for the error message (e.g. "K-FAC factor A of model.layers.1...").

    Returns:
        eigenvalues (n,) in ascending order, clamped to >= 0, and eigenvectors (n, n) as columns.

    Raises:
        CurvatureError: the matrix is not finite or not positive semi-definite within tolerance.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eigendecomposition dtype must be torch.float32 or torch.float64, got {dtype}")
    sym = matrix.to(dtype)
    if not bool(torch.isfinite(sym).all()):
        raise CurvatureError(f"{label} has non-finite entries (NaN or inf); it cannot be eigendecomposed")
    sym = 0.5 * (sym + sym.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    check_spectrum(eigenvalues, float(sym.diagonal().sum()), label)
    return eigenvalues.clamp_min(0.0), eigenvectors


def _first_at_or_above(scale: torch.Tensor, values: torch.Tensor, t: float) -> torch.Tensor:
    """Per row i, the first index j with ``fl(scale[i] * values[j]) >= t`` (``len(values)`` if none).

    ``values`` is sorted ascending and non-negative, ``scale`` non-negative, both float64; the products are compared
    exactly as float64 products (a ``searchsorted`` on ``t / scale`` is corrected for its rounding), so the result
    agrees with materialising the products. Memory O(len(scale)).
    """
    n = values.numel()
    with torch.no_grad():
        guess = torch.full_like(scale, float("inf"))
        positive = scale > 0
        guess[positive] = t / scale[positive]
        index = torch.searchsorted(values, guess.contiguous())
        while True:  # step left while the previous product still reaches t (jump over equal values at once)
            previous = (index - 1).clamp_min(0)
            move = (index > 0) & (scale * values[previous] >= t)
            if not bool(move.any()):
                break
            index = torch.where(move, torch.searchsorted(values, values[previous].contiguous()), index)
        while True:  # step right while the current product is below t
            current = index.clamp_max(n - 1)
            move = (index < n) & (scale * values[current] < t)
            if not bool(move.any()):
                break
            index = torch.where(move, torch.searchsorted(values, values[current].contiguous(), right=True), index)
    return index


def _energy_at_or_above(scale: torch.Tensor, values: torch.Tensor, suffix: torch.Tensor, t: float) -> float:
    """Sum of the products ``scale[i] * values[j]`` that are >= t (``suffix[k]`` = sum of ``values[k:]``)."""
    return float((scale * suffix[_first_at_or_above(scale, values, t)]).sum())


def energy_threshold_product(eig_out: torch.Tensor, eig_in: torch.Tensor, gamma: float) -> float:
    """The smallest removed Kronecker eigenvalue product of the energy rule, without forming the products.

    It is the largest product value p such that the products >= p hold at least ``gamma`` of the total energy
    (the fewest largest products that reach gamma). Found by bisection over the float64 bit patterns of p, each step
    an O(d_out log d_in) count with sorted eigenvalues and prefix sums: extra memory O(d_out + d_in).

    Returns:
        p > 0, or 0.0 when the total energy is zero or reaching gamma needs products equal to zero.
    """
    s = eig_out.detach().to(torch.float64).flatten()
    a = torch.sort(eig_in.detach().to(torch.float64).flatten()).values
    suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(a, (0,)), 0), (0,)), a.new_zeros(1)])
    total = float((s * suffix[0]).sum())
    if total <= 0 or float(a[-1]) <= 0 or float(s.max()) <= 0:
        return 0.0
    goal = gamma * total
    smallest_positive = torch.tensor(1, dtype=torch.int64).view(torch.float64).item()
    if _energy_at_or_above(s, a, suffix, smallest_positive) < goal:
        return 0.0
    largest = float(s.max()) * float(a[-1])
    low = int(torch.tensor(smallest_positive, dtype=torch.float64).view(torch.int64))  # E(low) >= goal
    high = int(torch.tensor(largest, dtype=torch.float64).view(torch.int64)) + 1  # E(high) < goal (above every product)
    while high - low > 1:
        middle = (low + high) // 2
        value = torch.tensor(middle, dtype=torch.int64).view(torch.float64).item()
        if _energy_at_or_above(s, a, suffix, value) >= goal:
            low = middle
        else:
            high = middle
    return torch.tensor(low, dtype=torch.int64).view(torch.float64).item()


def energy_mask(eig_out: torch.Tensor, eig_in: torch.Tensor, gamma: float) -> torch.Tensor:
    """Boolean keep-mask over the Kronecker eigenvalue products by the energy rule (see the module docstring).

    The threshold comes from :func:`energy_threshold_product` and the mask is built from per-row counts, so no
    (d_out, d_in) float tensor and no sort of the products is formed: besides the returned bool mask
    (d_out * d_in bytes) the extra memory is O(d_out + d_in) (see :func:`energy_mask_memory_bytes`).

    Args:
        eig_out: (d_out,) non-negative eigenvalues of S.
        eig_in: (d_in,) non-negative eigenvalues of A.
        gamma: fraction of the total curvature energy to remove, in (0, 1].

    Returns:
        (d_out, d_in) bool mask, True where the product l_out[i] * l_in[j] is kept (low curvature).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma (energy_threshold) must be in (0, 1], got {gamma!r}")
    tie_rtol = 1000 * torch.finfo(torch.promote_types(eig_out.dtype, eig_in.dtype)).eps
    s = eig_out.detach().to(torch.float64).flatten()
    a_sorted, order = torch.sort(eig_in.detach().to(torch.float64).flatten(), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    if float(s.sum() * a_sorted.sum()) <= 0:  # no curvature at all: nothing to remove
        return torch.ones((s.numel(), a_sorted.numel()), dtype=torch.bool, device=eig_out.device)
    threshold = energy_threshold_product(s, a_sorted, gamma) if gamma < 1.0 else 0.0
    if threshold > 0:
        cut = threshold * (1 - tie_rtol)  # products within the tie tolerance of the threshold are removed too
    else:  # gamma = 1, or reaching gamma needs every non-zero product: keep exactly the zero products
        cut = torch.tensor(1, dtype=torch.int64).view(torch.float64).item()
    kept_per_row = _first_at_or_above(s, a_sorted, cut)  # products below the cut are kept
    return rank[None, :] < kept_per_row[:, None]


def energy_mask_memory_bytes(d_out: int, d_in: int) -> int:
    """Peak bytes of :func:`energy_mask` for a (d_out, d_in) weight: the bool mask plus O(d_out + d_in) vectors."""
    return d_out * d_in + 8 * (6 * d_in + 8 * d_out)


def projector_memory_bytes(d_out: int, d_in: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Memory of one layer's projector, in bytes (a formula checked at small scale by tests/test_projector.py).

    Returns:
        ``resident``: eigenvectors U_A (d_in^2) and U_S (d_out^2), eigenvalues and the bool mask;
        ``eigh_peak``: the extra peak while eigendecomposing the larger factor (the symmetrised copy, the
        eigenvector output and LAPACK's syevd workspace, about 1 + 6n + 2n^2 elements);
        ``mask_peak``: the extra peak of :func:`energy_mask` besides the mask;
        ``project_transient``: the two (d_out, d_in) temporaries of one projection.
    """
    item = torch.finfo(dtype).bits // 8
    n = max(d_in, d_out)
    return {
        "resident": item * (d_in * d_in + d_out * d_out + d_in + d_out) + d_out * d_in,
        "eigh_peak": item * (2 * n * n + (1 + 6 * n + 2 * n * n)),
        "mask_peak": energy_mask_memory_bytes(d_out, d_in) - d_out * d_in,
        "project_transient": 2 * item * d_out * d_in,
    }


@dataclass
class Eigenbasis:
    """The Kronecker eigenbasis of one K-FAC factor pair: what a projector needs besides the gamma-dependent mask.

    Attributes:
        eig_in: (d_in,) eigenvalues of A, ascending, clamped to >= 0.
        basis_in: (d_in, d_in) eigenvectors of A as columns.
        eig_out: (d_out,) eigenvalues of S, or None for the identity output factor.
        basis_out: (d_out, d_out) eigenvectors of S, or None.
        out_features: d_out.
    """

    eig_in: torch.Tensor
    basis_in: torch.Tensor
    eig_out: torch.Tensor | None
    basis_out: torch.Tensor | None
    out_features: int

    @classmethod
    def from_factors(cls, A: torch.Tensor, S: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                     out_features: int | None = None, layer: str = "a layer") -> "Eigenbasis":
        """Eigendecompose A and S (two :func:`stable_eigh` calls; one when S is None).

        Args:
            A: (d_in, d_in); S: (d_out, d_out) or None (then ``out_features`` gives d_out).
            dtype: float32 or float64 for the eigendecomposition and the stored bases.
            layer: the parameter path, named by a CurvatureError.

        Raises:
            CurvatureError: a factor is not finite or not positive semi-definite within tolerance.
        """
        eig_in, basis_in = stable_eigh(A, dtype, label=f"K-FAC factor A of {layer}")
        if S is None:
            if out_features is None:
                raise ValueError("out_features is required when S is None (identity output factor)")
            return cls(eig_in, basis_in, None, None, int(out_features))
        eig_out, basis_out = stable_eigh(S, dtype, label=f"K-FAC factor S of {layer}")
        return cls(eig_in, basis_in, eig_out, basis_out, int(S.shape[0]))

    def to(self, device: torch.device | str) -> "Eigenbasis":
        """A copy on ``device``."""
        move = (lambda t: None if t is None else t.to(device))
        return Eigenbasis(move(self.eig_in), move(self.basis_in), move(self.eig_out), move(self.basis_out),
                          self.out_features)

    def input_only(self) -> "Eigenbasis":
        """The same eigenbasis with the output factor S replaced by the identity (A (x) I): the activation-covariance
        (Adam-NSCL) curvature. Its projector removes whole eigendirections of A, the same for every output row."""
        return Eigenbasis(self.eig_in, self.basis_in, None, None, self.out_features)


@dataclass
class LayerDiagnostics:
    """What a projector removes from one layer, for reports.

    Attributes:
        removed: number of Kronecker directions removed (out of ``total``).
        total: d_out * d_in.
        removed_energy: fraction of the curvature trace removed (>= gamma by construction).
        top_share_in: share of tr(A) held by A's top eigenvalue (near 1 means a massive-activation direction).
        top_share_out: share of tr(S) held by S's top eigenvalue.
    """

    removed: int
    total: int
    removed_energy: float
    top_share_in: float
    top_share_out: float

    @property
    def kept_fraction(self) -> float:
        return 1.0 - self.removed / self.total


class KroneckerProjector:
    """Orthogonal projector onto the kept eigenvectors of A (x) S, applied matrix-free.

    Build with :meth:`from_factors`. ``S=None`` gives the activation-covariance projector (S replaced by the
    identity; the Adam-NSCL / AlphaEdit-style nullspace of the paper's Proposition 1), which never forms a d_out x d_out
    matrix.

    Args:
        eig_in: (d_in,) eigenvalues of A, ascending.
        basis_in: (d_in, d_in) eigenvectors of A as columns.
        eig_out: (d_out,) eigenvalues of S, or None for the identity.
        basis_out: (d_out, d_out) eigenvectors of S, or None for the identity.
        mask: (d_out, d_in) bool keep-mask.
        gamma: the energy threshold that produced the mask.
    """

    def __init__(self, eig_in, basis_in, eig_out, basis_out, mask, gamma: float):
        self.eig_in = eig_in
        self.basis_in = basis_in
        self.eig_out = eig_out
        self.basis_out = basis_out
        self.mask = mask
        self.gamma = gamma

    @classmethod
    def from_factors(cls, A: torch.Tensor, S: torch.Tensor | None, gamma: float, out_features: int | None = None,
                     dtype: torch.dtype = torch.float32) -> "KroneckerProjector":
        """Eigendecompose the factors (in ``dtype``) and build the energy mask.

        Args:
            A: (d_in, d_in) activation covariance.
            S: (d_out, d_out) output-gradient covariance, or None for the identity (then ``out_features`` is needed).
            gamma: energy threshold in (0, 1].
            out_features: d_out when S is None.
            dtype: float32 or float64 for the eigendecomposition and the stored bases.
        """
        return cls.from_eigenbasis(Eigenbasis.from_factors(A, S, dtype, out_features), gamma)

    @classmethod
    def from_eigenbasis(cls, basis: "Eigenbasis", gamma: float) -> "KroneckerProjector":
        """The projector for ``gamma`` from an existing eigendecomposition (only the mask is computed)."""
        eig_out_for_mask = basis.eig_out if basis.eig_out is not None else torch.ones(
            basis.out_features, dtype=basis.eig_in.dtype, device=basis.eig_in.device)
        mask = energy_mask(eig_out_for_mask, basis.eig_in, gamma)
        return cls(basis.eig_in, basis.basis_in, basis.eig_out, basis.basis_out, mask, gamma)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight matrices this projector acts on."""
        return tuple(self.mask.shape)

    def to(self, device: torch.device | str) -> "KroneckerProjector":
        """Move bases and mask to ``device`` (returns self)."""
        for name in ("eig_in", "basis_in", "eig_out", "basis_out", "mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def in_dtype(self, dtype: torch.dtype) -> "KroneckerProjector":
        """This projector with its eigenvectors stored in ``dtype`` (same mask and eigenvalues), so that
        :meth:`rotate`, :meth:`unrotate` and :meth:`project` run their matmuls in ``dtype`` (bf16 matmuls are about
        4x faster than fp32 on CPUs with AVX512-BF16 and on GPUs). The result is only as orthogonal as ``dtype``
        allows (bf16: a relative error of about 2^-8 per product), so it is meant for the gradient's projection,
        whose error a full-precision projection of the step removes. Returns self for the basis' own dtype.
        """
        if dtype == self.basis_in.dtype:
            return self
        cast = None if self.basis_out is None else self.basis_out.to(dtype)
        return KroneckerProjector(self.eig_in, self.basis_in.to(dtype), self.eig_out, cast, self.mask, self.gamma)

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """Coordinates of Q in the Kronecker eigenbasis: U_S^T Q U_A, shape (d_out, d_in), in the basis dtype."""
        rotated = Q.to(self.basis_in.dtype) @ self.basis_in
        if self.basis_out is not None:
            rotated = self.basis_out.T @ rotated
        return rotated

    def unrotate(self, C: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate`: U_S C U_A^T, shape (d_out, d_in), in the basis dtype."""
        out = C.to(self.basis_in.dtype) @ self.basis_in.T
        if self.basis_out is not None:
            out = self.basis_out @ out
        return out

    def project(self, Q: torch.Tensor) -> torch.Tensor:
        """P(Q) = U_S((U_S^T Q U_A) * M)U_A^T, computed in the basis dtype and returned in Q's dtype.

        Args:
            Q: (d_out, d_in) matrix (a weight gradient, an optimizer step or a weight change).
        """
        if tuple(Q.shape) != self.shape:
            raise ValueError(f"projector for shape {self.shape} got a matrix of shape {tuple(Q.shape)}")
        coords = self.rotate(Q.to(self.basis_in.dtype))
        coords.mul_(self.mask)
        return self.unrotate(coords).to(Q.dtype)

    def removed_component(self, Q: torch.Tensor) -> torch.Tensor:
        """Q - P(Q): the part of Q along removed (high-curvature) directions."""
        return Q - self.project(Q)

    def diagnostics(self) -> LayerDiagnostics:
        """Removed directions and energies, and the top-eigenvalue shares of both factors."""
        eig_out = self.eig_out if self.eig_out is not None else torch.ones(
            self.shape[0], dtype=self.eig_in.dtype, device=self.eig_in.device)
        products = eig_out[:, None].double() * self.eig_in[None, :].double()
        total_energy = float(products.sum())
        removed_energy = float(products[~self.mask].sum()) / total_energy if total_energy > 0 else 0.0
        return LayerDiagnostics(
            removed=int((~self.mask).sum()),
            total=self.mask.numel(),
            removed_energy=removed_energy,
            top_share_in=_top_share(self.eig_in),
            top_share_out=_top_share(eig_out),
        )


def _top_share(eigenvalues: torch.Tensor) -> float:
    total = float(eigenvalues.double().sum())
    return float(eigenvalues.max()) / total if total > 0 else 0.0


def kfac_quadratic_form(delta: torch.Tensor, A: torch.Tensor, S: torch.Tensor) -> float:
    """q(dW) = 1/2 vec(dW)^T (A (x) S) vec(dW) = 1/2 tr(dW^T S dW A).

    The K-FAC prediction of the increase of the (token-mean) capability loss caused by the weight change dW.

    Args:
        delta: (d_out, d_in) weight change.
        A: (d_in, d_in) activation covariance.
        S: (d_out, d_out) output-gradient covariance.
    """
    d = delta.to(A.dtype)
    return 0.5 * float(((S @ d) * (d @ A)).sum())
