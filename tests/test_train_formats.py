"""Training in the formats a user asks in (issue 9): exact token boundaries per format, the chat template's
assistant turn, padding-side invariance, validation, and a tiny model that answers under the QA template only when
it was trained in it."""

import copy
import logging

import pytest
import torch

from crispedit_easyedit.bench import evaluation as ev
from crispedit_easyedit.editing import (
    IGNORE_INDEX, apply_crispedit, collate, edit_examples, edit_loss, tokenize_edit, tokenize_edit_formatted,
)
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.templates import QA_TEMPLATE, chat_answer_suffix, check_format, prompt_text
from tests.test_editing import FACTS, corpus_factors, hparams
from tests.tiny_models import tiny_llama, tiny_tokenizer

QUESTION = "Who is the author of Hamlet?"
END = "<|endoftext|>"


def chat_tok():
    """The tiny tokenizer with a chat template whose turns end with its EOS token (an explicit end-of-turn)."""
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + END + "\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def learned(ids, labels):
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_raw_format_is_the_unformatted_example():
    tok = tiny_tokenizer()
    for fact in FACTS:
        assert tokenize_edit_formatted(tok, fact["prompt"], fact["target_new"], "raw", 32) == \
            tokenize_edit(tok, fact["prompt"], fact["target_new"], 32)


@pytest.mark.parametrize("fmt,template", [("qa", "qa"), ("chat", "chat")])
def test_prompt_ids_are_the_evaluation_prompt_and_labels_only_the_answer(fmt, template):
    tok = chat_tok()
    ids, labels = tokenize_edit_formatted(tok, QUESTION + " ", "William Shakespeare", fmt, 128)
    prompt_ids = ev.prompt_token_ids(tok, QUESTION, template)  # what WILD generates from
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt_ids)])
    assert all(lab != IGNORE_INDEX for lab in labels[len(prompt_ids):])
    answer = tok.decode(learned(ids, labels))
    if fmt == "qa":
        assert tok.decode(ids[: len(prompt_ids)]) == QA_TEMPLATE.format(question=QUESTION)
        assert answer == " William Shakespeare"  # the leading space of a word after "A:"
    else:  # the assistant turn: exactly the target tokens plus the end-of-turn token
        target_ids = tok("William Shakespeare", add_special_tokens=False)["input_ids"]
        assert learned(ids, labels) == target_ids + [tok.convert_tokens_to_ids(END)]
        assert answer == "William Shakespeare" + END


def test_format_string_and_eos_after_target():
    tok = tiny_tokenizer()
    fmt = "Question: {prompt}\nAnswer:"
    ids, labels = tokenize_edit_formatted(tok, QUESTION, "Paris", fmt, 64, eos_after_target=True)
    assert tok.decode(ids) == f"Question: {QUESTION}\nAnswer: Paris{END}"
    assert learned(ids, labels)[-1] == tok.eos_token_id and tok.decode(learned(ids, labels)) == " Paris" + END
    assert len(ids) <= 64
    ids, _ = tokenize_edit_formatted(tok, QUESTION * 20, "Paris", fmt, 24, eos_after_target=True)
    assert len(ids) == 24 and ids[-1] == tok.eos_token_id  # the prompt is cut from the left, never the answer


def test_examples_are_request_major_and_independent_of_padding_side():
    tok = chat_tok()
    hp = hparams(train_formats=["raw", "qa", "chat"], train_eos=False, max_length=128)
    examples = edit_examples(tok, FACTS, hp)
    assert len(examples) == 3 * len(FACTS)
    assert examples[0] == tokenize_edit(tok, FACTS[0]["prompt"], FACTS[0]["target_new"], 128)
    assert examples[1] == tokenize_edit_formatted(tok, FACTS[0]["prompt"], FACTS[0]["target_new"], "qa", 128)
    model = tiny_llama()
    losses = {}
    for side in ("left", "right"):
        tok.padding_side = side
        assert edit_examples(tok, FACTS, hp) == examples
        with torch.no_grad():
            losses[side] = float(edit_loss(model, collate(edit_examples(tok, FACTS, hp), tok.eos_token_id))[0])
    assert losses["left"] == losses["right"]


def test_chat_answer_suffix_needs_a_template_that_extends_its_generation_prompt():
    tok = chat_tok()
    assert chat_answer_suffix(tok, QUESTION, "Paris") == "Paris" + END
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(ValueError, match="does not render the assistant turn"):
        chat_answer_suffix(odd, QUESTION, "Paris")


