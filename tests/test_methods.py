"""The harness's in-package methods: the Adam-NSCL projector against a dense oracle, and every adapter end to end
on a tiny Llama with the same receipt schema."""

from __future__ import annotations

import pytest
import torch

from crispedit_easyedit import CrispEditHyperParams, apply_crispedit
from crispedit_easyedit.editing import edit_targets
from crispedit_easyedit.projector import Eigenbasis, KroneckerProjector
from tests.test_editing import FACTS, corpus_factors
from tests.tiny_models import tiny_llama, tiny_tokenizer


def _spd(n: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """A random SPD matrix with eigenvalues spread over ``spread`` decades, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.logspace(0, -spread, n, dtype=torch.float64)
    return q @ torch.diag(values) @ q.T


def _dense_activation_oracle(A: torch.Tensor, gamma: float) -> torch.Tensor:
    """The input-side projector I - U_r U_r^T, U_r the fewest top eigenvectors of A whose eigenvalues reach gamma of
    tr(A) (dense eigh in float64)."""
    values, vectors = torch.linalg.eigh(A.double())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    shares = torch.cumsum(values, 0) / values.sum()
    removed = int(torch.searchsorted(shares, torch.tensor([gamma], dtype=torch.float64))[0]) + 1
    top = vectors[:, :removed]
    return torch.eye(A.shape[0], dtype=torch.float64) - top @ top.T


@pytest.mark.parametrize("gamma", [0.3, 0.8, 0.95])
def test_activation_projector_removes_exactly_the_top_energy_eigendirections_of_A(gamma):
    d_out, d_in = 5, 12
    A = _spd(d_in, seed=1)
    projector = KroneckerProjector.from_eigenbasis(
        Eigenbasis.from_factors(A, _spd(d_out, seed=2), torch.float64).input_only(), gamma)
    oracle = _dense_activation_oracle(A, gamma)
    Q = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(projector.project(Q), Q @ oracle, rtol=1e-9, atol=1e-10)
    # whole columns of the eigenbasis go: the same directions for every output row, S plays no part
    assert projector.basis_out is None
    assert bool((projector.mask == projector.mask[0]).all())
    kfac = KroneckerProjector.from_factors(A, _spd(d_out, seed=2), gamma, dtype=torch.float64)
    assert not torch.allclose(kfac.project(Q), Q @ oracle)  # the K-FAC projector is a different one


def test_curvature_factors_activation_edits_only_outside_the_top_directions_of_A():
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = CrispEditHyperParams(model_name="tiny", device="cpu", layers=[1, 2], num_steps=40, lr=5e-3,
                              train_batch_size=2, max_length=32, energy_threshold=0.6, cache_dir=None,
                              curvature_factors="activation")
    factors = corpus_factors(model, hp, tok)
    before = {t.name: t.param.detach().clone() for t in edit_targets(model, hp)}
    report = apply_crispedit(model, tok, FACTS, hp, factors=factors, progress=False)
    for t in edit_targets(model, hp):
        delta = (t.param.detach() - before[t.name]).double()
        assert delta.norm() > 1e-3  # the edit moved the weight
        oracle = _dense_activation_oracle(factors[t.name].A, 0.6)
        torch.testing.assert_close(delta @ oracle, delta, rtol=1e-4, atol=1e-6)  # nothing along A's top directions
        assert report.projectors[t.name].basis_out is None


def test_curvature_factors_is_validated_with_its_choices():
    with pytest.raises(ValueError, match="curvature_factors must be one of 'kfac', 'activation'; got 'fisher'"):
        CrispEditHyperParams(model_name="tiny", layers=[1], curvature_factors="fisher")
