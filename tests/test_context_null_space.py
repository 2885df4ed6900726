"""The edit prompts' other positions as a constraint (issue 9, ``context_null_space_energy``): the energy rule, the
projection against a dense pseudo-inverse oracle, the context covariance against inputs captured by hand, and
through apply_crispedit a keyed edit whose change does not act on the context inputs, so the model deployed is the
model trained (on SmolLM2: benchmarks/README.md)."""

import copy

import pytest
import torch

from crispedit_easyedit.context_null_space import ContextNullSpace, ExactIntersection, context_covariances
from crispedit_easyedit.editing import (
    apply_crispedit, chunk_context_null_spaces, collate, edit_examples, edit_key_positions, edit_targets,
)
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.projector import KroneckerProjector
from tests.test_editing import corpus_factors, hparams
from tests.test_key_positions import FACTS
from tests.tiny_models import tiny_llama, tiny_tokenizer


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _span_projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double() @ basis.double().T


@pytest.mark.parametrize("energy, expected", [(0.5, 1), (0.7, 2), (0.8, 3), (0.9, 3), (0.99, 5)])
def test_the_protected_directions_are_the_fewest_top_eigenvectors_holding_the_energy(energy, expected):
    eigenvalues = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)  # shares .52 .77 .90 .97 1
    Q = _orthonormal(6, 0)
    space = ContextNullSpace.from_covariance(Q @ torch.diag(eigenvalues) @ Q.T, energy, context_tokens=7)
    assert space.protected_directions == expected
    torch.testing.assert_close(_span_projector(space.basis), _span_projector(Q[:, :expected]), atol=1e-6, rtol=0)
    assert space.energy == pytest.approx(float(eigenvalues[:expected].sum() / eigenvalues.sum()), rel=1e-6)
    assert space.energy >= energy and space.context_tokens == 7


def test_the_projection_is_the_dense_projector_onto_the_inputs_null_space():
    """Context inputs C (5, 12) of full row rank, every direction above 0.1 % of the energy: the protected span is
    C's row space, and the projection of dW (4, 12) is dW (I - C^+ C), stored either way round."""
    generator = torch.Generator().manual_seed(1)
    C = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    space = ContextNullSpace.from_covariance(C.T @ C, 0.999, context_tokens=5)
    assert space.protected_directions == 5
    dW = torch.randn(4, 12, generator=generator)
    oracle = dW.double() @ (torch.eye(12, dtype=torch.float64) - torch.linalg.pinv(C) @ C)
    torch.testing.assert_close(space.project(dW).double(), oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(space.project(dW.T.contiguous(), transposed=True).double(), oracle.T, atol=1e-5,
                               rtol=0)
    assert float((space.project(dW).double() @ C.T).abs().max()) < 1e-5  # it no longer acts on any context input


def _keyed_batch_and_inputs(model, tok, hp):
    """The keyed batch of FACTS and each edited module's inputs (batch, T, d_in) in ``model``'s forward of it."""
    examples = edit_examples(tok, FACTS, hp)
    batch = collate(examples, 0, edit_key_positions(tok, FACTS, hp, examples))
    modules = {t.name: model.get_submodule(t.name.rsplit(".", 1)[0]) for t in edit_targets(model, hp)}
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
               for n, m in modules.items()]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return batch, modules, seen


def test_the_context_covariance_sums_the_inputs_at_attended_positions_outside_the_keys():
    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(layers=[1, 2], edit_positions="subject_last_only", max_length=64)
    batch, modules, seen = _keyed_batch_and_inputs(model, tok, hp)
    assert not bool(batch["attention_mask"].all())  # padding present: padded positions must not count
    context = batch["attention_mask"].bool() & ~batch["key_mask"]
    halves = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 2), slice(2, 3))]  # two batches
    for name, (covariance, tokens) in context_covariances(model, modules, halves).items():
        x = seen[name][context].double()
        assert tokens == int(context.sum()) == x.shape[0]
        torch.testing.assert_close(covariance, x.T @ x, atol=1e-9, rtol=1e-9)


def _keyed_edit(energy: float):
    """A subject-keyed tiny-model edit of FACTS; returns the model before and after, the hparams and the report."""
    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(edit_positions="subject_last_only", max_length=64, num_steps=40, energy_threshold=0.3,
                 context_null_space_energy=energy)
    before = copy.deepcopy(model)
    report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(before, hp, tok), progress=False)
    return tok, before, model, hp, report


