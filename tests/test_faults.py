"""Faults and bad input on the Python API (issue 10): numbers checked where they enter (NaN/inf, asymmetric,
indefinite or sign-flipped factors), the edit undone on a non-finite loss or step, requests and hparams validated
before any work, saved edits that know their base, and files (stale temporaries, permissions)."""

from __future__ import annotations

import math
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from crispedit_easyedit import editing
from crispedit_easyedit.checks import (
    CurvatureError, NonFiniteError, check_factor, ensure_writable_dir, remove_stale_temporaries, user_file_mode,
)
from crispedit_easyedit.curvature import FactorSet, KFACFactors, model_fingerprint, write_safetensors
from crispedit_easyedit.delta import apply_changed_tensors, save_changed_tensors
from crispedit_easyedit.editing import apply_crispedit
from crispedit_easyedit.optim import ProjectedAdam
from crispedit_easyedit.projector import Eigenbasis, stable_eigh
from crispedit_easyedit.state import capability_curvature, edit_state, reset_edit_state
from tests.test_state import NAMES, corpus, make_hparams  # noqa: F401 - corpus is a fixture
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

FACT = [{"prompt": "The capital of France is", "target_new": "Rome"}]


def all_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g)
    return x @ x.T / (3 * n)


def factor_set(model, scale_a: float = 1.0, names=NAMES) -> FactorSet:
    params = dict(model.named_parameters())
    out = {}
    for i, n in enumerate(names):
        d_out, d_in = params[n].shape
        out[n] = KFACFactors(scale_a * spd(d_in, i), spd(d_out, 10 + i), 100)
    return FactorSet(out, {})


# ----------------------------------------------------------------------------------------------------------------
# Factors: finite, symmetric, positive semi-definite


