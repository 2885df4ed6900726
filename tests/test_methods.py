"""The harness's in-package methods: the Adam-NSCL projector against a dense oracle, and every adapter end to end
on a tiny Llama with the same receipt schema."""

from __future__ import annotations

import json

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


# ------------------------------------------------------------------------------------------------------------------
# Every in-package method through the harness, end to end on a tiny Llama

from crispedit_easyedit.bench import harness  # noqa: E402
from tests.test_cli import HPARAMS  # noqa: E402
from tests.tiny_models import SHARED_DATA, tiny_tokenizer as _tok, training_text  # noqa: E402

needs_data = pytest.mark.skipif(not (SHARED_DATA / "zsre_train.json").exists(), reason="needs ../shared/data")

LORA_HPARAMS = """alg_name: LoRA-peft
layers: [1, 2]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
rank: 4
alpha: 8
lr: 2e-2
num_steps: 30
train_batch_size: 4
max_length: 48
"""


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A tiny Llama folder and hparams tree (hparams/CrispEdit/tiny.yaml, hparams/LoRA-peft/tiny.yaml)."""
    root = tmp_path_factory.mktemp("bench")
    tiny_llama().save_pretrained(root / "model")
    _tok().save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(training_text()))
    (root / "hparams" / "CrispEdit").mkdir(parents=True)
    (root / "hparams" / "CrispEdit" / "tiny.yaml").write_text(HPARAMS.format(corpus=corpus, cache=root / "kfac"))
    (root / "hparams" / "LoRA-peft").mkdir(parents=True)
    (root / "hparams" / "LoRA-peft" / "tiny.yaml").write_text(LORA_HPARAMS)
    return root


def bench_config(root, method: str, hparams_dir: str = "CrispEdit", **method_extra):
    return {
        "method": {"name": method, "hparams": str(root / "hparams" / hparams_dir / "tiny.yaml"), **method_extra},
        "model": {"name": str(root / "model"), "hparams_name": "tiny"},
        "dataset": {"name": "zsre", "path": str(SHARED_DATA / "zsre_train.json"), "start": 0, "count": 3},
        "evaluation": {"hparams": str(root / "hparams" / "CrispEdit" / "tiny.yaml"), "templates": ["qa"],
                       "n_probes": 2, "heldout_sequences": 2, "heldout_seq_len": 32, "eval_batch_size": 8,
                       "easyedit_metrics": False},
        "results_file": str(root / "results.jsonl"),
        "before_cache_dir": str(root / "before"),
        "progress": False,
    }


METHOD_CASES = [
    ("crispedit", "CrispEdit", {}),
    ("crispedit", "CrispEdit", {"overrides": {"projection_mode": "gradient"}}),
    ("crispedit-seq", "CrispEdit", {"chunk_size": 2}),
    ("ft", "CrispEdit", {}),
    ("ft-seq", "CrispEdit", {"chunk_size": 2}),
    ("adam-nscl", "CrispEdit", {}),
    ("lora", "LoRA-peft", {}),
]


@needs_data
@pytest.mark.parametrize("method,folder,extra", METHOD_CASES, ids=[
    f"{m}-{'-'.join(f'{k}' for k in e) or 'default'}" for m, _, e in METHOD_CASES])
def test_every_in_package_method_runs_end_to_end_with_the_same_row_schema(tiny_bench, method, folder, extra):
    lines_before = (tiny_bench / "results.jsonl").read_text().count("\n") if (
        tiny_bench / "results.jsonl").exists() else 0
    row = harness.run_one(bench_config(tiny_bench, method, folder, **extra))
    lines = (tiny_bench / "results.jsonl").read_text().splitlines()
    assert len(lines) == lines_before + 1 and json.loads(lines[-1])["receipts"] == row["receipts"]
    assert tuple(row) == harness.ROW_KEYS
    assert row["method"] == method and row["records"]["n_edits"] == 3
    for receipt in row["receipts"]:
        assert set(harness.RECEIPT_KEYS) <= set(receipt) and receipt["method"] == method
        assert receipt["seconds"]["edit"] > 0
    assert sum(r["n_requests"] for r in row["receipts"]) == 3
    # the edit worked, measured by the shared evaluation
    assert row["after"]["teacher_forced"]["reliability"] > row["before"]["teacher_forced"]["reliability"] + 0.2
    assert row["after"]["capability"]["heldout_kl"] > 0
    assert {r["metric"] for r in row["comparison"]} >= {"reliability (rewrite token acc.)",
                                                        "held-out next-token KL(before || after)"}
    # the probes that changed verdict account for the change of Factbook accuracy
    asked = row["factbook_probes"]["asked"]
    net = sum(-1 if change["lost"] else 1 for change in row["factbook_changes"])
    assert net == round(asked * (row["after"]["capability"]["factbook_accuracy"]
                                 - row["before"]["capability"]["factbook_accuracy"]))
    # relative paths only
    assert f'"{tiny_bench}' not in lines[-1] and '"/' not in lines[-1]  # no JSON string is an absolute path
    settings = row["receipts"][0]["settings"]
    if method in ("ft", "ft-seq"):
        assert settings["projection_mode"] == "none"
    if method == "adam-nscl":
        assert settings["curvature_factors"] == "activation"
        layer = next(iter(row["receipts"][0]["report"]["layers"].values()))
        assert layer["removed_directions"] % 32 == 0  # whole input directions of A: d_out = 32 rows each
    if method == "crispedit":
        assert settings["projection_mode"] == extra.get("overrides", {}).get("projection_mode", "both")
    if method == "lora":
        assert row["receipts"][0]["trainable_parameters"] == 2 * 4 * (64 + 32)  # rank 4 on two 32 x 64 down_proj
        assert all(v > 0 for v in row["receipts"][0]["delta_norms"].values())
    if extra.get("chunk_size"):
        assert len(row["receipts"]) == 2 and row["retention"]["n_chunks"] == 2
        assert [len(r) for r in row["retention"]["after_chunk"]] == [1, 2]
        assert row["retention"]["after_chunk"][0][0] > row["retention"]["before"][0]
    else:
        assert len(row["receipts"]) == 1 and row["retention"] is None
    if method == "crispedit-seq":
        assert [r["report"]["weights_status"] for r in row["receipts"]] == ["first", "continue"]
        assert row["receipts"][1]["report"]["past_edits_protected"] == 2


@needs_data
def test_projection_protects_better_than_fine_tuning_in_the_receipts(tiny_bench):
    crisp = harness.run_one(bench_config(tiny_bench, "crispedit"))
    ft = harness.run_one(bench_config(tiny_bench, "ft"))
    crisp_layers = crisp["receipts"][0]["report"]["layers"].values()
    ft_layers = ft["receipts"][0]["report"]["layers"].values()
    assert max(layer["leak_fraction"] for layer in crisp_layers) < 1e-4  # projected: nothing in removed directions
    assert min(layer["leak_fraction"] for layer in ft_layers) > 0.05
    assert crisp["receipts"][0]["report"]["predicted_loss_increase"] < ft["receipts"][0]["report"][
        "predicted_loss_increase"]


def test_a_method_override_that_contradicts_the_method_names_the_right_one(tiny_bench):
    from crispedit_easyedit.bench.methods.crispedit import method_hparams

    with pytest.raises(ValueError, match="method 'ft' fixes projection_mode='none'.*use method 'crispedit'"):
        method_hparams("ft", {"hparams": str(tiny_bench / "hparams" / "CrispEdit" / "tiny.yaml"),
                              "overrides": {"projection_mode": "both"}})
    with pytest.raises(ValueError, match="unknown method 'memit-fast'; valid methods: .*'adam-nscl'"):
        harness.run_one(bench_config(tiny_bench, "memit-fast"))
    from crispedit_easyedit.bench.methods.lora import LoRAHyperParams

    with pytest.raises(ValueError, match="unknown LoRA hparams key 'rnk'"):
        LoRAHyperParams.from_dict({"layers": [1], "rnk": 4})
