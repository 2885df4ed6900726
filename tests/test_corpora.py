"""Capability corpora: the offline Wikipedia text, its deterministic split, local files, and sequence packing."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from crispedit_easyedit import corpora
from crispedit_easyedit.corpora import (
    corpus_fingerprint,
    heldout_sequences,
    load_corpus,
    pack_sequences,
    split_of,
)
from tests.tiny_models import tiny_tokenizer

WIKI = corpora.OFFLINE_WIKIPEDIA


# --------------------------------------------------------------------------------------------------------------------
# Offline Wikipedia
# --------------------------------------------------------------------------------------------------------------------


def test_offline_wikipedia_is_real_article_text():
    articles = corpora.offline_wikipedia_articles()
    titles = [title for title, _ in articles]
    texts = load_corpus(WIKI, "all")
    assert len(articles) >= 95 and len(texts) == len(articles)
    assert sum(map(len, texts)) > 2_500_000
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"]
    anarchism = dict(articles)["Anarchism"]
    assert anarchism.startswith("Anarchism is a political philosophy")
    assert "'''" not in anarchism and "== " not in anarchism and "\n\n\n" not in anarchism
    # Redirects, disambiguation pages and stubs are gone.
    assert all(len(t) >= corpora.MIN_ARTICLE_CHARS for t in texts)
    assert not any(t.lower().startswith("#redirect") for t in texts)
    assert not any(title.endswith("(disambiguation)") for title in titles)


def test_offline_split_is_disjoint_complete_and_stable():
    stats = load_corpus(WIKI, "stats")
    heldout = load_corpus(WIKI, "heldout")
    everything = load_corpus(WIKI, "all")
    assert not set(stats) & set(heldout)
    assert sorted(stats + heldout) == sorted(everything)
    assert 0.1 <= len(heldout) / len(everything) <= 0.3
    # Corpus order is kept within each split.
    assert stats == [t for t in everything if t in set(stats)]
    # The split is a fixed function of the title (values pinned: they must never change between releases).
    assert [split_of(t) for t in ("Anarchism", "Autism", "Albedo", "Algorithm", "Agriculture", "Aldous Huxley")] == [
        "stats", "stats", "stats", "heldout", "heldout", "heldout"]
    by_title = dict(corpora.offline_wikipedia_articles())
    assert by_title["Algorithm"] in heldout and by_title["Anarchism"] in stats
    # A second call returns an equal, independent list (the parse is cached, the list is not shared).
    again = load_corpus(WIKI, "stats")
    assert again == stats and again is not stats
    assert load_corpus(WIKI, "stats", max_documents=5) == stats[:5]


def test_split_of_is_roughly_eighty_percent():
    keys = [f"document {i}" for i in range(4000)]
    share = sum(split_of(k) == "stats" for k in keys) / len(keys)
    assert 0.77 < share < 0.83


# --------------------------------------------------------------------------------------------------------------------
# Local files and spec errors
# --------------------------------------------------------------------------------------------------------------------

DOCS = [f"Document number {i} talks about topic {i * 7} in some detail." for i in range(40)]


def test_local_txt_jsonl_and_folder(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(DOCS[:20]) + "\n\n  \n\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    jsonl = sub / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[20:])) + "\n",
                     encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("text\nnot read\n", encoding="utf-8")

    assert load_corpus(str(txt), "all") == DOCS[:20]
    assert load_corpus(str(jsonl), "all") == DOCS[20:]
    assert load_corpus(str(tmp_path), "all") == DOCS  # a.txt sorts before sub/b.jsonl

    stats, heldout = load_corpus(str(tmp_path), "stats"), load_corpus(str(tmp_path), "heldout")
    assert stats == [d for d in DOCS if split_of(d) == "stats"]
    assert heldout == [d for d in DOCS if split_of(d) == "heldout"]
    assert stats and heldout and not set(stats) & set(heldout)


def test_multi_paragraph_blank_lines_with_spaces_separate_documents(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first line\nstill first\n \t\nsecond\r\n\r\nthird", encoding="utf-8")
    assert load_corpus(str(txt), "all") == ["first line\nstill first", "second", "third"]


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(ValueError, match="valid forms") as err:
        load_corpus("wikipedia-offline-typo")
    assert "wikipedia-offline" in str(err.value) and "hf:" in str(err.value) and ".jsonl" in str(err.value)
    with pytest.raises(ValueError, match="heldout"):
        load_corpus(WIKI, "test")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.csv"):
        load_corpus(str(csv))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_corpus(str(bad), "all")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="contains no"):
        load_corpus(str(empty_dir))
    with pytest.raises(ValueError, match="names no dataset"):
        load_corpus("hf:")
    one = tmp_path / "one.txt"
    one.write_text("Document number 3 talks about topic 21 in some detail.", encoding="utf-8")
    assert split_of(one.read_text()) == "stats"
    with pytest.raises(ValueError, match="no documents in split 'heldout'"):
        load_corpus(str(one), "heldout")


def test_corpus_fingerprint():
    base = corpus_fingerprint("s", "stats", ["a", "b"])
    assert len(base) == 64 and base == corpus_fingerprint("s", "stats", ["a", "b"])
    assert base != corpus_fingerprint("t", "stats", ["a", "b"])
    assert base != corpus_fingerprint("s", "heldout", ["a", "b"])
    assert base != corpus_fingerprint("s", "stats", ["ab"])
    assert base != corpus_fingerprint("s", "stats", ["b", "a"])


# --------------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------------


def test_pack_sequences_windows_are_the_concatenated_token_stream():
    tok = tiny_tokenizer()
    texts = load_corpus(WIKI, "stats")[:3]
    packed = pack_sequences(texts, tok, seq_len=32, n_sequences=10)
    assert set(packed) == {"input_ids", "attention_mask"}
    assert packed["input_ids"].shape == (10, 32) and packed["input_ids"].dtype == torch.long
    assert torch.equal(packed["attention_mask"], torch.ones(10, 32, dtype=torch.long))
    stream = tok(texts[0] + "\n\n", add_special_tokens=False)["input_ids"]
    assert packed["input_ids"].flatten().tolist() == stream[:320]
    assert tok.decode(packed["input_ids"][0]).startswith("Anarchism is a political")
    # Deterministic, and a prefix of a longer request.
    again = pack_sequences(texts, tok, seq_len=32, n_sequences=10)
    assert torch.equal(again["input_ids"], packed["input_ids"])
    longer = pack_sequences(texts, tok, seq_len=32, n_sequences=20)
    assert torch.equal(longer["input_ids"][:10], packed["input_ids"])


def test_pack_sequences_crosses_documents_and_seeds_permute():
    tok = tiny_tokenizer()
    texts = DOCS[:6]
    per_doc = [tok(t + "\n\n", add_special_tokens=False)["input_ids"] for t in texts]
    stream = [i for ids in per_doc for i in ids]
    packed = pack_sequences(texts, tok, seq_len=16, n_sequences=len(stream) // 16)
    assert packed["input_ids"].flatten().tolist() == stream[: (len(stream) // 16) * 16]

    shuffled = pack_sequences(texts, tok, seq_len=16, n_sequences=3, seed=1)
    same_seed = pack_sequences(texts, tok, seq_len=16, n_sequences=3, seed=1)
    assert torch.equal(shuffled["input_ids"], same_seed["input_ids"])
    assert not torch.equal(shuffled["input_ids"], packed["input_ids"][:3])


def test_pack_sequences_too_few_tokens_warns_then_errors(caplog):
    tok = tiny_tokenizer()
    texts = DOCS[:2]
    n_tokens = sum(len(tok(t + "\n\n", add_special_tokens=False)["input_ids"]) for t in texts)
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.corpora"):
        packed = pack_sequences(texts, tok, seq_len=8, n_sequences=1000)
    assert packed["input_ids"].shape == (n_tokens // 8, 8)
    assert f"only {n_tokens} tokens" in caplog.text and f"returning {n_tokens // 8} of the 1000" in caplog.text
    with pytest.raises(ValueError, match="fewer than one window"):
        pack_sequences(texts, tok, seq_len=n_tokens + 1, n_sequences=1)
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences(texts, tok, seq_len=0, n_sequences=1)
    with pytest.raises(ValueError, match="n_sequences"):
        pack_sequences(texts, tok, seq_len=8, n_sequences=0)


class _CharTokenizer:
    """A character tokenizer that adds BOS (id 1) by default, like Llama-2/Gemma tokenizers."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_pack_sequences_adds_bos_at_each_document_start_only_if_the_tokenizer_does():
    tok = _CharTokenizer()
    packed = pack_sequences(["ab", "cd"], tok, seq_len=5, n_sequences=2)
    a, b, c, d, nl = (ord(x) + 10 for x in "abcd\n")
    assert packed["input_ids"].tolist() == [[1, a, b, nl, nl], [1, c, d, nl, nl]]


