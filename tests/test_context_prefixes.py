"""Context-prefix augmentation (issue 9): seeded prefixes sampled from the model's top-k, exact token boundaries of
the prefixed examples, the epoch's example count, the receipt, and validation. Its effect on edits is measured on the
real model in benchmarks/README.md (CounterFact paraphrases)."""

import pytest
import torch

from crispedit_easyedit.context_prefixes import (
    CONTEXT_STARTS, TOP_K, prefixed_prompt, prefixed_requests, sample_context_prefixes, sample_prefix_ids,
)
from crispedit_easyedit.editing import IGNORE_INDEX, apply_crispedit, edit_examples, tokenize_edit
from crispedit_easyedit.hparams import CrispEditHyperParams
from tests.test_editing import FACTS, corpus_factors, hparams
from tests.tiny_models import tiny_llama, tiny_tokenizer


def test_prefixes_are_seeded_model_samples_from_the_start_words_in_turn():
    tok, model = tiny_tokenizer(), tiny_llama()
    prefixes = sample_context_prefixes(model, tok, 7, 6, seed=3)
    assert len(prefixes) == 7
    for index, prefix in enumerate(prefixes):
        assert prefix.startswith(CONTEXT_STARTS[index % len(CONTEXT_STARTS)])
        assert "{" not in prefix and "}" not in prefix
    assert sample_context_prefixes(model, tok, 7, 6, seed=3) == prefixes
    assert sample_context_prefixes(model, tok, 7, 6, seed=4) != prefixes
    model.train()
    sample_context_prefixes(model, tok, 1, 2, seed=0)
    assert model.training  # the mode is restored


def test_each_sampled_token_is_in_the_models_top_k():
    tok, model = tiny_tokenizer(), tiny_llama()
    rows = sample_prefix_ids(model, tok, 5, 6, seed=0)
    for index, ids in enumerate(rows):
        start = tok(CONTEXT_STARTS[index], add_special_tokens=True)["input_ids"]
        assert ids[: len(start)] == start and len(start) < len(ids) <= len(start) + 6
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for position in range(len(start), len(ids)):
            assert ids[position] in torch.topk(logits[position - 1], TOP_K).indices.tolist()


def test_prefixed_example_labels_exactly_the_target_after_prefix_and_prompt():
    tok = tiny_tokenizer()
    prefixes = ["The river was wide", "Because it rained"]
    hp = hparams(max_length=64, train_eos=True)
    requests = prefixed_requests(FACTS, prefixes, torch.Generator().manual_seed(0))
    assert [dict(r, prompt=f["prompt"]) for r, f in zip(requests, FACTS)] == FACTS  # only the prompt changes
    examples = edit_examples(tok, requests, hp, formats=["raw"])
    assert len(examples) == len(FACTS)
    for fact, (ids, labels) in zip(FACTS, examples):
        bare_ids, bare_labels = tokenize_edit(tok, fact["prompt"], fact["target_new"], 64)
        target = [i for i, lab in zip(bare_ids, bare_labels) if lab != IGNORE_INDEX]
        assert [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX] == target + [tok.eos_token_id]
        prompt_ids = ids[: len(ids) - len(target) - 1]
        text = tok.decode(prompt_ids)
        assert any(text == prefixed_prompt(p, fact["prompt"]) for p in prefixes), text
    assert prefixed_requests(FACTS, [], torch.Generator()) == []


def test_prefix_draws_cover_the_pool_and_follow_the_generator():
    prefixes = ["The one", "I two", "You three"]
    requests = FACTS * 10
    first = prefixed_requests(requests, prefixes, torch.Generator().manual_seed(1))
    again = prefixed_requests(requests, prefixes, torch.Generator().manual_seed(1))
    assert first == again
    used = {p for p in prefixes for r in first if r["prompt"].startswith(p + ".")}
    assert used == set(prefixes)


def test_prefixed_prompt_joins_like_rome_context_templates():
    assert prefixed_prompt("The day was long", "Paris is in") == "The day was long. Paris is in"
    assert prefixed_prompt("It ended.", " Paris is in") == "It ended. Paris is in"


def test_each_epoch_adds_one_prefixed_example_per_edit_and_the_report_lists_the_prefixes():
    tok = tiny_tokenizer()
    steps = {}
    for count in (0, 3):
        model = tiny_llama()
        hp = hparams(context_prefixes=count, context_prefix_tokens=4, early_stop_loss=0.0, num_steps=3,
                     train_batch_size=2, max_length=64)
        report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
        steps[count] = report.steps
        assert len(report.context_prefixes) == count
        assert f"{count} context prefixes" in report.summary()
    assert steps == {0: 3 * 2, 3: 3 * 2}  # minibatches of 2 edits (each with its prefixed example), 3 epochs


@pytest.mark.parametrize("field,value,message", [
    ("context_prefixes", -1, "context_prefixes must be"),
    ("context_prefix_tokens", 0, "context_prefix_tokens must be"),
    ("context_prefix_tokens", 128, "context_prefix_tokens must be smaller than max_length"),
])
def test_bad_context_prefix_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(model_name="m", layers=[1], **{field: value})
