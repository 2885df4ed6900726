"""Capability corpora: text for the curvature statistics and held-out text for perplexity / KL evaluation.

A corpus is named by a *spec* string:

- ``"wikipedia-offline"``: the real English Wikipedia articles shipped in gensim's test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), parsed with
  ``gensim.corpora.wikicorpus.extract_pages`` + ``filter_wiki``; redirects, disambiguation pages and pages shorter
  than :data:`MIN_ARTICLE_CHARS` characters are dropped.
- a local ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON object per line with a
  ``"text"`` field), or a folder containing such files (read recursively in sorted path order);
- ``"hf:<dataset>[:<config>][@<revision>]"``: a Hugging Face dataset read with
  ``datasets.load_dataset(..., streaming=True)`` (field ``"text"``; needs internet). The curvature windows stream as
  many documents as the requested number of sequences needs (:func:`corpus_sequences`).

Every source is split deterministically by a stable hash of each document's key (the article title where there is
one, else the text) into ``"stats"`` (about :data:`STATS_FRACTION` of the documents) and ``"heldout"`` (the rest);
the two never overlap, do not depend on the order or number of documents, and ``"all"`` gives both in corpus order.

This module never imports EasyEdit.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

OFFLINE_WIKIPEDIA = "wikipedia-offline"
WIKI_TEST_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLITS: tuple[str, ...] = ("stats", "heldout", "all")
STATS_FRACTION = 0.8
MIN_ARTICLE_CHARS = 500
#: Default number of documents :func:`load_corpus` reads from a streamed ``hf:`` dataset (the curvature windows of
#: :func:`corpus_sequences` stream as many documents as they need instead).
HF_DEFAULT_MAX_DOCUMENTS = 2000
LOCAL_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")

_VALID_FORMS = (
    f"'{OFFLINE_WIKIPEDIA}', a local .txt file (documents separated by blank lines), a local .jsonl file "
    "(field 'text'), a folder of such files, or 'hf:<dataset>[:<config>]'"
)


# --------------------------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------------------------


def split_of(key: str) -> str:
    """The split (``"stats"`` or ``"heldout"``) of a document, from a stable SHA-256 hash of its key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "stats" if fraction < STATS_FRACTION else "heldout"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid choices: {list(SPLITS)}.")


def _select(docs: Iterable[tuple[str, str]], split: str) -> list[str]:
    """Texts of the ``(key, text)`` documents that fall into ``split`` (all of them for ``"all"``)."""
    return [text for key, text in docs if split == "all" or split_of(key) == split]


# --------------------------------------------------------------------------------------------------------------------
# Offline Wikipedia
# --------------------------------------------------------------------------------------------------------------------

