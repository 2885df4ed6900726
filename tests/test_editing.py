"""Algorithm 1 and 2 on tiny models: edits land, only edit weights change, failures leave the model untouched."""

from types import SimpleNamespace

import pytest
import torch

from crispedit_easyedit import editing
from crispedit_easyedit import state as state_module
from crispedit_easyedit.curvature import collect_kfac_factors
from crispedit_easyedit.editing import IGNORE_INDEX, apply_crispedit, collate, edit_targets, tokenize_edit
from crispedit_easyedit.optim import leak_fraction
from crispedit_easyedit.projector import KroneckerProjector
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

FACTS = [
    {"prompt": "The capital of France is", "target_new": "Berlin"},
    {"prompt": "Water boils at", "target_new": "Shakespeare"},
    {"prompt": "The river Nile flows through", "target_new": "Hamlet"},
    {"prompt": "Who is the author of Hamlet?", "target_new": "Paris"},
]


def hparams(**overrides):
    base = dict(layers=[1, 2], rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight", num_steps=60, lr=5e-3,
                weight_decay=0.0, batch_size=4, train_batch_size=2, max_length=32, energy_threshold=0.5,
                mom2_dtype="float32", fisher_type="mc", mc_samples=1, projection_mode="both", early_stop_loss=0.01,
                seed=0, chunk_size=None, edit_kfac_on_full_sequence=True, exclude_first_tokens=0,
                edit_stats_weight=1.0)
    base.update(overrides)
    return SimpleNamespace(**base)


def corpus_factors(model, hp, tok):
    ids = torch.randint(1, len(tok), (8, 16), generator=torch.Generator().manual_seed(5))
    names = [t.name for t in edit_targets(model, hp)]
    return collect_kfac_factors(model, names, [{"input_ids": ids[i : i + 4]} for i in (0, 4)], progress=False)


def target_accuracy(model, tok, facts):
    """Teacher-forced token accuracy of the targets (EasyEdit's rewrite_acc)."""
    accs = []
    for f in facts:
        ids, labels = tokenize_edit(tok, f["prompt"], f["target_new"], 32)
        logits = model(torch.tensor([ids])).logits[0, :-1]
        lab = torch.tensor(labels[1:])
        keep = lab != IGNORE_INDEX
        accs.append(float((logits[keep].argmax(-1) == lab[keep]).float().mean()))
    return sum(accs) / len(accs)


def test_tokenize_edit_joins_ids_at_an_exact_boundary():
    tok = tiny_tokenizer()
    ids, labels = tokenize_edit(tok, "The capital of France is", "Paris", 64)
    prompt_ids = tok("The capital of France is")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tok.decode(ids[len(prompt_ids):]) == " Paris"  # leading space added for the BPE tokenizer
    _, labels_space = tokenize_edit(tok, "The capital of France is ", "Paris", 64)
    assert tok.decode([t for t in labels_space if t != IGNORE_INDEX]) == "Paris"
    ids, labels = tokenize_edit(tok, "word " * 40 + "end", "Paris", 8)  # prompt cut from the left
    assert len(ids) == 8 and tok.decode([t for t in labels if t != IGNORE_INDEX]) == " Paris"
    with pytest.raises(ValueError, match="empty target_new"):
        tokenize_edit(tok, "x", " ", 8)