def test_heldout_sequences_come_from_heldout_articles_only():
    tok = tiny_tokenizer()
    held = heldout_sequences(WIKI, tok, seq_len=64, n_sequences=4)
    heldout_docs = load_corpus(WIKI, "heldout")
    assert held["input_ids"].shape == (4, 64)
    for row, doc in zip(held["input_ids"], heldout_docs):  # window 0 of each held-out article, round-robin
        assert tok.decode(row) == tok.decode(tok(doc, add_special_tokens=False)["input_ids"][:64])
    stats = corpora.corpus_sequences(WIKI, tok, seq_len=64, n_sequences=4)
    assert not torch.equal(stats["input_ids"], held["input_ids"])


def test_hf_spec_streams_text_and_applies_the_title_hash_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    articles = [{"id": str(i), "title": f"Article {i}", "text": f"Body of article {i}."} for i in range(50)]

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter(articles)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stats = load_corpus("hf:wikimedia/wikipedia:20231101.en", "stats")
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", True)]
    assert stats == [a["text"] for a in articles if split_of(a["title"]) == "stats"]
    heldout = load_corpus("hf:some/corpus", "heldout", max_documents=3)
    assert calls[-1] == ("some/corpus", None, "train", True)
    assert heldout == [a["text"] for a in articles if split_of(a["title"]) == "heldout"][:3]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"content": "no text field"}]))
    with pytest.raises(ValueError, match="no string field 'text'"):
        load_corpus("hf:other/corpus", "all")


