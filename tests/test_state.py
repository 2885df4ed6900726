"""The per-model edit state: curvature and eigenbases once at the base weights, CrispEdit-Seq across calls,
saving and resuming, portable caches (tiny models, no EasyEdit)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from crispedit_easyedit import editing
from crispedit_easyedit.curvature import FactorSet, KFACFactors
from crispedit_easyedit.editing import apply_crispedit
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.state import (
    edit_state, load_edit_state, reset_edit_state, save_edit_state,
)
from tests.counting import count_core_work
from tests.test_editing import FACTS, target_accuracy
from tests.tiny_models import tiny_llama, tiny_tokenizer, training_text

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
MORE_FACTS = FACTS + [
    {"prompt": "The tallest mountain on Earth is", "target_new": "Kilimanjaro"},
    {"prompt": "The largest planet is", "target_new": "Mercury"},
    {"prompt": "The inventor of the telephone was", "target_new": "Newton"},
    {"prompt": "The currency of Japan is the", "target_new": "peso"},
]


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(training_text()))
    return str(path)


def make_hparams(corpus: str, **overrides) -> CrispEditHyperParams:
    values = dict(model_name="tiny-llama", layers=[1, 2], device="cpu", lr=5e-3, num_steps=40, batch_size=2,
                  train_batch_size=2, max_length=32, energy_threshold=0.5, mom2_dataset=corpus, mom2_n_samples=8,
                  curvature_seq_len=32, curvature_batch_size=4, cache_dir=None)
    values.update(overrides)
    return CrispEditHyperParams(**values)


@pytest.fixture
def counts():
    """Capability collections, past-edit collections and eigendecompositions (one per factor) during the test."""
    with count_core_work() as counter:
        yield counter


def weights(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in NAMES}


def restore(model, saved) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            dict(model.named_parameters())[name].copy_(value)


def test_restored_calls_reuse_curvature_and_eigenbases(corpus, counts):
    """EasyEdit's restore pattern (GitHub main's default): 4 calls, one collection, one eigendecomposition."""
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus)
    base = weights(model)
    reports = []
    for start in range(0, 8, 2):
        reports.append(apply_crispedit(model, tok, MORE_FACTS[start : start + 2], hp, progress=False))
        restore(model, base)
    assert counts == {"capability_collections": 1, "eigh_calls": 2 * len(NAMES)}  # A and S of each layer, once
    assert [r.weights_status for r in reports] == ["first", "base", "base", "base"]
    assert [r.curvature_source for r in reports] == ["collected", "in process", "in process", "in process"]
    assert [r.eigendecompositions for r in reports] == [1, 0, 0, 0]
    assert [r.past_edits_protected for r in reports] == [0, 0, 0, 0]


def test_accumulated_calls_continue_the_sequence(corpus, counts):
    """PyPI's default / main's sequential_edit: later calls protect the earlier calls' edits (Algorithm 2)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus)
    reports = [apply_crispedit(model, tok, MORE_FACTS[i : i + 2], hp, progress=False) for i in range(0, 8, 2)]
    assert [r.weights_status for r in reports] == ["first", "continue", "continue", "continue"]
    assert [r.past_edits_protected for r in reports] == [0, 2, 4, 6]
    assert [r.edit_statistics_collections for r in reports] == [0, 1, 1, 1]
    assert [r.eigendecompositions for r in reports] == [1, 1, 1, 1]  # capability once, then the merged factors
    assert counts == {"capability_collections": 1, "edit_statistics_collections": 3,
                      "eigh_calls": 4 * 2 * len(NAMES)}
    state = edit_state(model)
    assert state.num_edits == 8 and state.num_chunks == 4
    edit_tokens = state.past_edits[NAMES[0]].num_tokens
    assert edit_tokens == sum(len(editing.tokenize_edit(tok, f["prompt"], f["target_new"], 32)[0]) - 1
                              for f in MORE_FACTS[:6])  # the last call's chunk is still to be collected


def test_chunk_size_sets_how_often_the_protected_basis_is_refreshed(corpus, counts):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus, chunk_size=4)
    reports = [apply_crispedit(model, tok, MORE_FACTS[i : i + 2], hp, progress=False) for i in range(0, 8, 2)]
    # statistics after every call, one refresh after each 4 edits: before calls 3 (edits 1-4)
    assert [r.eigendecompositions for r in reports] == [1, 0, 1, 0]