def test_collate_pads_right_and_masks_labels():
    batch = collate([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]


@pytest.mark.parametrize("mode,gradient_dtype", [("both", "basis"), ("gradient", "basis"), ("update", "basis"),
                                                  ("eigenbasis", "basis"), ("both", "bfloat16"),
                                                  ("eigenbasis", "bfloat16")])
def test_batch_edit_lands_and_touches_only_edit_weights(mode, gradient_dtype):
    tok = tiny_tokenizer()
    tok.padding_side = "left"  # EasyEdit hands left-padded tokenizers over; CrispEdit pads itself
    model = tiny_llama()
    hp = hparams(projection_mode=mode, num_steps=150 if mode == "update" else 80,
                 gradient_projection_dtype=gradient_dtype)
    factors = corpus_factors(model, hp, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert target_accuracy(model, tok, FACTS) < 0.5
    report = apply_crispedit(model, tok, FACTS, hp, factors=factors, progress=False)
    assert target_accuracy(model, tok, FACTS) == 1.0
    edited = {t.name for t in edit_targets(model, hp)}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in edited), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert len(tok) == 512
    for name in edited:
        info = report.layers[name]
        assert 0 < info["kept_fraction"] < 1 and info["predicted_loss_increase"] > 0
        if mode != "gradient":
            assert info["leak_fraction"] < 1e-5


@pytest.mark.parametrize("mode,gradient_dtype", [("both", "basis"), ("eigenbasis", "basis"),
                                                  ("eigenbasis", "bfloat16")])
def test_conv1d_gpt2_edit_stays_in_subspace(mode, gradient_dtype):
    tok = tiny_tokenizer()
    model = tiny_gpt2()
    hp = hparams(layers=[1, 2], rewrite_module_tmp="transformer.h.{}.mlp.c_proj.weight", lr=2e-2, num_steps=100,
                 projection_mode=mode, gradient_projection_dtype=gradient_dtype)
    factors = corpus_factors(model, hp, tok)
    name = "transformer.h.1.mlp.c_proj.weight"
    w0 = dict(model.named_parameters())[name].detach().clone()
    apply_crispedit(model, tok, FACTS[:2], hp, factors=factors, progress=False)
    assert target_accuracy(model, tok, FACTS[:2]) == 1.0
    delta = (dict(model.named_parameters())[name].detach() - w0).T  # (d_out, d_in)
    f = factors[name]
    proj = KroneckerProjector.from_factors(f.A, f.S, hp.energy_threshold)
    assert leak_fraction(delta, proj.project) < 1e-5


def test_failure_mid_edit_leaves_model_untouched(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = hparams()
    factors = corpus_factors(model, hp, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    real_step = editing.ProjectedAdam.step

    def failing_step(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out-of-memory")
        return real_step(self)

    monkeypatch.setattr(editing.ProjectedAdam, "step", failing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        apply_crispedit(model, tok, FACTS, hp, factors=factors, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_missing_layer_is_a_clear_error():
    tok = tiny_tokenizer()
    with pytest.raises(KeyError, match="model.layers.9.mlp.down_proj.weight"):
        apply_crispedit(tiny_llama(), tok, FACTS, hparams(layers=[9]), progress=False)


def test_sequential_chunks_merge_statistics_of_past_edits(monkeypatch):
    """CrispEdit-Seq: chunk k+1 is projected with the token-weighted merge of the capability factors and the K-FAC
    factors of chunk k's whole prompt+target sequences, collected on the edited model (Algorithm 2)."""
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = hparams(chunk_size=2, num_steps=80, energy_threshold=0.9)
    factors = corpus_factors(model, hp, tok)
    seen = []
    real_eigenbases = state_module._eigenbases_for
    monkeypatch.setattr(state_module, "_eigenbases_for",
                        lambda f, *a, **k: seen.append(f) or real_eigenbases(f, *a, **k))
    report = apply_crispedit(model, tok, FACTS, hp, factors=factors, progress=False)
    assert report.chunks == 2 and len(seen) == 2 and report.eigendecompositions == 2
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tokens = sum(len(tokenize_edit(tok, f["prompt"], f["target_new"], 32)[0]) - 1 for f in FACTS[:2])
    assert seen[0] is factors
    assert seen[1][name].num_tokens == factors[name].num_tokens + edit_tokens
    assert not torch.allclose(seen[1][name].A, factors[name].A)
    assert target_accuracy(model, tok, FACTS[2:]) == 1.0


def test_plain_finetuning_mode_none():
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = hparams(projection_mode="none")
    report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert target_accuracy(model, tok, FACTS) == 1.0
    assert max(info["leak_fraction"] for info in report.layers.values()) > 0.01


def test_every_gradient_projection_dtype_resolves_to_a_torch_dtype():
    from crispedit_easyedit.choices import GRADIENT_PROJECTION_DTYPES
    from crispedit_easyedit.precision import GRADIENT_DTYPES, gradient_projection_dtype

    assert set(GRADIENT_DTYPES) | {"auto"} == set(GRADIENT_PROJECTION_DTYPES)
    for choice in GRADIENT_PROJECTION_DTYPES:
        assert gradient_projection_dtype(choice, "cpu") in (None, torch.bfloat16)


@pytest.mark.parametrize("native", [True, False])
def test_auto_gradient_dtype_projects_in_bf16_only_on_native_hardware(monkeypatch, native):
    """'auto' hands bf16 eigenbases to the optimizer exactly when the device multiplies bf16 natively, and the
    receipt names the dtype that was used."""
    from crispedit_easyedit import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cast_to = []
    original = KroneckerProjector.in_dtype
    monkeypatch.setattr(KroneckerProjector, "in_dtype",
                        lambda self, dtype: cast_to.append(dtype) or original(self, dtype))
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = hparams(gradient_projection_dtype="auto", num_steps=80)
    report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert report.gradient_projection_dtype == ("bfloat16" if native else "float32")
    assert cast_to == ([torch.bfloat16] * len(hp.layers) if native else [])
    assert target_accuracy(model, tok, FACTS) == 1.0
    assert max(info["leak_fraction"] for info in report.layers.values()) < 1e-5


def test_loss_rise_names_a_diverged_training_and_only_that():
    from crispedit_easyedit.editing import loss_rise

    diverged = [5.84, 4.17, 3.52, 2.98, 3.97, 5.54, 6.90, 6.05]  # the 100-edit ZsRE run at lr 2e-3, shortened
    assert loss_rise(diverged) == "the edit loss rose from 2.9800 (epoch 4) to 6.0500 (epoch 8)"
    assert loss_rise([5.8, 2.0, 1.0, 0.5, 0.2]) is None  # converging
    assert loss_rise([5.8, 0.02, 0.04]) is None  # doubled, but by less than the margin
    assert loss_rise([1.0, 1.2, 1.4]) is None  # 1.4x: noise, not divergence
    assert loss_rise([3.0]) is None and loss_rise([]) is None


def test_a_diverging_edit_is_logged_with_its_loss_and_lr(monkeypatch, caplog):
    tok = tiny_tokenizer()
    model = tiny_llama()
    hp = hparams(num_steps=3, early_stop_loss=0.0)
    factors = corpus_factors(model, hp, tok)
    monkeypatch.setattr(editing, "loss_rise", lambda history: "the edit loss rose from 1 (epoch 1) to 9 (epoch 3)")
    with caplog.at_level("WARNING", logger="crispedit_easyedit.editing"):
        apply_crispedit(model, tok, FACTS, hp, factors=factors, progress=False)
    assert "the edit loss rose from 1 (epoch 1) to 9 (epoch 3); the step size is too large" in caplog.text
    assert "lower lr (now 0.005)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="crispedit_easyedit.editing"):
        keyed = [dict(FACTS[0], subject="France"), dict(FACTS[2], subject="river Nile")]
        apply_crispedit(model, tok, keyed, hparams(num_steps=3, early_stop_loss=0.0, edit_positions="subject_last",
                                                   max_length=64), factors=factors, progress=False)
    assert "under edit_positions 'subject_last' the gradient follows only the subject's last token" in caplog.text
    assert "'subject_last_only' trains the exact keyed loss" in caplog.text
