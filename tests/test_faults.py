"""Faults on the Python API (issue 10): the edit undone bit-identically on a non-finite loss or step, saved edits
applied onto their base, files (stale temporaries, permissions, writable folders). Every bad input (requests, hparams,
factors, saved edits of another base) is a row of the table in ``tests/test_bad_input.py``."""

from __future__ import annotations

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
from crispedit_easyedit.curvature import model_fingerprint, write_safetensors
from crispedit_easyedit.delta import apply_changed_tensors, save_changed_tensors
from crispedit_easyedit.editing import apply_crispedit
from crispedit_easyedit.optim import ProjectedAdam
from crispedit_easyedit.projector import stable_eigh
from crispedit_easyedit.state import edit_state
from tests.test_bad_input import FACT, factor_set, spd
from tests.test_state import NAMES, corpus, make_hparams  # noqa: F401 - corpus is a fixture
from tests.tiny_models import tiny_llama, tiny_tokenizer

def all_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Factors: finite, symmetric, positive semi-definite


def test_rounding_noise_of_a_psd_factor_is_accepted():
    x = torch.randn(64, 8, dtype=torch.float64)
    rank_deficient = (x @ x.T).float()  # 56 zero eigenvalues, computed as tiny +- values
    eig, _ = stable_eigh(rank_deficient, torch.float32)
    assert eig.min() == 0.0 and eig.max() > 0


# ----------------------------------------------------------------------------------------------------------------
# The edit: non-finite loss or step -> weights and state restored, bit-identical


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


def test_non_finite_loss_is_caught_before_the_backward_pass(monkeypatch):
    model, tok = tiny_llama(), tiny_tokenizer()
    before = all_params(model)
    real = editing.edit_loss
    monkeypatch.setattr(editing, "edit_loss", lambda m, b: (real(m, b)[0] * float("inf"), 1))
    with pytest.raises(NonFiniteError, match="non-finite edit loss at step 1"):
        apply_crispedit(model, tok, FACT, make_hparams("unused"), factors=factor_set(model), progress=False)
    assert_bit_identical(model, before)


# ----------------------------------------------------------------------------------------------------------------
# Requests and given factors, named before any work


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


def test_changed_tensors_apply_anyway_when_forced(saved_edit, caplog):
    """The refusals (another base, another dtype, applied twice) are rows of tests/test_bad_input.py; forced, the
    file applies with a warning naming both, a dtype difference converted."""
    path, edited = saved_edit
    other = tiny_llama(seed=1)
    apply_changed_tensors(other, path, force=True)
    assert "applying anyway (force)" in caplog.text
    assert torch.equal(dict(other.named_parameters())[NAMES[0]], dict(edited.named_parameters())[NAMES[0]])
    base16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    apply_changed_tensors(base16, path, force=True)
    assert torch.equal(dict(base16.named_parameters())[NAMES[0]],
                       dict(edited.named_parameters())[NAMES[0]].to(torch.bfloat16))


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
    from crispedit_easyedit.bench.models import ensure_converted

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

    from crispedit_easyedit.bench.cli import _terminate_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="terminated by signal"):
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the signal is delivered before this returns
    assert signal.getsignal(signal.SIGTERM) == previous


def test_no_far_fetched_suggestion():
    from crispedit_easyedit.hparams import CrispEditHyperParams

    with pytest.raises(ValueError) as info:
        CrispEditHyperParams.from_dict({"alg_name": "CrispEdit", "model_name": "m", "layers": [1], "zqxw": 1})
    assert "did you mean" not in str(info.value) and "valid keys: alg_name" in str(info.value)
