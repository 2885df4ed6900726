"""apply_crispedit_to_model driven exactly as each EasyEdit generation calls it, without importing EasyEdit.

GitHub main: ``apply(model, tok, requests, hparams, copy=False, return_orig_weights=True, keep_original_weight=False,
train_ds=None)`` then ``editors/utils.restore_after_edit`` copies ``weights_copy`` back unless ``sequential_edit``.
PyPI: the same call with the user's ``keep_original_weight``; it restores whatever dict it gets back.
"""

import pytest
import torch

from crispedit_easyedit.easyedit import apply as apply_module
from crispedit_easyedit.easyedit.apply import apply_crispedit_to_model
from crispedit_easyedit.hparams import CrispEditHyperParams
from tests.test_editing import FACTS, target_accuracy
from tests.tiny_models import tiny_llama, tiny_tokenizer, training_text

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


@pytest.fixture
def hparams(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(training_text()))
    return CrispEditHyperParams(model_name="tiny-llama", layers=[1, 2], device="cpu", lr=5e-3, num_steps=60,
                                train_batch_size=2, max_length=32, energy_threshold=0.5, mom2_dataset=str(corpus),
                                mom2_n_samples=8, curvature_seq_len=32, curvature_batch_size=4, cache_dir=None)


def restore_after_edit(model, weights_copy, sequential_edit):
    """What EasyEdit GitHub main does after evaluation (editors/utils.py)."""
    if not sequential_edit:
        with torch.no_grad():
            for name, value in weights_copy.items():
                dict(model.named_parameters())[name][...] = value


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sequential_edit", [False, True])
def test_github_main_contract(monkeypatch, hparams, sequential_edit):
    monkeypatch.setattr("crispedit_easyedit.easyedit.registry.generation", lambda: "github-main")
    model, tok = tiny_llama(), tiny_tokenizer()
    before = snapshot(model)
    edited, weights_copy = apply_crispedit_to_model(model, tok, FACTS, hparams, copy=False,
                                                    return_orig_weights=True, keep_original_weight=False,
                                                    train_ds=None)
    assert edited is model and sorted(weights_copy) == NAMES
    assert all(torch.equal(weights_copy[n], before[n]) for n in NAMES)
    assert target_accuracy(model, tok, FACTS) == 1.0
    restore_after_edit(model, weights_copy, sequential_edit)
    after = snapshot(model)
    for name in before:
        unchanged = torch.equal(after[name], before[name])
        assert unchanged == (name not in NAMES or not sequential_edit), name


@pytest.mark.parametrize("keep_original_weight", [False, True])
def test_pypi_contract(monkeypatch, hparams, keep_original_weight):
    monkeypatch.setattr("crispedit_easyedit.easyedit.registry.generation", lambda: "pypi")
    model, tok = tiny_llama(), tiny_tokenizer()
    _, weights_copy = apply_crispedit_to_model(model, tok, FACTS[:2], hparams, return_orig_weights=True,
                                               keep_original_weight=keep_original_weight)
    assert sorted(weights_copy) == (NAMES if keep_original_weight else [])


def test_copy_leaves_the_callers_model_untouched(hparams):
    model, tok = tiny_llama(), tiny_tokenizer()
    before = snapshot(model)
    edited, _ = apply_crispedit_to_model(model, tok, FACTS[:2], hparams, copy=True)
    assert edited is not model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(dict(edited.named_parameters())[NAMES[0]], before[NAMES[0]])
    assert apply_module.apply_crispedit_to_model is apply_crispedit_to_model


@pytest.mark.parametrize("sequential_edit", [False, True])
def test_github_main_calls_in_a_row_are_fresh_or_continue_the_sequence(monkeypatch, hparams, sequential_edit):
    """GitHub main restores the weights between calls unless sequential_edit: the edit state tells them apart."""
    from crispedit_easyedit.state import edit_state

    monkeypatch.setattr("crispedit_easyedit.easyedit.registry.generation", lambda: "github-main")
    model, tok = tiny_llama(), tiny_tokenizer()
    seen = []
    for part in (FACTS[:2], FACTS[2:]):
        _, weights_copy = apply_crispedit_to_model(model, tok, part, hparams, return_orig_weights=True,
                                                   keep_original_weight=False, train_ds=None)
        state = edit_state(model)
        seen.append((state.num_edits, state.num_chunks))
        restore_after_edit(model, weights_copy, sequential_edit)
    assert seen == ([(2, 1), (4, 2)] if sequential_edit else [(2, 1), (2, 1)])