def test_a_protected_keyed_edit_does_not_act_on_the_context_inputs():
    """With the context null space the change dW of every layer satisfies ||dW U|| ~ 0 for the protected directions
    U and ||dW C^T|| <= ||dW||_2 sqrt(1 - e) ||C|| on the context inputs C, so at the edit prompts' other positions
    the edited layer's output is (within that bound) the one keyed training saw; without it the bound fails. (A
    random tiny model cannot learn keyed edits, so whether the edit lands is measured on SmolLM2 in
    benchmarks/README.md.)"""
    tok, before, protected, hp, report = _keyed_edit(0.99)
    spaces = chunk_context_null_spaces(before, tok, FACTS, hp, edit_targets(before, hp))
    assert report.context_protected_directions == [{n: s.protected_directions for n, s in spaces.items()}]
    _, _, free, _, free_report = _keyed_edit(0.0)
    assert free_report.context_protected_directions == []
    batch, _, context_inputs = _keyed_batch_and_inputs(before, tok, hp)
    context = batch["attention_mask"].bool() & ~batch["key_mask"]
    for name, space in spaces.items():
        C = context_inputs[name][context].double()
        bound_factor = (1 - space.energy) ** 0.5 * float(C.norm())
        for model, holds in ((protected, True), (free, False)):
            dW = (model.get_parameter(name) - before.get_parameter(name)).detach().double()
            assert float((dW @ space.basis.double()).norm()) < 1e-5 * float(dW.norm()) or not holds
            within = float((dW @ C.T).norm()) <= float(torch.linalg.matrix_norm(dW, 2)) * bound_factor * (1 + 1e-6)
            assert within == holds, (name, holds)


def test_alternating_rounds_leave_less_of_the_change_in_the_removed_directions():
    """Rounds of alternating projections (capability, then context) lower the share of each chunk's change in the
    capability projector's removed directions, and the change stays in the context null space at every count."""
    tok = tiny_tokenizer()
    leaks = []
    for rounds in (1, 4):
        model = tiny_llama()
        hp = hparams(edit_positions="subject_last_only", max_length=64, num_steps=10, lr=0.05,
                     energy_threshold=0.3, context_null_space_energy=0.99, context_null_space_rounds=rounds)
        before = copy.deepcopy(model)
        spaces = chunk_context_null_spaces(before, tok, FACTS, hp, edit_targets(before, hp))
        report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(before, hp, tok), progress=False)
        leaks.append(max(report.chunk_leak_fractions[0].values()))
        for name, space in spaces.items():
            dW = (model.get_parameter(name) - before.get_parameter(name)).detach().double()
            assert float((dW @ space.basis.double()).norm()) < 1e-5 * float(dW.norm())
    assert leaks[1] < 0.7 * leaks[0], leaks


