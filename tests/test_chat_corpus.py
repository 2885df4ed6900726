"""Chat-formatted questions in the capability statistics (issue 9): the offline pool is disjoint from the probes,
the sequences are what the chat template renders, the mixture is token-weighted and part of the cache key."""

import random
from types import SimpleNamespace

import pytest
import torch

from crispedit_easyedit import chat_corpus, state
from crispedit_easyedit.bench import probes as pr
from crispedit_easyedit.curvature import collect_kfac_factors, loss_positions, model_fingerprint
from crispedit_easyedit.editing import edit_targets
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.templates import chat_prompt_text
from tests.test_train_formats import chat_tok
from tests.tiny_models import tiny_llama, tiny_tokenizer


def test_factbook_chat_pool_is_disjoint_from_every_probe_and_deterministic():
    questions = chat_corpus.factbook_chat_questions()
    assert len(questions) > 1000 and questions == chat_corpus.factbook_chat_questions()
    probe_questions = {p.question for p in pr.factbook_probes(n=None)}
    assert not probe_questions & set(questions)
    for kind in ("capital", "language", "currency", "continent"):
        assert not any(kind in q.lower() for q in questions), kind
    assert "What is the population of France?" in questions


def test_chat_sequences_render_the_template_and_reach_the_token_budget():
    tok = chat_tok()
    packed = chat_corpus.chat_sequences(chat_corpus.FACTBOOK_CHAT, tok, n_tokens=300, seed=1)
    ids, mask = packed["input_ids"], packed["attention_mask"]
    lengths = mask.sum(1)
    assert int(lengths.sum()) >= 300 and int(lengths[:-1].sum()) < 300  # stops at the first row past the budget
    assert bool((mask[:, 0] == 1).all()) and bool((mask.diff(dim=1) <= 0).all())  # right padding
    first = tok.decode(ids[0, : int(lengths[0]) - 1])
    assert first.startswith("<|user|>") and first.endswith("<|assistant|>")
    assert first == chat_prompt_text(tok, first[len("<|user|>"): first.index("<|endoftext|>")])
    assert int(ids[0, int(lengths[0]) - 1]) == tok.pad_token_id  # the placeholder after the generation prompt
    assert not torch.equal(ids, chat_corpus.chat_sequences(chat_corpus.FACTBOOK_CHAT, tok, 300, seed=2)["input_ids"])
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        chat_corpus.chat_sequences(chat_corpus.FACTBOOK_CHAT, tiny_tokenizer(), 100)


def test_question_files_and_unknown_sources(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("How are you?\n\nWhat is a cat?\n")
    assert chat_corpus.chat_questions(str(txt)) == ["How are you?", "What is a cat?"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"question": "Why?"}\n{"text": "How?"}\n')
    assert chat_corpus.chat_questions(str(jsonl)) == ["Why?", "How?"]
    moved = tmp_path / "moved.txt"
    moved.write_bytes(txt.read_bytes())
    assert chat_corpus.chat_corpus_key(str(txt)) == chat_corpus.chat_corpus_key(str(moved))  # content, not path
    with pytest.raises(ValueError, match="unknown chat corpus 'reddit'; valid: 'factbook-chat'"):
        chat_corpus.chat_questions("reddit")


def test_joined_sources_concatenate_once_and_key_by_content(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("What is a cat?\nWhy?\n")
    second.write_text("Why?\nWhere is Rome?\n")
    joined = f"{first}+{second}"
    assert chat_corpus.chat_questions(joined) == ["What is a cat?", "Why?", "Where is Rome?"]
    key = chat_corpus.chat_corpus_key(joined)
    assert key == f"{chat_corpus.chat_corpus_key(str(first))}+{chat_corpus.chat_corpus_key(str(second))}"
    assert key != chat_corpus.chat_corpus_key(f"{second}+{first}")  # the order of the parts is part of the pool
    with_factbook = chat_corpus.chat_questions(f"{chat_corpus.FACTBOOK_CHAT}+{first}")
    assert with_factbook[-2:] == ["What is a cat?", "Why?"] and len(with_factbook) == len(
        chat_corpus.factbook_chat_questions()) + 2
    plus_named = tmp_path / "x+y.txt"  # an existing file whose name holds '+' is one source
    plus_named.write_text("Who?\n")
    assert chat_corpus.chat_questions(str(plus_named)) == ["Who?"]
    with pytest.raises(ValueError, match="unknown chat corpus 'reddit'.*joined by '\\+'"):
        chat_corpus.chat_questions(f"{first}+reddit")


@pytest.mark.parametrize("overrides,message", [
    (dict(mom2_chat_fraction=1.0), "mom2_chat_fraction must be in \\[0, 1\\)"),
    (dict(mom2_chat_fraction=-0.1), "mom2_chat_fraction must be a number >= 0"),
    (dict(mom2_chat_fraction=0.2, fisher_type="empirical"), "needs fisher_type 'mc'"),
    (dict(mom2_chat_source=""), "mom2_chat_source must be"),
])
def test_bad_chat_mixture_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(model_name="m", layers=[1], **overrides)


def _hparams(tmp_path, fraction):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the river flows through the old city and the hills. " * 6
                                  for i in range(40)))
    return SimpleNamespace(layers=[1, 2], rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight",
                           mom2_dataset=str(corpus), mom2_n_samples=6, curvature_seq_len=32, curvature_batch_size=3,
                           fisher_type="mc", mc_samples=1, mom2_dtype="float64", exclude_first_tokens=0, seed=0,
                           mom2_chat_fraction=fraction, mom2_chat_source=chat_corpus.FACTBOOK_CHAT)


