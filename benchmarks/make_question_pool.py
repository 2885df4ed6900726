"""Write a question pool (one question per line) from the locality questions of benchmark records, for the
``retain_source`` / ``mom2_chat_source`` options (``crispedit_easyedit.chat_corpus.chat_questions`` reads ``.txt``).

Issue 9's diagnosis: an edit trained in the qa/chat formats teaches an answer *style* that carries to every question
asked in that format, and the offline Factbook pool of the retain loss is not the kind of question the locality
metric asks. This pool is: the Natural Questions of ZsRE's ``loc`` field (or CounterFact/WikiBigEdit's
``locality_prompt``) of records that no run edits or evaluates. Questions that also occur in any ``--exclude`` range
are dropped, so a pool never holds an evaluated locality prompt.

    python benchmarks/make_question_pool.py --records ../shared/data/zsre_train.json --range 300-999 \\
        --exclude ../shared/data/zsre_train.json:0-299 --exclude ../shared/data/zsre_eval.json:0-605 \\
        --out benchmarks/pools/zsre_train-loc-300-999.txt
    python benchmarks/make_question_pool.py --records ../shared/data/counterfact.json --range 1000-1999 \
        --exclude ../shared/data/counterfact.json:0-999 --exclude ../shared/data/counterfact.json:2000-9999 \
        --out benchmarks/pools/counterfact-loc-1000-1999.txt

CounterFact's locality prompts are neighbourhood prompts (a relation of the edits' kind, another subject): as a
retain pool they are the "specificity" lever of issue 9 (the model's own completions of them are kept).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from crispedit_easyedit.bench.data import is_wikibigedit_release_form, locality_prompt, read_records

logger = logging.getLogger(__name__)


def parse_range(text: str) -> range:
    """``"300-999"`` -> range(300, 1000) (both ends inclusive, as the data README writes ranges)."""
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a range is FIRST-LAST (inclusive), e.g. 300-999, got {text!r}") from err
    if not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"a range needs 0 <= FIRST <= LAST, got {text!r}")
    return range(first, last + 1)


def locality_question(record: dict) -> str | None:
    """The record's locality question as its edit request carries it (``bench.data.locality_prompt``): ZsRE's
    ``loc`` without "nq question: " for a record with ZsRE's ``src`` field, else CounterFact's (or WikiBigEdit's)
    neighbourhood prompt."""
    dataset = "zsre" if "src" in record else "wikibigedit" if is_wikibigedit_release_form(record) else "counterfact"
    return locality_prompt(dataset, record)


def questions_in(path: str, rows: range) -> list[str]:
    """The locality questions of ``path``'s records ``rows``, in record order.

    Raises:
        ValueError: the range runs past the file's end (naming the file's size).
    """
    records = read_records(path)
    if rows.stop > len(records):
        raise ValueError(f"range {rows.start}-{rows.stop - 1} runs past {path} ({len(records)} records, "
                         f"valid: 0-{len(records) - 1})")
    return [q for q in (locality_question(records[i]) for i in rows) if q]


def build_pool(records: str, rows: range, excludes: list[tuple[str, range]]) -> list[str]:
    """Unique questions of ``records[rows]`` that none of the ``excludes`` ranges holds (case-insensitive)."""
    excluded = {q.lower() for path, span in excludes for q in questions_in(path, span)}
    pool, seen = [], set()
    for question in questions_in(records, rows):
        key = question.lower()
        if key not in excluded and key not in seen:
            seen.add(key)
            pool.append(question)
    logger.info("%d questions from %s %d-%d (%d excluded or repeated)", len(pool), records, rows.start,
                rows.stop - 1, len(rows) - len(pool))
    return pool


def _exclude(text: str) -> tuple[str, range]:
    path, sep, span = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--exclude is FILE:FIRST-LAST, got {text!r}")
    return path, parse_range(span)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", required=True, help="benchmark records file (.json/.jsonl)")
    parser.add_argument("--range", required=True, type=parse_range, help="records to take, FIRST-LAST inclusive")
    parser.add_argument("--exclude", action="append", default=[], type=_exclude,
                        help="FILE:FIRST-LAST whose locality questions must not be in the pool (repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="the .txt pool to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pool = build_pool(args.records, args.range, args.exclude)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(q + "\n" for q in pool), encoding="utf-8")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