def _projector_and_space(d_out: int, d_in: int, rank: int, gamma: float, seed: int):
    """A K-FAC projector from random factors (distinct spectra) and a context null space of ``rank`` directions."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d_in, d_in, generator=generator, dtype=torch.float64)
    Y = torch.randn(3 * d_out, d_out, generator=generator, dtype=torch.float64)
    projector = KroneckerProjector.from_factors(X.T @ X, Y.T @ Y, gamma, dtype=torch.float64)
    C = torch.randn(rank, d_in, generator=generator, dtype=torch.float64)
    return projector, ContextNullSpace.from_covariance(C.T @ C, 0.9999, context_tokens=rank), C


def _dense_intersection(projector: KroneckerProjector, space: ContextNullSpace, mask=None) -> torch.Tensor:
    """Dense oracle on vec(dW) (row-major, d_out * d_in): an orthonormal basis of the kept Kronecker eigenvectors,
    then the null space of the context constraint vec(dW U) = 0 inside it; returns the projector (n, n)."""
    mask = projector.mask if mask is None else mask
    U_S, U_A = projector.basis_out.double(), projector.basis_in.double()
    kept = [torch.outer(U_S[:, i], U_A[:, j]).flatten() for i, j in torch.nonzero(mask).tolist()]
    K = torch.stack(kept, dim=1)  # (n, kept): orthonormal columns
    d_out, d_in = mask.shape
    constraint = torch.kron(torch.eye(d_out, dtype=torch.float64), space.basis.double().T.contiguous())  # vec(dW U)
    inside = constraint @ K
    _, singular, Vh = torch.linalg.svd(inside, full_matrices=True)
    rank = int((singular > 1e-9).sum())
    N = K @ Vh[rank:].T  # (n, dim): orthonormal basis of the intersection
    return N @ N.T


def test_the_exact_intersection_is_the_dense_projector_onto_both_subspaces():
    """Against a dense oracle (vec space of 6 x 9 changes): one group per prefix length reproduces the projection
    onto {dW in the capability kept span, dW U = 0} exactly, with no leak (GPT-2's transposed storage: the chunk
    test below)."""
    projector, space, C = _projector_and_space(6, 9, rank=3, gamma=0.6, seed=3)
    exact = ExactIntersection(projector, space, max_groups=100)
    assert exact.dropped_share == 0.0
    oracle = _dense_intersection(projector, space)
    assert exact.dimension == round(float(torch.trace(oracle)))
    dW = torch.randn(6, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    projected = exact(dW)
    torch.testing.assert_close(projected.flatten(), oracle @ dW.flatten(), atol=1e-10, rtol=0)
    torch.testing.assert_close(projector.project(projected), projected, atol=1e-10, rtol=0)  # no capability leak
    # acts on no context input (up to the float32 storage of the protected basis)
    assert float((projected @ C.T).norm()) < 1e-6 * float(projected.norm()) * float(C.norm())
    assert float(projected.norm()) > 0.1 * float(dW.norm())  # a real subspace, not the zero map


def test_grouped_prefixes_project_orthogonally_onto_a_smaller_subspace_of_the_intersection():
    """With fewer groups than prefix lengths, each row's prefix is shortened: the map is the dense projector onto
    the intersection with that shortened mask, which lies inside the full intersection."""
    projector, space, _ = _projector_and_space(8, 10, rank=3, gamma=0.5, seed=5)
    full = ExactIntersection(projector, space, max_groups=100)
    grouped = ExactIntersection(projector, space, max_groups=2)
    assert len(grouped.groups) <= 2 < len(full.groups) and 0.0 < grouped.dropped_share < 1.0
    shortened = torch.zeros_like(projector.mask)
    for rows, length, _ in grouped.groups:
        shortened[rows[:, None], grouped.order[None, :length]] = True
    assert bool((projector.mask | ~shortened).all())  # a subset of the kept coordinates
    oracle = _dense_intersection(projector, space, shortened)
    dW = torch.randn(8, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(grouped(dW).flatten(), oracle @ dW.flatten(), atol=1e-10, rtol=0)
    assert grouped.dimension == round(float(torch.trace(oracle))) < full.dimension
    outer = _dense_intersection(projector, space)
    torch.testing.assert_close(outer @ oracle, oracle, atol=1e-10, rtol=0)  # inside the full intersection


def test_the_exact_composition_leaves_nothing_in_either_removed_set():
    """Through apply_crispedit: under 'exact' the change is in the context null space and leaks nothing into the
    capability projector's removed directions (the alternating single round leaves a measurable share there)."""
    tok = tiny_tokenizer()
    leaks = {}
    for composition in ("alternate", "exact"):
        model = tiny_llama()
        hp = hparams(edit_positions="subject_last_only", max_length=64, num_steps=10, lr=0.05,
                     energy_threshold=0.3, context_null_space_energy=0.99,
                     context_null_space_composition=composition)
        before = copy.deepcopy(model)
        spaces = chunk_context_null_spaces(before, tok, FACTS, hp, edit_targets(before, hp))
        report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(before, hp, tok), progress=False)
        leaks[composition] = max(report.chunk_leak_fractions[0].values())
        for name, space in spaces.items():
            dW = (model.get_parameter(name) - before.get_parameter(name)).detach().double()
            assert float(dW.norm()) > 0
            assert float((dW @ space.basis.double()).norm()) < 1e-5 * float(dW.norm())
    assert leaks["exact"] < 1e-5 < 0.01 < leaks["alternate"], leaks