_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_EMPTY_BULLET = re.compile(r"^[*#:; \t]*$", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")


def _clean_wiki_text(text: str) -> str:
    """Tidy ``filter_wiki`` output: drop bold/italic quotes, turn ``== Heading ==`` into ``Heading``, drop empty
    bullets and trailing spaces, and collapse runs of blank lines."""
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _EMPTY_BULLET.sub("", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def wikipedia_test_file() -> Path:
    """Path of the Wikipedia dump excerpt shipped in gensim's test data (gensim is located, not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The corpus {OFFLINE_WIKIPEDIA!r} needs the PyPI package 'gensim' (`pip install gensim`); "
            "or use a local text corpus or 'hf:<dataset>'."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / WIKI_TEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim; reinstall gensim>=4.3.")
    return path


@functools.lru_cache(maxsize=1)
def offline_wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """All usable ``(title, text)`` articles of the offline Wikipedia excerpt, in dump order (parsed once)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = wikipedia_test_file()
    articles: list[tuple[str, str]] = []
    dropped = {"redirect": 0, "disambiguation": 0, "short": 0}
    with bz2.open(path, "rb") as handle:
        pages = extract_pages(handle, filter_namespaces=("0",))
        for title, markup, _page_id in tqdm(pages, desc="Parsing offline Wikipedia", unit="page", leave=False):
            if markup.lstrip().lower().startswith("#redirect"):
                dropped["redirect"] += 1
                continue
            if title.endswith("(disambiguation)"):
                dropped["disambiguation"] += 1
                continue
            text = _clean_wiki_text(filter_wiki(markup))
            if len(text) < MIN_ARTICLE_CHARS:
                dropped["short"] += 1
                continue
            articles.append((title, text))
    logger.info("Offline Wikipedia: %d articles (%d characters); dropped %s.",
                len(articles), sum(len(t) for _, t in articles), dropped)
    return tuple(articles)


# --------------------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [doc.strip() for doc in _BLANK_LINE.split(text) if doc.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no} has no string field 'text' (the field every record needs).")
            if record["text"].strip():
                docs.append(record["text"].strip())
    return docs


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"Folder {str(path)!r} contains no {list(LOCAL_SUFFIXES)} files.")
        docs: list[str] = []
        for file in files:
            docs.extend(_read_local(file))
        return docs
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    raise ValueError(f"Unsupported corpus file {str(path)!r} (suffix {suffix!r}); valid forms: {_VALID_FORMS}.")


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (users with internet)
# --------------------------------------------------------------------------------------------------------------------


def _stream_hf(spec: str, split: str) -> Iterator[str]:
    """Texts of a Hugging Face dataset that fall into ``split``, streamed (``hf:<dataset>[:<config>][@<revision>]``)."""
    body, _, revision = spec[len("hf:"):].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"Corpus spec {spec!r} names no dataset; valid forms: {_VALID_FORMS}.")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(f"Corpus spec {spec!r} needs the 'datasets' package (`pip install datasets`).") from err
    kwargs = {"revision": revision} if revision else {}
    for record in load_dataset(name, config or None, split="train", streaming=True, **kwargs):
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"Dataset {spec!r} has no string field 'text' (fields: {sorted(record)}).")
        text = text.strip()
        if not text:
            continue
        key = str(record.get("title") or record.get("id") or text)
        if split == "all" or split_of(key) == split:
            yield text


def _load_hf(spec: str, split: str, max_documents: int) -> list[str]:
    docs: list[str] = []
    with tqdm(total=max_documents, desc=f"Reading {spec} ({split})", unit="doc") as bar:
        for text in _stream_hf(spec, split):
            docs.append(text)
            bar.update(1)
            if len(docs) >= max_documents:
                break
    return docs


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def load_corpus(spec: str, split: str = "stats", max_documents: int | None = None) -> list[str]:
    """Load the documents of a capability corpus.

    Args:
        spec: ``"wikipedia-offline"``, a local ``.txt``/``.jsonl`` file or folder, or ``"hf:<dataset>[:<config>]"``
            (see the module docstring).
        split: ``"stats"`` (about 80 % of the documents, for curvature statistics), ``"heldout"`` (the other
            documents, for perplexity/KL) or ``"all"``.
        max_documents: Keep at most this many documents of the split (in corpus order). For ``hf:`` specs it
            bounds how much is streamed and defaults to :data:`HF_DEFAULT_MAX_DOCUMENTS`.

    Returns:
        The documents' texts, in corpus order.

    Raises:
        ValueError: for an unknown spec or split (the message lists the valid forms), or an empty result.
    """
    _check_split(split)
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be a positive integer or None, got {max_documents!r}.")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Unknown corpus spec {spec!r}; valid forms: {_VALID_FORMS}.")

    if spec == OFFLINE_WIKIPEDIA:
        texts = _select(offline_wikipedia_articles(), split)
    elif spec.startswith("hf:"):
        texts = _load_hf(spec, split, max_documents or HF_DEFAULT_MAX_DOCUMENTS)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"Unknown corpus spec {spec!r} (not an existing path); valid forms: {_VALID_FORMS}.")
        texts = _select(((doc, doc) for doc in _read_local(path)), split)

    if max_documents is not None:
        texts = texts[:max_documents]
    if not texts:
        raise ValueError(f"Corpus {spec!r} has no documents in split {split!r}; try split='all' or a larger corpus.")
    logger.info("Corpus %s (%s): %d documents, %d characters.", spec, split, len(texts), sum(map(len, texts)))
    return texts


def corpus_fingerprint(spec: str, split: str, texts: Sequence[str]) -> str:
    """SHA-256 hex digest identifying a corpus: its spec, split and the exact texts (length-prefixed)."""
    digest = hashlib.sha256()
    for part in (spec, split, str(len(texts))):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def _sha256_file(path: Path, digest: Any | None = None) -> Any:
    digest = digest or hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