def test_mixture_is_token_weighted_and_keyed(tmp_path):
    tok, model = chat_tok(), tiny_llama()
    targets = edit_targets(model, _hparams(tmp_path, 0.0))
    names = [t.name for t in targets]
    wiki = state._collect_capability(model, tok, _hparams(tmp_path, 0.0), targets, progress=False)
    mixed = state._collect_capability(model, tok, _hparams(tmp_path, 0.25), targets, progress=False)
    # the chat part alone, as the mixture draws it
    n_chat_target = round(6 * 32 * 0.25 / 0.75)  # of the windows' tokens (6 sequences x 32)
    chat = chat_corpus.chat_sequences(chat_corpus.FACTBOOK_CHAT, tok, n_chat_target, seed=0, max_length=32)
    chat_only = collect_kfac_factors(model, names, [chat], dtype=torch.float64, progress=False)
    n_w, n_c = wiki.metadata["num_tokens"], chat_only.metadata["num_tokens"]
    assert mixed.metadata["num_tokens"] == n_w + n_c
    assert 0.15 < n_c / (n_w + n_c) < 0.35  # about the asked share (whole questions)
    for name in names:  # A depends only on the inputs, so the token-weighted mean is exact
        expected = (n_w * wiki[name].A + n_c * chat_only[name].A) / (n_w + n_c)
        torch.testing.assert_close(mixed[name].A, expected, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(mixed[name].A, wiki[name].A, rtol=1e-3, atol=1e-6)
    fp = model_fingerprint(model, names)
    keys = {f: state.capability_identity(fp, tok, _hparams(tmp_path, f), targets)["corpus"] for f in (0.0, 0.25, 0.5)}
    assert "chat=" not in keys[0.0] and len(set(keys.values())) == 3
    assert "chat_fraction=0.25" in keys[0.25]


def test_chat_answer_sequences_hold_the_models_greedy_answers_and_count_only_them():
    """Each row is the rendered question, the model's own greedy answer and a placeholder; loss_mask counts the last
    prompt position and the answer positions only (never the question), and the budget is in counted tokens."""
    from tests.test_generation import argmax_continuation

    tok, model = chat_tok(), tiny_llama(seed=5)
    stops = (tok.eos_token_id, tok.pad_token_id)
    packed = chat_corpus.chat_answer_sequences(model, tok, chat_corpus.FACTBOOK_CHAT, n_tokens=40, answer_tokens=5,
                                               seed=1, batch_size=4)
    ids, mask, counted = packed["input_ids"], packed["attention_mask"], packed["loss_mask"]
    assert counted.dtype == torch.bool and counted.shape == ids.shape
    questions = chat_corpus.factbook_chat_questions()
    order = random.Random(1).sample(range(len(questions)), len(questions))
    total = 0
    for row in range(ids.shape[0]):
        prompt = list(tok(chat_prompt_text(tok, questions[order[row]]), add_special_tokens=False)["input_ids"])
        answer = argmax_continuation(model, prompt, 5, stops)
        length = int(mask[row].sum())
        assert ids[row, :length].tolist() == prompt + answer + [tok.pad_token_id]
        assert counted[row].nonzero().flatten().tolist()[0] == len(prompt) - 1  # the answer-predicting position
        assert counted[row].nonzero().flatten().tolist() == list(range(len(prompt) - 1, length - 1))
        assert not bool((counted & ~loss_positions(mask)).any())  # nothing the collection would not count
        total += len(answer) + 1
    assert total >= 40 and total - (len(answer) + 1) < 40  # stops at the first row past the budget
    with pytest.raises(ValueError, match="answer_tokens must be >= 1"):
        chat_corpus.chat_answer_sequences(model, tok, chat_corpus.FACTBOOK_CHAT, 10, 0)


def test_answer_counted_chat_statistics_are_keyed_and_differ(tmp_path):
    tok, model = chat_tok(), tiny_llama()
    questions_only = _hparams(tmp_path, 0.25)
    with_answers = SimpleNamespace(**{**vars(questions_only), "mom2_chat_answer_tokens": 6})
    targets = edit_targets(model, questions_only)
    names = [t.name for t in targets]
    fp = model_fingerprint(model, names)
    key_q = state.capability_identity(fp, tok, questions_only, targets)["corpus"]
    key_a = state.capability_identity(fp, tok, with_answers, targets)["corpus"]
    assert "chat_answer_tokens" not in key_q and key_a == key_q + "|chat_answer_tokens=6"
    a = state._collect_capability(model, tok, with_answers, targets, progress=False)
    q = state._collect_capability(model, tok, questions_only, targets, progress=False)
    assert not torch.allclose(a[names[0]].A, q[names[0]].A, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="mom2_chat_answer_tokens 4 has no effect without mom2_chat_fraction > 0"):
        CrispEditHyperParams(model_name="m", layers=[1], mom2_chat_answer_tokens=4)


def test_raw_rendering_tokenises_prompts_as_edit_prompts_and_is_keyed(tmp_path):
    """mom2_chat_format 'raw': each pool prompt is its own tokens plus the placeholder (no template, so a tokenizer
    without a chat template works), the statistics differ from the chat-rendered ones, and only then is the format
    in the cache key."""
    pool = tmp_path / "neighbours.txt"
    prompts = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda, the", "Cork encoding is named after"]
    pool.write_text("\n".join(prompts) + "\n")
    tok = tiny_tokenizer()
    assert not getattr(tok, "chat_template", None)
    packed = chat_corpus.chat_sequences(str(pool), tok, n_tokens=10_000, seed=0, max_length=32, render="raw")
    rows = {tuple(ids[: int(mask.sum())].tolist()) for ids, mask in zip(packed["input_ids"],
                                                                       packed["attention_mask"])}
    assert rows == {tuple(tok(p)["input_ids"] + [tok.pad_token_id]) for p in prompts}
    with pytest.raises(ValueError, match="render must be one of 'chat', 'raw'; got 'qa'"):
        chat_corpus.chat_sequences(str(pool), tok, n_tokens=10, render="qa")

    tok, model = chat_tok(), tiny_llama()
    chat = SimpleNamespace(**{**vars(_hparams(tmp_path, 0.25)), "mom2_chat_source": str(pool)})
    raw = SimpleNamespace(**{**vars(chat), "mom2_chat_format": "raw"})
    targets = edit_targets(model, chat)
    names = [t.name for t in targets]
    fp = model_fingerprint(model, names)
    key_chat = state.capability_identity(fp, tok, chat, targets)["corpus"]
    assert "chat_format" not in key_chat
    assert state.capability_identity(fp, tok, raw, targets)["corpus"] == key_chat + "|chat_format=raw"
    a = state._collect_capability(model, tok, raw, targets, progress=False)
    b = state._collect_capability(model, tok, chat, targets, progress=False)
    assert not torch.allclose(a[names[0]].A, b[names[0]].A, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (dict(mom2_chat_format="qa"), "mom2_chat_format must be one of 'chat', 'raw'; got 'qa'"),
    (dict(mom2_chat_fraction=0.2, mom2_chat_format="raw", mom2_chat_answer_tokens=8),
     "mom2_chat_answer_tokens 8 needs mom2_chat_format 'chat'"),
])
def test_bad_pool_format_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        CrispEditHyperParams(model_name="m", layers=[1], **overrides)