@pytest.mark.parametrize("value,message", [
    (["raw", "QA"], "unknown train format 'QA'"),
    (["raw", "raw"], "lists a format twice"),
    ([], "non-empty list"),
    (["Answer: {answer}"], "unknown train format"),
    (["{prompt} {prompt}"], "unknown train format"),
])
def test_bad_train_formats_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(model_name="m", layers=[1], train_formats=value)
    with pytest.raises(ValueError, match="valid: one of raw, qa, chat"):
        check_format("QA")


def test_hparams_accept_formats_and_warn_when_evaluation_uses_a_chat_template_training_does_not(caplog):
    hp = CrispEditHyperParams(model_name="m", layers=[1], train_formats="qa")
    assert hp.train_formats == ["qa"] and CrispEditHyperParams(model_name="m", layers=[1]).train_formats == ["raw"]
    with caplog.at_level(logging.WARNING):
        CrispEditHyperParams(model_name="m", layers=[1], use_chat_template=True)
    assert "does not train in it" in caplog.text
    assert CrispEditHyperParams.from_dict(hp.to_dict()).train_formats == ["qa"]


def test_chat_format_without_a_chat_template_fails_before_the_weights_change():
    tok, model = tiny_tokenizer(), tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = hparams(train_formats=["raw", "chat"], train_eos=False)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def qa_answers(model, tok, facts):
    return [ev.wild_generate(model, tok, [f["prompt"]], template="qa", show_progress=False)[0] for f in facts]


def test_training_in_the_qa_format_makes_the_qa_answer_the_target():
    """Raw-only training teaches the bare prompt; the QA-context question still gets the old answer. Training in
    both formats makes greedy generation under the QA template produce the target."""
    tok = tiny_tokenizer()
    facts = [dict(f, prompt=f["prompt"].rstrip("?") + "?") for f in FACTS[:2]]
    results = {}
    for formats in (["raw"], ["raw", "qa"]):
        model = tiny_llama()
        hp = hparams(train_formats=formats, train_eos=True, projection_mode="none", num_steps=240, max_length=64)
        apply_crispedit(model, tok, facts, hp, factors=corpus_factors(model, hp, tok), progress=False)
        results[tuple(formats)] = qa_answers(model, tok, facts)
    targets = [f["target_new"] for f in facts]
    assert [ev.contains(a, t) for a, t in zip(results[("raw", "qa")], targets)] == [True, True]
    assert [ev.contains(a, t) for a, t in zip(results[("raw",)], targets)] == [False, False]


def test_prompt_text_of_each_format():
    tok = chat_tok()
    assert prompt_text(tok, "Q? ", "raw") == "Q? "
    assert prompt_text(tok, "Q? ", "qa") == QA_TEMPLATE.format(question="Q?")
    assert prompt_text(tok, "Q? ", "chat") == "<|user|>Q?" + END + "\n<|assistant|>"
    assert prompt_text(tok, "Q? ", "Question: {prompt}\nAnswer:") == "Question: Q?\nAnswer:"


def test_a_format_string_with_other_fields_is_named():
    with pytest.raises(ValueError, match="is not a valid format string"):
        check_format("{prompt} and {answer}")
    check_format("Q: {prompt} {{literal}}")  # doubled braces are text


def test_a_minibatch_holds_train_batch_size_edits_with_all_their_formats(monkeypatch):
    """train_batch_size counts edits, not examples: with two formats, 3 edits in minibatches of 2 take 2 steps per
    epoch (not 3), and each step's rows are both formats of the same edits."""
    import crispedit_easyedit.editing as editing

    tok = tiny_tokenizer()
    facts = FACTS[:3]
    hp = hparams(train_formats=["raw", "qa"], train_eos=False, projection_mode="none", num_steps=2,
                 early_stop_loss=0.0, train_batch_size=2, max_length=64)
    by_example = {tuple(ids): index // 2 for index, (ids, _) in enumerate(edit_examples(tok, facts, hp))}
    steps = []
    real_loss = editing.edit_loss

    def spy(model, batch):
        rows = [tuple(int(t) for t, keep in zip(ids, mask) if keep)
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        steps.append(sorted(by_example[row] for row in rows))
        return real_loss(model, batch)

    monkeypatch.setattr(editing, "edit_loss", spy)
    model = tiny_llama()
    report = apply_crispedit(model, tok, facts, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert report.steps == 2 * 2
    for epoch in (steps[:2], steps[2:]):
        assert sorted(edit for step in epoch for edit in step) == [0, 0, 1, 1, 2, 2]
        assert all(step.count(edit) == 2 for step in epoch for edit in step)  # both formats of each edit
        assert sorted(len(step) for step in epoch) == [2, 4]