def test_someone_else_changing_the_weights_is_reported_and_the_sequence_continues(corpus, caplog):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus)
    apply_crispedit(model, tok, FACTS[:2], hp, progress=False)
    with torch.no_grad():
        dict(model.named_parameters())[NAMES[0]].add_(0.01)
    with caplog.at_level("WARNING"):
        report = apply_crispedit(model, tok, FACTS[2:], hp, progress=False)
    assert report.weights_status == "foreign" and report.past_edits_protected == 2
    assert "someone else changed them" in caplog.text
    reset_edit_state(model)
    assert apply_crispedit(model, tok, FACTS[:1], hp, progress=False).weights_status == "first"


def test_seq_across_calls_equals_seq_inside_one_call(corpus):
    tok = tiny_tokenizer()
    one, many = tiny_llama(), tiny_llama()
    hp = make_hparams(corpus, chunk_size=2)
    apply_crispedit(one, tok, MORE_FACTS[:6], hp, progress=False)
    for start in range(0, 6, 2):
        apply_crispedit(many, tok, MORE_FACTS[start : start + 2], hp, progress=False)
    for name in NAMES:
        torch.testing.assert_close(weights(one)[name], weights(many)[name], rtol=1e-5, atol=1e-7)
        a, b = edit_state(one).protected.edits[name], edit_state(many).protected.edits[name]
        assert a.num_tokens == b.num_tokens
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_from_saved_state_equals_uninterrupted(corpus, tmp_path, cache):
    tok = tiny_tokenizer()
    hp = make_hparams(corpus, cache_dir=str(tmp_path / "cache") if cache else None)
    straight = tiny_llama()
    for start in range(0, 6, 2):
        apply_crispedit(straight, tok, MORE_FACTS[start : start + 2], hp, progress=False)

    first = tiny_llama()
    apply_crispedit(first, tok, MORE_FACTS[:2], hp, progress=False)
    saved = save_edit_state(first, tok, tmp_path / "state.safetensors")
    meta = json.loads(__import__("safetensors").safe_open(str(saved), "pt").metadata()["crispedit_easyedit"])
    assert (meta["capability_tokens"] is None) == cache  # with a disk cache the file refers to it
    assert "capital of France" not in saved.read_bytes().decode("latin-1")  # no edit text stored
    resumed = copy.deepcopy(first)  # a new model object: no in-process state, as in a new process
    assert edit_state(resumed) is None
    load_edit_state(resumed, saved)
    for start in range(2, 6, 2):
        report = apply_crispedit(resumed, tok, MORE_FACTS[start : start + 2], hp, progress=False)
        assert report.weights_status == "continue"
    for name in NAMES:
        torch.testing.assert_close(weights(resumed)[name], weights(straight)[name], rtol=1e-5, atol=1e-7)