@pytest.mark.parametrize("overrides, message", [
    (dict(context_null_space_energy=0.9), "needs a keyed edit_positions, one of \\['subject_last', "
                                          "'subject_last_only'\\]"),
    (dict(context_null_space_energy=0.9, edit_positions="subject_last_only", projection_mode="eigenbasis"),
     "needs projection_mode 'gradient', 'update' or 'both'"),
    (dict(context_null_space_energy=1.0, edit_positions="subject_last_only"), "must be in \\[0, 1\\)"),
    (dict(context_null_space_energy=-0.1, edit_positions="subject_last_only"), "context_null_space_energy"),
    (dict(context_null_space_rounds=3), "context_null_space_rounds 3 has no effect without"),
    (dict(context_null_space_composition="exact"), "context_null_space_composition 'exact' has no effect without"),
    (dict(context_null_space_composition="closest", context_null_space_energy=0.9, edit_positions="subject_last_only"),
     "context_null_space_composition.*'alternate', 'exact'"),
    (dict(context_null_space_rounds=4, context_null_space_composition="exact", context_null_space_energy=0.9,
          edit_positions="subject_last_only"), "applies to context_null_space_composition 'alternate' only"),
    (dict(context_null_space_rounds=0, context_null_space_energy=0.9, edit_positions="subject_last_only"),
     "context_null_space_rounds"),
])
def test_bad_context_null_space_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(model_name="m", layers=[1], **overrides)


@pytest.mark.parametrize("composition", ["alternate", "exact"])
def test_each_chunk_protects_its_own_context_and_a_conv1d_weight_is_projected_on_its_input_side(composition):
    """GPT-2 stores c_proj as (d_in, d_out): the change of every chunk (CrispEdit-Seq, chunks of 2 edits) leaves the
    protected input directions of that chunk's context, taken at the weights the chunk started from, untouched;
    under 'exact' it also leaves nothing in the removed directions of that chunk's projector (capability merged
    with the earlier chunk's statistics). (Layers 0 and 1 of 3: a keyed change in the last block reaches no
    target through attention.)"""
    import crispedit_easyedit.editing as editing
    from tests.tiny_models import tiny_gpt2

    tok, model = tiny_tokenizer(), tiny_gpt2()
    hp = hparams(layers=[0, 1], rewrite_module_tmp="transformer.h.{}.mlp.c_proj.weight", max_length=64,
                 num_steps=5, lr=2e-2, chunk_size=2, edit_positions="subject_last_only",
                 context_null_space_energy=0.95, context_null_space_composition=composition)
    targets = edit_targets(model, hp)
    assert all(t.transposed for t in targets)
    chunk_starts, built = [], []
    original = editing.chunk_context_null_spaces

    def recording(model_, tok_, requests, hparams_, targets_):
        chunk_starts.append({t.name: t.param.detach().clone() for t in targets_})
        built.append(original(model_, tok_, requests, hparams_, targets_))
        return built[-1]

    editing.chunk_context_null_spaces = recording
    try:
        report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(copy.deepcopy(model), hp, tok),
                                 progress=False)
    finally:
        editing.chunk_context_null_spaces = original
    assert report.chunks == 2 and len(built) == 2 == len(report.context_protected_directions)
    ends = chunk_starts[1:] + [{t.name: t.param.detach() for t in targets}]
    for start, end, spaces in zip(chunk_starts, ends, built):
        for t in targets:
            change = (end[t.name] - start[t.name]).double()  # (d_in, d_out)
            basis = spaces[t.name].basis.double()
            assert float(change.norm()) > 0
            assert float((basis.T @ change).norm()) < 1e-5 * float(change.norm())
    if composition == "exact":
        assert max(max(leaks.values()) for leaks in report.chunk_leak_fractions) < 1e-5


def test_a_mask_that_is_not_nested_is_refused_by_name():
    """The row grouping needs the energy rule's nested mask; any other mask is refused, naming the alternative."""
    projector, space, _ = _projector_and_space(4, 5, rank=2, gamma=0.5, seed=7)
    projector.mask = torch.tensor([[True, False, True, False, False]] * 2 + [[False, True, False, True, False]] * 2)
    with pytest.raises(ValueError, match="does not keep a prefix of one column order.*alternating rounds"):
        ExactIntersection(projector, space)