def test_nan_weight_with_empirical_fisher_raises_before_anything_is_cached(corpus, tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    cache = tmp_path / "kfac"
    hp = make_hparams(corpus, fisher_type="empirical", cache_dir=str(cache))
    with pytest.raises(CurvatureError, match=r"K-FAC factor [AS] of model\.layers\.1\.mlp\.down_proj\.weight "
                                             r"\(collected\) has \d+ non-finite entries"):
        capability_curvature(model, tok, hp, progress=False)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("bad,message", [
    (lambda m: m.fill_(float("inf")), "non-finite entries"),
    (lambda m: m.add_(torch.triu(torch.ones_like(m), 1)), "not symmetric"),
])
def test_loaded_factors_are_checked(tmp_path, bad, message):
    model = tiny_llama()
    factors = factor_set(model)
    bad(factors[NAMES[0]].S)
    path = factors.save(tmp_path / "f.safetensors")
    with pytest.raises(CurvatureError, match=f"factor S of {NAMES[0]} .*{path}.* {message}"):
        FactorSet.load(path)


@pytest.mark.parametrize("make", [
    lambda n: -spd(n, 1),                                              # sign-flipped: negative definite
    lambda n: spd(n, 1) - 0.5 * torch.eye(n) * spd(n, 1).diagonal().mean(),   # indefinite
])
def test_indefinite_or_sign_flipped_factors_raise_instead_of_protecting_nothing(make):
    with pytest.raises(CurvatureError, match="is not positive semi-definite"):
        stable_eigh(make(16), torch.float64, label="K-FAC factor A of layer.x")


def test_rounding_noise_of_a_psd_factor_is_accepted():
    x = torch.randn(64, 8, dtype=torch.float64)
    rank_deficient = (x @ x.T).float()  # 56 zero eigenvalues, computed as tiny +- values
    eig, _ = stable_eigh(rank_deficient, torch.float32)
    assert eig.min() == 0.0 and eig.max() > 0


def test_sign_flipped_given_factors_do_not_edit_and_name_the_layer():
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams("unused")
    flipped = factor_set(model, scale_a=-1.0)
    before = all_params(model)
    with pytest.raises(CurvatureError, match=f"factor A of {NAMES[0]}.*not positive semi-definite"):
        apply_crispedit(model, tok, FACT, hp, factors=flipped, progress=False)
    assert_bit_identical(model, before)


def test_eigh_input_with_nan_is_named():
    m = spd(8, 0)
    m[2, 3] = m[3, 2] = float("nan")
    with pytest.raises(CurvatureError, match="K-FAC factor S of L has non-finite"):
        Eigenbasis.from_factors(spd(8, 1), m, layer="L")


# ----------------------------------------------------------------------------------------------------------------
# The edit: non-finite loss or step -> weights and state restored, bit-identical


def test_nan_factors_restore_the_weights_and_raise():
    model, tok = tiny_llama(), tiny_tokenizer()
    factors = factor_set(model)
    factors[NAMES[1]].A[0, 0] = float("nan")
    before = all_params(model)
    with pytest.raises(CurvatureError, match=f"factor A of {NAMES[1]} \\(given\\) has 1 non-finite"):
        apply_crispedit(model, tok, FACT, make_hparams("unused"), factors=factors, progress=False)
    assert_bit_identical(model, before)


def test_non_finite_step_restores_weights_and_state_bit_identically(corpus, monkeypatch):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus, num_steps=5)
    apply_crispedit(model, tok, FACT, hp, progress=False)  # a first edit: the state now continues a sequence
    state = edit_state(model)
    checkpoint = dict(state.checkpoint())
    before = all_params(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    real_step = ProjectedAdam.step
    calls = []

    def poisoned(self):
        calls.append(1)
        if len(calls) == 3:  # step 3: a NaN gradient, as from an overflow
            self.params[0].grad[0, 0] = float("nan")
        return real_step(self)

    monkeypatch.setattr(ProjectedAdam, "step", poisoned)
    with pytest.raises(NonFiniteError, match="non-finite gradient of parameter 0 at step 3"):
        apply_crispedit(model, tok, [{"prompt": "Berlin is in", "target_new": "Spain"}], hp, progress=False)
    assert len(calls) == 3
    assert_bit_identical(model, before)
    assert edit_state(model) is state
    assert {k: getattr(state, k) for k in checkpoint} == checkpoint
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_nan_lr_set_after_construction_is_rejected_before_any_work(corpus):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus)
    hp.lr = float("nan")
    before = all_params(model)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        apply_crispedit(model, tok, FACT, hp, progress=False)
    assert_bit_identical(model, before)
    assert edit_state(model) is None
    with pytest.raises(ValueError, match="lr must be > 0 and finite, got nan"):
        ProjectedAdam([model.lm_head.weight], [None], lr=math.nan)


def test_non_finite_loss_is_caught_before_the_backward_pass(monkeypatch):
    model, tok = tiny_llama(), tiny_tokenizer()
    before = all_params(model)
    real = editing.edit_loss
    monkeypatch.setattr(editing, "edit_loss", lambda m, b: (real(m, b)[0] * float("inf"), 1))
    with pytest.raises(NonFiniteError, match="non-finite edit loss at step 1"):
        apply_crispedit(model, tok, FACT, make_hparams("unused"), factors=factor_set(model), progress=False)
    assert_bit_identical(model, before)


