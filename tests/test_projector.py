"""Projector oracles: the matrix-free projection equals the dense projector onto kept eigenvectors of A (x) S."""

import pytest
import torch

from crispedit_easyedit.projector import KroneckerProjector, energy_mask, kfac_quadratic_form, stable_eigh


def random_spd(n, seed, repeated=0):
    """Random SPD matrix; with ``repeated`` > 0 its top eigenvalue is repeated that many extra times."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.01
    if repeated:
        eig[: repeated + 1] = eig.max()
    return Q @ torch.diag(eig) @ Q.T


def dense_projector(A, S, keep_rule):
    """Explicit projector onto span{u_A_j (x) u_S_i : keep_rule(l_S_i * l_A_j)} in column-major vec order."""
    lA, UA = torch.linalg.eigh(A)
    lS, US = torch.linalg.eigh(S)
    P = torch.zeros(A.shape[0] * S.shape[0], A.shape[0] * S.shape[0], dtype=torch.float64)
    for j in range(A.shape[0]):
        for i in range(S.shape[0]):
            if keep_rule(lS[i] * lA[j]):
                v = torch.kron(UA[:, j], US[:, i])
                P += torch.outer(v, v)
    return P


def vec(M):  # column-major
    return M.T.reshape(-1)


def unvec(v, rows, cols):
    return v.reshape(cols, rows).T


@pytest.mark.parametrize("d_out,d_in,repeated,gamma", [(3, 4, 0, 0.5), (5, 3, 0, 0.9), (4, 6, 2, 0.7), (6, 5, 3, 0.3)])
def test_projection_equals_dense_projector(d_out, d_in, repeated, gamma):
    A = random_spd(d_in, 1, repeated)
    S = random_spd(d_out, 2, repeated)
    proj = KroneckerProjector.from_factors(A, S, gamma, dtype=torch.float64)
    # the same kept set, expressed as a predicate on eigenvalue products (threshold taken from the mask)
    lS, lA = proj.eig_out, proj.eig_in
    products = lS[:, None] * lA[None, :]
    threshold = products[~proj.mask].min()
    P = dense_projector(A, S, lambda lam: lam < threshold * (1 - 1e-9))
    Q = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = unvec(P @ vec(Q), d_out, d_in)
    torch.testing.assert_close(proj.project(Q), expected, rtol=1e-10, atol=1e-10)
    # idempotent and symmetric: <P(Q1), Q2> = <Q1, P(Q2)>
    torch.testing.assert_close(proj.project(proj.project(Q)), proj.project(Q), rtol=1e-10, atol=1e-10)
    Q2 = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose((proj.project(Q) * Q2).sum(), (Q * proj.project(Q2)).sum(), atol=1e-10)
    # no component along removed directions
    coords = proj.rotate(proj.project(Q))
    assert coords[~proj.mask].abs().max() < 1e-10


def test_energy_mask_removes_fewest_largest_products_and_ties():
    eig_out = torch.tensor([1.0, 2.0])
    eig_in = torch.tensor([1.0, 3.0])
    # products [[1, 3], [2, 6]] total 12: gamma 0.5 -> remove 6 (6/12 = 0.5 reached)
    mask = energy_mask(eig_out, eig_in, 0.5)
    assert mask.tolist() == [[True, True], [True, False]]
    # gamma 0.6 -> 6 + 3 = 9 >= 7.2
    assert energy_mask(eig_out, eig_in, 0.6).tolist() == [[True, False], [True, False]]
    # ties: products [[2, 2], [2, 2]]: gamma 0.3 reaches at the first 2, and every tied product is removed
    assert not energy_mask(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 0.3).any()
    # numerically repeated eigenvalues (1 ulp apart in fp32) are ties too
    almost = torch.tensor([2.0, torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))])
    assert not energy_mask(torch.tensor([1.0]), almost, 0.3).any()


def test_gamma_one_removes_exactly_nonzero_curvature():
    eig_out = torch.tensor([0.0, 1.0, 2.0])
    eig_in = torch.tensor([0.0, 0.5])
    mask = energy_mask(eig_out, eig_in, 1.0)
    products = eig_out[:, None] * eig_in[None, :]
    assert torch.equal(mask, products == 0)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan")])
def test_bad_gamma_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        energy_mask(torch.ones(2), torch.ones(2), gamma)


def test_identity_output_factor_is_activation_nullspace_projector():
    A = random_spd(5, 7)
    proj = KroneckerProjector.from_factors(A, None, 0.9, out_features=3, dtype=torch.float64)
    lA, UA = torch.linalg.eigh(A)
    kept = proj.mask[0]
    assert torch.equal(proj.mask, kept.expand(3, -1))  # the same input directions for every output row
    U_keep = UA[:, kept]
    Q = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(proj.project(Q), Q @ U_keep @ U_keep.T, rtol=1e-10, atol=1e-10)
    # equal to the Kronecker projector with S = I
    full = KroneckerProjector.from_factors(A, torch.eye(3, dtype=torch.float64), 0.9, dtype=torch.float64)
    torch.testing.assert_close(full.project(Q), proj.project(Q), rtol=1e-10, atol=1e-10)


def test_quadratic_form_matches_dense():
    A, S = random_spd(4, 11), random_spd(3, 12)
    dW = torch.randn(3, 4, dtype=torch.float64)
    dense = 0.5 * vec(dW) @ torch.kron(A, S) @ vec(dW)
    assert kfac_quadratic_form(dW, A, S) == pytest.approx(float(dense), rel=1e-12)


def test_eigh_clamps_negative_and_uses_requested_dtype():
    M = torch.diag(torch.tensor([-1e-6, 1.0, 2.0])).to(torch.bfloat16)
    eig, vecs = stable_eigh(M, torch.float64)
    assert eig.dtype == torch.float64 and vecs.dtype == torch.float64
    assert eig.min() == 0.0


def test_diagnostics_report_massive_direction():
    eig = torch.tensor([1e-3] * 9 + [1e3], dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    A = U @ torch.diag(eig) @ U.T
    proj = KroneckerProjector.from_factors(A, torch.eye(2, dtype=torch.float64), 0.8, dtype=torch.float64)
    diag = proj.diagnostics()
    assert diag.top_share_in > 0.99
    assert diag.removed == 2 and diag.total == 20  # only the massive direction (x 2 outputs) goes
    assert diag.removed_energy >= 0.8


def dense_energy_mask(eig_out, eig_in, gamma):
    """The energy rule on the materialised, fully sorted products (the definition; O(d_out d_in) float64)."""
    tie_rtol = 1000 * torch.finfo(torch.promote_types(eig_out.dtype, eig_in.dtype)).eps
    products = eig_out[:, None].double() * eig_in[None, :].double()
    if products.sum() <= 0:
        return torch.ones(products.shape, dtype=torch.bool)
    if gamma == 1.0:
        return products <= 0
    ordered = torch.sort(products.flatten(), descending=True).values
    cut = int(torch.searchsorted(torch.cumsum(ordered, 0), gamma * products.sum()).clamp_max(ordered.numel() - 1))
    if ordered[cut] <= 0:
        return products <= 0
    return products < ordered[cut] * (1 - tie_rtol)


@pytest.mark.parametrize("kind", ["random", "ties and zeros", "float64", "unsorted heavy tail"])
def test_energy_mask_equals_the_dense_definition(kind):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    for _ in range(40):
        d_out, d_in = (int(x) for x in torch.randint(1, 48, (2,), generator=g))
        eig_out, eig_in = torch.rand(d_out, generator=g) ** 4, torch.rand(d_in, generator=g) ** 4
        if kind == "ties and zeros":
            eig_out, eig_in = torch.round(eig_out * 3) / 3, torch.round(eig_in * 4) / 4
        elif kind == "float64":
            eig_out, eig_in = eig_out.double(), eig_in.double()
        elif kind == "unsorted heavy tail":
            eig_out, eig_in = torch.exp(20 * eig_out), torch.exp(30 * eig_in)
        for gamma in (0.05, 0.5, 0.8, 0.9, 0.999, 1.0):
            assert torch.equal(energy_mask(eig_out, eig_in, gamma), dense_energy_mask(eig_out, eig_in, gamma)), (
                kind, gamma, d_out, d_in)


def test_energy_mask_allocates_nothing_of_the_product_count_but_the_mask():
    """At a small scale the largest tensor energy_mask creates is the bool mask (no float products, no sort)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes[str(func)] = max(self.bytes.get(str(func), 0), t.numel() * t.element_size())
            return out

    d_out, d_in = 96, 200
    eig_out, eig_in = torch.rand(d_out) ** 3, torch.rand(d_in) ** 3
    with Largest() as seen:
        mask = energy_mask(eig_out, eig_in, 0.8)
    assert mask.dtype == torch.bool
    biggest = sorted(seen.bytes.items(), key=lambda item: -item[1])
    assert biggest[0][1] == d_out * d_in  # the returned mask itself
    assert biggest[1][1] <= 8 * (d_in + 1), biggest[:3]  # then O(d_in) vectors
    from crispedit_easyedit.projector import energy_mask_memory_bytes, projector_memory_bytes

    assert energy_mask_memory_bytes(d_out, d_in) >= d_out * d_in + biggest[1][1]
    llama = projector_memory_bytes(4096, 14336)  # the documented Llama-3-8B down_proj figures
    assert round(llama["resident"] / 2**20) == 904 and round(llama["project_transient"] / 2**20) == 448