@functools.lru_cache(maxsize=1)
def _offline_wikipedia_sha256() -> str:
    return _sha256_file(wikipedia_test_file()).hexdigest()


def corpus_key(spec: str, split: str = "stats") -> str:
    """A portable identity of ``(spec, split)`` for cache keys, computed without reading the documents' text.

    * ``"wikipedia-offline"``: the sha256 of gensim's dump file plus the article filter settings;
    * a local file or folder: the sha256 of the files' *contents* (folders: with paths relative to the folder), so
      the same corpus in another place gives the same key;
    * ``"hf:<dataset>[:<config>]"``: the spec itself; pin a revision with ``hf:<dataset>:<config>@<revision>``
      (a dataset that changes on the hub under an unpinned spec keeps its old cache).

    No machine path is part of the key.
    """
    _check_split(split)
    selection = f"split={split}|fraction={STATS_FRACTION}"
    if spec == OFFLINE_WIKIPEDIA:
        return f"{spec}|sha256={_offline_wikipedia_sha256()}|min_chars={MIN_ARTICLE_CHARS}|{selection}"
    if spec.startswith("hf:"):
        return f"{spec}|{selection}"
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"Unknown corpus spec {spec!r} (not an existing path); valid forms: {_VALID_FORMS}.")
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _sha256_file(file, digest)
    else:
        digest.update(path.suffix.lower().encode("utf-8") + b"\0")
        _sha256_file(path, digest)
    return f"local|sha256={digest.hexdigest()}|{selection}"


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer adds a BOS token at the start of a text by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special and with_special[0] == bos and (not without or without[0] != bos):
        return [int(bos)]
    return []


def _check_window_sizes(seq_len: Any, n_sequences: Any) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    if not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"n_sequences must be a positive integer, got {n_sequences!r}.")