def test_spread_windows_round_robin_over_documents():
    from crispedit_easyedit.corpora import spread_windows

    tok = tiny_tokenizer()
    texts = ["alpha beta gamma delta " * 30, "short", "one two three four " * 30]
    out = spread_windows(texts, tok, seq_len=8, n_sequences=4)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert out["input_ids"].tolist() == [ids[0][:8], ids[2][:8], ids[0][8:16], ids[2][8:16]]
    with pytest.raises(ValueError, match="no document"):
        spread_windows(["tiny"], tok, seq_len=50, n_sequences=1)


def test_corpus_key_is_portable_and_follows_the_content(tmp_path):
    from crispedit_easyedit.corpora import corpus_key

    for folder in ("a", "b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "docs.txt").write_text("First document.\n\nSecond document.")
    key_a, key_b = corpus_key(str(tmp_path / "a" / "docs.txt")), corpus_key(str(tmp_path / "b/deeper/docs.txt"))
    assert key_a == key_b and str(tmp_path) not in key_a
    assert corpus_key(str(tmp_path / "a")) == corpus_key(str(tmp_path / "b" / "deeper"))  # folders by content
    (tmp_path / "b/deeper/docs.txt").write_text("First document.\n\nSecond, changed.")
    assert corpus_key(str(tmp_path / "b/deeper/docs.txt")) != key_a
    assert corpus_key(str(tmp_path / "a" / "docs.txt"), "heldout") != key_a
    assert corpus_key("hf:wikimedia/wikipedia:20231101.en@abc123").startswith("hf:wikimedia/wikipedia:20231101.en@abc")
    assert "sha256=" in corpus_key("wikipedia-offline")
    with pytest.raises(ValueError, match="valid forms"):
        corpus_key(str(tmp_path / "missing.txt"))


def test_hf_corpus_streams_as_many_documents_as_the_requested_sequences_need(monkeypatch):
    """mom2_n_samples is the number of sequences for hf: corpora too (not capped at 2,000 documents)."""
    import datasets

    from crispedit_easyedit import corpora

    read = []

    def fake_load_dataset(name, config, split, streaming, **kwargs):
        assert (name, config, split, streaming) == ("some/wiki", "en", "train", True)
        assert kwargs == {"revision": "r1"}
        for i in range(100_000):
            read.append(i)
            text = "short" if i % 3 == 0 else f"Document {i} " + "word " * 20  # every third one has no window
            yield {"title": f"t{i}", "text": text}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = tiny_tokenizer()
    packed = corpora.corpus_sequences("hf:some/wiki:en@r1", tok, seq_len=8, n_sequences=2500, split="all")
    assert packed["input_ids"].shape == (2500, 8)
    assert len(read) > 3700  # 2,500 windows needed about 3,750 documents
    assert len(read) < 3800  # and the stream stopped as soon as it had them


def test_tokenizer_fingerprint_is_content_not_path(tmp_path):
    from transformers import AutoTokenizer

    from crispedit_easyedit.curvature import tokenizer_fingerprint

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "one")
    tok.save_pretrained(tmp_path / "elsewhere" / "two")
    one = AutoTokenizer.from_pretrained(tmp_path / "one")
    two = AutoTokenizer.from_pretrained(tmp_path / "elsewhere" / "two")
    two.padding_side = "left"  # EasyEdit changes it; the content is the same
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(two) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tiny_tokenizer(vocab_size=400)) != tokenizer_fingerprint(tok)
