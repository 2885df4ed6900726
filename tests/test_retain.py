"""The retain loss (issue 9): the model's own greedy answers to unrelated questions, trained alongside the edits,
keep those answers while the edits land."""

import pytest
import torch

from crispedit_easyedit.editing import IGNORE_INDEX, apply_crispedit, formatted_prompt_ids
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.generation import greedy_decode
from tests.test_generation import argmax_continuation
from crispedit_easyedit.retain import retain_examples, stop_token_ids
from tests.test_editing import FACTS, corpus_factors, hparams, target_accuracy
from tests.tiny_models import tiny_llama, tiny_tokenizer

QUESTIONS = ["What is the capital of Spain?", "Who wrote Faust?", "Where is the river Rhine?",
             "What does a baker make?", "Which planet is red?", "Who painted the Mona Lisa?"]


def question_file(tmp_path, questions=QUESTIONS):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(questions) + "\n")
    return str(path)


def test_retain_examples_label_only_the_models_own_answers(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(retain_weight=0.5, retain_source=question_file(tmp_path), retain_count=4, retain_answer_tokens=5,
                 train_formats=["raw", "qa"], max_length=96)
    examples = retain_examples(model, tok, hp, hp.train_formats)
    assert len(examples) == 4 * 2
    prompts = {tuple(formatted_prompt_ids(tok, q, fmt)) for fmt in ("raw", "qa") for q in QUESTIONS}
    stops = stop_token_ids(model, tok)
    for ids, labels in examples:
        answer = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        prompt = ids[: len(ids) - len(answer)]
        assert tuple(prompt) in prompts and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert answer == argmax_continuation(model, prompt, 5, stops)
    # the same seed gives the same questions; weight 0 gives none
    assert retain_examples(model, tok, hp, hp.train_formats) == examples
    assert retain_examples(model, tok, hparams(retain_weight=0.0), ["raw"]) == []


STATEMENTS = ["Bananas grow in", "My favourite colour is", "Seven times eight equals", "The opposite of cold is",
              "A dog says", "Snow is"]


def continuations(model, tok, prompts):
    return greedy_decode(model, [tok(p)["input_ids"] for p in prompts], 6, [], pad_id=0)


def test_retain_keeps_the_answers_to_other_prompts_while_the_edits_land(tmp_path):
    """Fine-tuning two facts (no projection, so nothing else protects them) changes the greedy continuation of
    every other prompt; with the retain loss on those prompts all six stay the model's own, and the edits land.
    (The tiny random model answers every QA-template question alike, so the raw format is the one it can tell
    apart.)"""
    tok = tiny_tokenizer()
    source = question_file(tmp_path, STATEMENTS)
    kept, landed = {}, {}
    for weight in (0.0, 1.0):
        model = tiny_llama()
        before = continuations(model, tok, STATEMENTS)
        hp = hparams(projection_mode="none", num_steps=120, lr=3e-2, max_length=64, retain_weight=weight,
                     retain_source=source, retain_count=len(STATEMENTS), retain_answer_tokens=6)
        report = apply_crispedit(model, tok, FACTS[:2], hp, factors=corpus_factors(model, hp, tok), progress=False)
        assert report.retain_examples == (len(STATEMENTS) if weight else 0)
        kept[weight] = [a == b for a, b in zip(continuations(model, tok, STATEMENTS), before)]
        landed[weight] = target_accuracy(model, tok, FACTS[:2])
    assert not any(kept[0.0]), kept
    assert all(kept[1.0]), kept
    assert landed == {0.0: 1.0, 1.0: 1.0}


@pytest.mark.parametrize("field,value,message", [
    ("retain_weight", -1.0, "retain_weight"),
    ("retain_count", 0, "retain_count"),
    ("retain_answer_tokens", 128, "retain_answer_tokens must be smaller than max_length"),
    ("retain_source", "", "retain_source must be"),
])
def test_bad_retain_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(layers=[1], model_name="gpt2", **{field: value})


def test_a_missing_retain_source_fails_before_the_weights_change(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = hparams(retain_weight=1.0, retain_source=str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="unknown chat corpus.*absent.txt"):
        apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