def pack_sequences(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    n_sequences: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Tokenise documents into one stream and cut it into non-overlapping windows of exactly ``seq_len`` tokens.

    Each document is tokenised as its text followed by a blank line (``"\\n\\n"``), with no special tokens except
    the tokenizer's BOS at the document start if the tokenizer adds one by default. The documents are concatenated
    in corpus order (``seed=0``) or in a deterministic ``random.Random(seed)`` permutation (any other seed), and the
    first ``n_sequences`` windows of the stream are returned. Tokenisation stops as soon as enough tokens exist.

    Args:
        texts: Documents.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Tokens per window (>= 1).
        n_sequences: Number of windows wanted (>= 1).
        seed: 0 keeps the corpus order; another integer permutes the documents deterministically first.

    Returns:
        ``{"input_ids": LongTensor (n, seq_len), "attention_mask": LongTensor (n, seq_len) of ones}``, with
        ``n == n_sequences`` unless the corpus is too short; then fewer windows are returned with a WARNING.

    Raises:
        ValueError: for non-positive sizes or if the corpus yields no complete window.
    """
    _check_window_sizes(seq_len, n_sequences)
    order = list(range(len(texts)))
    if seed != 0:
        random.Random(seed).shuffle(order)

    needed = seq_len * n_sequences
    bos = _bos_prefix(tokenizer)
    stream: list[int] = []
    with tqdm(total=needed, desc="Tokenising corpus", unit="tok", leave=False) as bar:
        for index in order:
            ids = tokenizer(texts[index] + "\n\n", add_special_tokens=False, verbose=False)["input_ids"]
            before = len(stream)
            stream.extend(bos)
            stream.extend(ids)
            bar.update(min(len(stream), needed) - min(before, needed))
            if len(stream) >= needed:
                break

    n_windows = min(n_sequences, len(stream) // seq_len)
    if n_windows == 0:
        raise ValueError(
            f"The corpus has only {len(stream)} tokens, fewer than one window of seq_len={seq_len}; "
            "use a larger corpus or a smaller seq_len."
        )
    if n_windows < n_sequences:
        logger.warning("The corpus has only %d tokens: returning %d of the %d requested windows of %d tokens.",
                       len(stream), n_windows, n_sequences, seq_len)
    input_ids = torch.tensor(stream[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def corpus_sequences(spec: str, tokenizer: Any, seq_len: int, n_sequences: int,
                     split: str = "stats") -> dict[str, torch.Tensor]:
    """``n_sequences`` windows of ``seq_len`` tokens of a corpus: what the curvature statistics and the held-out
    capability metrics are computed on.

    Finite corpora (offline Wikipedia, local files) go through :func:`spread_windows` (round-robin across documents).
    ``hf:`` corpora are streamed: the first window of every document that has one, in stream order, reading as
    many documents as ``n_sequences`` needs (the paper's n = 10,000 sequences of 512 tokens).
    """
    if isinstance(spec, str) and spec.startswith("hf:"):
        return stream_windows(_stream_hf(spec, split), tokenizer, seq_len, n_sequences, source=spec)
    return spread_windows(load_corpus(spec, split), tokenizer, seq_len, n_sequences)


def stream_windows(texts: Iterable[str], tokenizer: Any, seq_len: int, n_sequences: int,
                   source: str = "the stream") -> dict[str, torch.Tensor]:
    """The first full window of ``seq_len`` tokens of each document of a (possibly endless) stream, until
    ``n_sequences`` windows exist; documents shorter than one window are skipped and counted.

    Returns:
        ``{"input_ids": LongTensor (n, seq_len), "attention_mask": ones}``; fewer windows (with a WARNING) if the
        stream ends first.

    Raises:
        ValueError: for non-positive sizes or if no document has a full window.
    """
    _check_window_sizes(seq_len, n_sequences)
    bos = _bos_prefix(tokenizer)
    windows: list[list[int]] = []
    documents = short = 0
    with tqdm(total=n_sequences, desc=f"Tokenising {source}", unit="seq") as bar:
        for text in texts:
            documents += 1
            ids = bos + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) < seq_len:
                short += 1
                continue
            windows.append(ids[:seq_len])
            bar.update(1)
            if len(windows) >= n_sequences:
                break
    logger.info("%s: %d windows of %d tokens from %d documents (%d shorter than one window skipped).", source,
                len(windows), seq_len, documents, short)
    if not windows:
        raise ValueError(f"no document of {source} has {seq_len} tokens; use a smaller seq_len.")
    if len(windows) < n_sequences:
        logger.warning("%s yields only %d windows of %d tokens (%d requested).", source, len(windows), seq_len,
                       n_sequences)
    input_ids = torch.tensor(windows, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def heldout_sequences(spec: str, tokenizer: Any, seq_len: int, n_sequences: int) -> dict[str, torch.Tensor]:
    """Windows of the ``"heldout"`` split of ``spec`` (never seen by the curvature statistics), for perplexity/KL."""
    return corpus_sequences(spec, tokenizer, seq_len, n_sequences, split="heldout")


def spread_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, n_sequences: int) -> dict[str, torch.Tensor]:
    """Windows of ``seq_len`` tokens taken round-robin across documents, so the statistics see many articles.

    Each document is tokenised like in :func:`pack_sequences` (BOS only if the tokenizer adds one) and cut into
    non-overlapping full windows that start at its beginning; the result takes window 0 of every document in corpus
    order, then window 1 of every document, and so on. Documents shorter than one window contribute nothing.
    (:func:`pack_sequences` instead fills 64 x 256 tokens from the first two Wikipedia articles.)

    Returns:
        ``{"input_ids": LongTensor (n, seq_len), "attention_mask": ones}``; fewer than ``n_sequences`` windows
        (with a WARNING) if the corpus is too short.

    Raises:
        ValueError: for non-positive sizes or if no document has a full window.
    """
    _check_window_sizes(seq_len, n_sequences)
    bos = _bos_prefix(tokenizer)
    per_document: list[list[list[int]]] = []
    for text in tqdm(texts, desc="Tokenising corpus", unit="doc", leave=False):
        ids = bos + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        per_document.append([ids[k : k + seq_len] for k in range(0, len(ids) - seq_len + 1, seq_len)])
    windows: list[list[int]] = []
    depth = 0
    while len(windows) < n_sequences and any(len(doc) > depth for doc in per_document):
        windows.extend(doc[depth] for doc in per_document if len(doc) > depth)
        depth += 1
    windows = windows[:n_sequences]
    if not windows:
        raise ValueError(f"no document has {seq_len} tokens; use a larger corpus or a smaller seq_len.")
    if len(windows) < n_sequences:
        logger.warning("The corpus yields only %d windows of %d tokens (%d requested).", len(windows), seq_len,
                       n_sequences)
    input_ids = torch.tensor(windows, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