def test_batch_size_zero_after_construction_is_rejected():
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams("unused")
    hp.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        apply_crispedit(model, tok, FACT, hp, factors=factor_set(model), progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Requests and given factors, named before any work


@pytest.mark.parametrize("requests,message", [
    ([{"prompt": None, "target_new": "Rome"}], "request 0: prompt must be a string, got NoneType None"),
    ([{"prompt": "", "target_new": "Rome"}], "request 0: prompt is empty"),
    ([{"prompt": "   ", "target_new": "Rome"}], "request 0: prompt is empty"),
    (FACT + [{"prompt": "x is", "target_new": 5}], "request 1: target_new must be a string, got int 5"),
    ([{"prompt": "x is", "target_new": ""}], "request 0: target_new is empty"),
    (["The capital of France is"], "request 0 must be a dict with 'prompt' and 'target_new', got a str"),
    ("The capital of France is", "requests must be a list of request dicts"),
    ({"prompt": "a", "target_new": "b"}, "requests must be a list of request dicts"),
    ([{"prompt": "The capital of France is", "ground_truth": "Paris"}], "request 0 has no 'target_new'"),
    ([], "no edit requests given"),
])
def test_bad_requests_name_the_index_and_field(requests, message):
    model, tok = tiny_llama(), tiny_tokenizer()
    before = all_params(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_crispedit(model, tok, requests, make_hparams("unused"), factors=factor_set(model), progress=False)
    assert_bit_identical(model, before)
    assert edit_state(model) is None


def test_factors_for_other_layers_name_the_missing_layer():
    model, tok = tiny_llama(), tiny_tokenizer()
    other = factor_set(model, names=["model.layers.0.mlp.down_proj.weight", NAMES[0]])
    with pytest.raises(ValueError, match=f"the given factors have no layer '{NAMES[1]}'"):
        apply_crispedit(model, tok, FACT, make_hparams("unused"), factors=other, progress=False)


def test_max_length_beyond_the_models_positions_is_named_before_work():
    model, tok = tiny_gpt2(), tiny_tokenizer()
    model.config.n_positions = 16
    hp = make_hparams("unused", layers=[1], rewrite_module_tmp="transformer.h.{}.mlp.c_proj.weight", max_length=32)
    with pytest.raises(ValueError, match="max_length is 32, but the model has only 16 positions"):
        apply_crispedit(model, tok, FACT, hp, progress=False)


def test_curvature_seq_len_beyond_the_models_positions_is_named_before_collection(corpus):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus, curvature_seq_len=300)  # the tiny Llama has 256 positions
    with pytest.raises(ValueError, match="curvature_seq_len is 300, but the model has only 256 positions"):
        capability_curvature(model, tok, hp, progress=False)
    reset_edit_state(model)


# ----------------------------------------------------------------------------------------------------------------
# Saved edits know their base


@pytest.fixture
def saved_edit(tmp_path):
    base = tiny_llama(seed=0)
    fingerprint = model_fingerprint(base, NAMES)
    edited = tiny_llama(seed=0)
    with torch.no_grad():
        for n in NAMES:
            dict(edited.named_parameters())[n].add_(0.01)
    path = save_changed_tensors(edited, NAMES, tmp_path / "delta" / "changed_tensors.safetensors",
                                base_fingerprint=fingerprint)
    return path, edited


def test_changed_tensors_apply_onto_their_base(saved_edit):
    path, edited = saved_edit
    base = tiny_llama(seed=0)
    apply_changed_tensors(base, path)
    for (n, p), (_, q) in zip(base.named_parameters(), edited.named_parameters()):
        assert torch.equal(p, q), n


def test_changed_tensors_refuse_a_different_base_unless_forced(saved_edit, caplog):
    path, edited = saved_edit
    other = tiny_llama(seed=1)
    before = all_params(other)
    with pytest.raises(ValueError, match="weights fingerprint is [0-9a-f]{16}\\.\\.\\., but the edit was made on a "
                                         "base with fingerprint [0-9a-f]{16}"):
        apply_changed_tensors(other, path)
    assert_bit_identical(other, before)
    with pytest.raises(ValueError, match="already edited"):
        apply_changed_tensors(edited, path)  # applying twice is refused as well
    apply_changed_tensors(other, path, force=True)
    assert "applying anyway (force)" in caplog.text
    assert torch.equal(dict(other.named_parameters())[NAMES[0]], dict(edited.named_parameters())[NAMES[0]])


def test_changed_tensors_refuse_a_dtype_difference_unless_forced(saved_edit):
    path, edited = saved_edit
    base16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    before = all_params(base16)
    with pytest.raises(ValueError, match=f"{NAMES[0]} is torch.float32 in the file but torch.bfloat16 in the model"):
        apply_changed_tensors(base16, path)
    assert_bit_identical(base16, before)
    apply_changed_tensors(base16, path, force=True)
    assert torch.equal(dict(base16.named_parameters())[NAMES[0]],
                       dict(edited.named_parameters())[NAMES[0]].to(torch.bfloat16))


@pytest.mark.parametrize("damage,error,message", [
    (lambda p: p.unlink(), FileNotFoundError, "no changed-tensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), ValueError, "cannot be read"),
    (lambda p: p.write_bytes(b"not safetensors"), ValueError, "cannot be read"),
])
def test_missing_or_truncated_changed_tensors_are_found(saved_edit, damage, error, message):
    path, _ = saved_edit
    damage(path)
    with pytest.raises(error, match=message):
        apply_changed_tensors(tiny_llama(seed=0), path)


# ----------------------------------------------------------------------------------------------------------------
# Files: stale temporaries of killed writes, permissions, writable folders


def test_stale_temporaries_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".tmp-abc123.safetensors"
    stale.write_bytes(b"x" * 1000)  # what a killed cache write leaves
    fresh = tmp_path / ".tmp-def456.safetensors"
    fresh.write_bytes(b"y")  # a write in progress in another process
    old = time.time() - 3600
    os.utime(stale, (old, old))
    write_safetensors(tmp_path / "kfac-x.safetensors", {"t": torch.ones(2)}, {"a": 1})
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-def456.safetensors", "kfac-x.safetensors"]


def test_stale_model_conversion_folders_are_removed(tmp_path):
    from crispedit_easyedit.models import ensure_converted

    source = tmp_path / "source.gguf"
    source.write_bytes(b"gguf")
    models = tmp_path / "models"
    left = models / ".smollm.tmp-123-abcdef12"
    (left / "sub").mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"z" * 100)
    old = time.time() - 3600
    for p in (left, left / "sub", left / "model.safetensors"):
        os.utime(p, (old, old))

    def convert(src, out):
        raise RuntimeError("conversion stops here")

    with pytest.raises(RuntimeError, match="conversion stops here"):
        ensure_converted(models / "smollm", source, convert=convert)
    assert list(models.iterdir()) == []  # the stale folder and this run's own temporary folder are gone


def test_files_get_the_users_permissions_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_safetensors(tmp_path / "f.safetensors", {"t": torch.ones(1)}, {})
        delta = save_changed_tensors(tiny_llama(), NAMES[:1], tmp_path / "d.safetensors")
        assert user_file_mode() == 0o644
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert stat.S_IMODE(delta.stat().st_mode) == 0o644
    finally:
        os.umask(previous)


def test_writable_dir_check(tmp_path, monkeypatch):
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(ValueError, match="--output-dir .* cannot be a folder: .* is a file"):
        ensure_writable_dir(plain, "--output-dir")
    with pytest.raises(ValueError, match="cannot be a folder"):
        ensure_writable_dir(plain / "sub", "--output-dir")
    assert ensure_writable_dir(tmp_path / "new" / "deeper", "--output-dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created

    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # as on a read-only folder (root ignores chmod)
    with pytest.raises(ValueError, match="cache_dir .* is not writable \\(PermissionError: Permission denied"):
        ensure_writable_dir(tmp_path, "cache_dir")


def test_read_only_cache_dir_fails_before_the_collection(corpus, tmp_path, monkeypatch):
    import crispedit_easyedit.state as state_module

    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus, cache_dir=str(tmp_path / "cache"))

    def refuse(path, what):
        raise ValueError(f"{what} {str(path)!r} is not writable")

    collected = []
    monkeypatch.setattr(state_module, "ensure_writable_dir", refuse)
    monkeypatch.setattr(state_module, "_collect_capability", lambda *a, **k: collected.append(1))
    with pytest.raises(ValueError, match="cache_dir .* is not writable"):
        capability_curvature(model, tok, hp, progress=False)
    assert collected == []


def test_remove_stale_keeps_unrelated_files(tmp_path):
    keep = tmp_path / "kfac-1.safetensors"
    keep.write_bytes(b"k")
    old = time.time() - 3600
    os.utime(keep, (old, old))
    assert remove_stale_temporaries(tmp_path) == []
    assert keep.exists()
    assert remove_stale_temporaries(Path(tmp_path / "absent")) == []


def test_factor_check_in_row_blocks_finds_what_the_whole_matrix_shows():
    m = spd(10, 3)
    m[7, 2] += 1.0  # asymmetric in a block other than the first
    with pytest.raises(CurvatureError, match="not symmetric"):
        check_factor(m, "L", "A", block_rows=3)
    m = spd(10, 3)
    m[9, 9] = float("nan")
    with pytest.raises(CurvatureError, match="has 1 non-finite entries"):
        check_factor(m, "L", "A", block_rows=4)
    check_factor(spd(10, 3), "L", "A", block_rows=3)  # a valid factor passes


def test_an_interrupted_write_leaves_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM under the CLI

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "kfac-x.safetensors", {"t": torch.ones(2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_sigterm_unwinds_like_ctrl_c_under_the_cli_and_the_handler_is_restored():
    import signal

    from crispedit_easyedit.cli import _terminate_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="terminated by signal"):
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the signal is delivered before this returns
    assert signal.getsignal(signal.SIGTERM) == previous


def test_hparams_files_with_repeated_keys_or_other_encodings_are_named(tmp_path):
    from crispedit_easyedit.hparams import CrispEditHyperParams

    text = "alg_name: CrispEdit\nmodel_name: m\nlayers: [1]\nlr: 1e-3\n"
    dup = tmp_path / "dup.yaml"
    dup.write_text(text + "lr: 1.0\n")
    with pytest.raises(Exception, match="duplicate key 'lr' \\(first at line 4\\)"):
        CrispEditHyperParams.from_hparams(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(text.encode() + b"# caf\xe9\n")
    with pytest.raises(ValueError, match="latin.yaml' is not UTF-8 text"):
        CrispEditHyperParams.from_hparams(latin)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ValueError, match="folder.yaml' is a folder; give a YAML file"):
        CrispEditHyperParams.from_hparams(tmp_path / "folder.yaml")
    assert CrispEditHyperParams.from_hparams(_write(tmp_path / "ok.yaml", text)).lr == 1e-3


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("key,suggestion", [
    ("gamma", "energy_threshold"), ("gama", "energy_threshold"), ("n", "mom2_n_samples"),
    ("num_samples", "mom2_n_samples"), ("chunk", "chunk_size"), ("lr_rate", "lr"), ("learning_rate", "lr"),
    ("energy_treshold", "energy_threshold"), ("layer", "layers"), ("epochs", "num_steps"),
])
def test_did_you_mean_knows_aliases(key, suggestion):
    from crispedit_easyedit.hparams import CrispEditHyperParams

    with pytest.raises(ValueError, match=f"unknown CrispEdit hparams key '{key}': did you mean '{suggestion}'\\?"):
        CrispEditHyperParams.from_dict({"alg_name": "CrispEdit", "model_name": "m", "layers": [1], key: 1})


def test_no_far_fetched_suggestion():
    from crispedit_easyedit.hparams import CrispEditHyperParams

    with pytest.raises(ValueError) as info:
        CrispEditHyperParams.from_dict({"alg_name": "CrispEdit", "model_name": "m", "layers": [1], "zqxw": 1})
    assert "did you mean" not in str(info.value) and "valid keys: alg_name" in str(info.value)