def test_load_refuses_weights_the_sequence_did_not_leave(corpus, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = make_hparams(corpus)
    apply_crispedit(model, tok, FACTS[:2], hp, progress=False)
    path = save_edit_state(model, tok, tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="neither those the saved sequence left behind"):
        load_edit_state(tiny_llama(seed=3), path)


def test_curvature_is_never_recollected_on_edited_weights(corpus, counts):
    model, tok = tiny_llama(), tiny_tokenizer()
    apply_crispedit(model, tok, FACTS[:2], make_hparams(corpus), progress=False)
    with pytest.raises(ValueError, match="no longer hold the base weights"):
        apply_crispedit(model, tok, FACTS[2:], make_hparams(corpus, mom2_n_samples=4), progress=False)
    before = weights(model)
    report = apply_crispedit(model, tok, FACTS[2:], make_hparams(corpus, curvature_at="current"), progress=False)
    assert report.curvature_source == "collected" and counts["capability_collections"] == 2  # asked for explicitly
    assert not torch.equal(before[NAMES[0]], weights(model)[NAMES[0]])


def test_a_cache_made_in_one_folder_is_reused_from_another(corpus, tmp_path, counts, monkeypatch):
    """Same weights, tokenizer and corpus in other folders under another HOME: a disk hit, no corpus read."""
    cache = tmp_path / "cache"
    model, tok = tiny_llama(), tiny_tokenizer()
    for folder in ("home_a/model", "home_b/elsewhere/model-copy"):
        model.save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
    other_corpus = tmp_path / "home_b" / "corpus-copy.txt"
    shutil.copy(corpus, other_corpus)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(folder):
        return (AutoModelForCausalLM.from_pretrained(tmp_path / folder),
                AutoTokenizer.from_pretrained(tmp_path / folder))

    monkeypatch.setenv("HOME", str(tmp_path / "home_a"))
    model_a, tok_a = load("home_a/model")
    apply_crispedit(model_a, tok_a, FACTS[:2], make_hparams(corpus, cache_dir=str(cache)), progress=False)
    assert counts["capability_collections"] == 1 and counts["eigh_calls"] == 4
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("eig-") and files[1].startswith("kfac-")
    for path in cache.iterdir():
        assert str(tmp_path) not in path.read_bytes()[:200_000].decode("latin-1")  # no machine path inside

    monkeypatch.setenv("HOME", str(tmp_path / "home_b"))
    monkeypatch.setattr("crispedit_easyedit.corpora.corpus_sequences",
                        lambda *a, **k: pytest.fail("a cache hit must not read the corpus"))
    model_b, tok_b = load("home_b/elsewhere/model-copy")
    report = apply_crispedit(model_b, tok_b, FACTS[:2], make_hparams(str(other_corpus), cache_dir=str(cache)),
                             progress=False)
    assert report.curvature_source == "disk cache" and report.eigendecompositions == 0
    assert counts["capability_collections"] == 1 and counts["eigh_calls"] == 4
    assert target_accuracy(model_b, tok_b, FACTS[:2]) == 1.0


def test_edit_stats_weight_scales_the_past_edits_in_the_merge():
    cap = FactorSet({"w": KFACFactors(torch.eye(2), torch.eye(3), 100)})
    edits = FactorSet({"w": KFACFactors(torch.zeros(2, 2), torch.zeros(3, 3), 25)})
    assert torch.allclose(cap.merge(edits)["w"].A, torch.eye(2) * 100 / 125)
    assert torch.allclose(cap.merge(edits, weight=4.0)["w"].A, torch.eye(2) * 0.5)  # 25 tokens count as 100
    assert cap.merge(edits, weight=4.0)["w"].num_tokens == 125
    assert torch.equal(cap.merge(edits, weight=0.0)["w"].S, torch.eye(3))
    with pytest.raises(ValueError, match="merge weight must be >= 0"):
        cap.merge(edits, weight=-1)


def test_a_failed_call_leaves_weights_and_state_as_they_were(corpus, monkeypatch):
    model, tok = tiny_llama(), tiny_tokenizer()
    hp = make_hparams(corpus)
    apply_crispedit(model, tok, FACTS[:2], hp, progress=False)
    before, state = weights(model), edit_state(model)
    snapshot = (state.num_edits, state.num_chunks, state.last_digest, state.unrecorded)

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(editing, "finetune_projected", boom)
    with pytest.raises(RuntimeError, match="injected"):
        apply_crispedit(model, tok, FACTS[2:], hp, progress=False)
    assert all(torch.equal(before[n], weights(model)[n]) for n in NAMES)
    assert (state.num_edits, state.num_chunks, state.last_digest, state.unrecorded) == snapshot
    assert state.past_edits is None  # the lazily collected statistics were rolled back too


def test_seq_keeps_early_chunks_better_than_sequential_finetuning(corpus):
    """Retention measured, not assumed: first-chunk accuracy after two later chunks, mean over three tiny models.

    With the paper's token weighting (edit_stats_weight 1) the 4-edit chunks weigh little against the capability
    statistics on this tiny model and retention is not reliably better than fine-tuning's (measured on these seeds:
    0.36 vs 0.33); weighting the past edits 10x keeps clearly more (0.52).
    """
    tok = tiny_tokenizer()
    facts = MORE_FACTS + [
        {"prompt": "The first man on the Moon was", "target_new": "Gagarin"},
        {"prompt": "The chemical symbol of gold is", "target_new": "Ag"},
        {"prompt": "The longest river in Europe is", "target_new": "Thames"},
        {"prompt": "The painter of the Mona Lisa was", "target_new": "Picasso"},
    ]

    def retention(**overrides) -> tuple[float, float]:
        kept, last = [], []
        for seed in (0, 1, 2):
            model = tiny_llama(seed=seed)
            hp = make_hparams(corpus, chunk_size=4, energy_threshold=0.9, num_steps=60, **overrides)
            apply_crispedit(model, tok, facts, hp, progress=False)
            kept.append(target_accuracy(model, tok, facts[:4]))
            last.append(target_accuracy(model, tok, facts[8:]))
        return sum(kept) / 3, sum(last) / 3

    finetuning, finetuning_last = retention(projection_mode="none")
    seq, seq_last = retention(edit_stats_weight=10.0)
    assert min(finetuning_last, seq_last) >= 0.9, (finetuning_last, seq_last)  # the last chunk landed in both
    assert seq > finetuning + 0.1, (seq, finetuning)
