"""Benchmark records -> EasyEdit requests: field mapping on real records, skips, placeholders, ranges, and agreement
with EasyEdit's own dataset readers. Only the tuning ranges of ../shared/data are read (see its README)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from crispedit_easyedit.bench import data
from crispedit_easyedit.bench.data import RequestSet, default_data_path, load_requests
from tests.tiny_models import SHARED_DATA

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"benchmark records not found at {SHARED_DATA}")

ZSRE_TRAIN = SHARED_DATA / "zsre_train.json"
ZSRE_EVAL = SHARED_DATA / "zsre_eval.json"
COUNTERFACT = SHARED_DATA / "counterfact.json"
WIKIBIGEDIT = SHARED_DATA / "wikibigedit.json"


def _write(tmp_path, records, name="records.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Field mapping on real records
# --------------------------------------------------------------------------------------------------------------------


@needs_data
def test_zsre_mapping():
    rs = load_requests("zsre", ZSRE_TRAIN, start=0, count=2)
    assert isinstance(rs, RequestSet) and rs.source == str(ZSRE_TRAIN) and (rs.start, rs.stop) == (0, 2)
    assert rs[0] == {
        "case_id": 0,
        "prompt": "What is the product made by UniFirst?",
        "target_new": "unmanned aircraft",
        "ground_truth": "uniform",
        "rephrase_prompt": "What will be the product of UniFirst?",
        "subject": "UniFirst",
        "locality": {"neighborhood": {"prompt": "john goodman's character in the big lebowski",
                                      "ground_truth": "Walter Sobchak"}},
        "loc_prompt": "john goodman's character in the big lebowski Walter Sobchak",
        "portability": {},
    }
    ev = load_requests("zsre", ZSRE_EVAL, start=0, count=300)
    assert len(ev) == 300 and ev.skipped == {} and ev.missing == {}
    first = ev[0]
    assert (first["prompt"], first["target_new"], first["ground_truth"], first["subject"]) == (
        "Which river system contains Charity Creek?", "Chichester River", "Parramatta River", "Charity Creek")
    assert first["rephrase_prompt"] == "What river system is Charity Creek in?"
    assert first["locality"]["neighborhood"] == {"prompt": "how many series of diary of a wimpy kid are there",
                                                 "ground_truth": "12"}
    assert not any(r["locality"]["neighborhood"]["prompt"].startswith("nq question") for r in ev)
    assert [r["case_id"] for r in ev] == list(range(300))


@needs_data
def test_zsre_records_with_empty_alt_are_skipped_and_counted():
    raw = json.loads(ZSRE_TRAIN.read_text())
    empty = [i for i, r in enumerate(raw) if r["alt"] == ""]
    assert empty == [534, 723]
    rs = load_requests("zsre", ZSRE_TRAIN, start=500, count=300)
    assert len(rs) == 298 and rs.skipped == {"missing_target_new": 2} and rs.n_skipped == 2
    assert 534 not in {r["case_id"] for r in rs} and 535 in {r["case_id"] for r in rs}
    # A record with several answers uses the first as ground truth.
    multi = next(i for i, r in enumerate(raw) if len(r["answers"]) > 1)
    assert load_requests("zsre", ZSRE_TRAIN, multi, 1)[0]["ground_truth"] == raw[multi]["answers"][0]


@needs_data
def test_counterfact_mapping():
    rs = load_requests("counterfact", COUNTERFACT, start=0, count=2000)
    assert len(rs) == 2000 and rs.skipped == {} and rs.missing == {}
    assert rs[0] == {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "subject": "Danielle Darrieux",
        "locality": {"neighborhood": {"prompt": "Michel Rocard is a native speaker of", "ground_truth": "French"}},
        "loc_prompt": "Michel Rocard is a native speaker of French",
        "portability": {},
    }
    raw = json.loads(COUNTERFACT.read_text())[:2000]
    assert [r["case_id"] for r in rs] == [r["case_id"] for r in raw]
    assert all(r["subject"] in r["prompt"] for r in rs)


@needs_data
def test_wikibigedit_six_field_form_and_placeholder_rephrase():
    rs = load_requests("wikibigedit", WIKIBIGEDIT, start=0, count=200)
    assert len(rs) == 200 and rs.skipped == {}
    # No ground truth in this form; the placeholder rephrase of records 19 and 44 counts as missing (not skipped).
    assert rs.missing == {"ground_truth": 200, "rephrase_prompt": 2}
    first = rs[0]
    assert first["prompt"] == ("In which traditional geographical division of Great Britain and Ireland is "
                               "Crailing Parish Church located?")
    assert first["target_new"] == "Roxburghshire" and first["ground_truth"] is None
    assert first["subject"] == "Crailing Parish Church"
    assert first["locality"]["neighborhood"] == {
        "prompt": "In which historic county is Carriden Parish Church located?", "ground_truth": "West Lothian"}
    assert "rephrase_prompt" not in rs[19] and "rephrase_prompt" not in rs[44]
    assert rs[19]["prompt"] and rs[19]["target_new"]


def test_wikibigedit_release_form(tmp_path):
    records = [
        {"subject": "Crailing Parish Church", "update": "Which county is Crailing Parish Church in?",
         "ans": "Roxburghshire", "rephrase": "Crailing Parish Church lies in which county?",
         "personas": "Tell me, as a historian, which county holds Crailing Parish Church?",
         "mhop": "What is the county town of the county that contains Crailing Parish Church?",
         "mhop_ans": "Jedburgh", "loc": "Which county is Carriden Parish Church in?", "loc_ans": "West Lothian"},
        {"subject": "Foo", "update": "Where is Foo?", "ans": "Bar", "ground_truth": "Baz",
         "rephrase": "Reformulated Question:", "personas": None, "mhop": None, "mhop_ans": None,
         "loc": "Where is Qux?", "loc_ans": "Quux"},
        {"subject": "Nope", "update": "Where is Nope?", "ans": "", "rephrase": "x", "loc": "y", "loc_ans": "z"},
    ]
    rs = load_requests("wikibigedit", _write(tmp_path, records))
    assert rs.skipped == {"missing_target_new": 1} and len(rs) == 2
    first, second = rs
    assert first["prompt"] == records[0]["update"] and first["target_new"] == "Roxburghshire"
    assert first["ground_truth"] is None and first["subject"] == "Crailing Parish Church"
    assert first["rephrase_prompt"] == records[0]["rephrase"]
    assert first["portability"] == {
        "personas": {"prompt": records[0]["personas"], "ground_truth": "Roxburghshire"},
        "mhop": {"prompt": records[0]["mhop"], "ground_truth": "Jedburgh"},
    }
    assert first["locality"] == {"neighborhood": {"prompt": records[0]["loc"], "ground_truth": "West Lothian"}}
    assert second["ground_truth"] == "Baz" and second["portability"] == {} and "rephrase_prompt" not in second
    assert rs.missing == {"ground_truth": 1, "rephrase_prompt": 1, "portability.personas": 1, "portability.mhop": 1}


# --------------------------------------------------------------------------------------------------------------------
# Hand-made bad records
# --------------------------------------------------------------------------------------------------------------------


def _zsre(**overrides):
    record = {"subject": "Paris", "src": "Which country is Paris the capital of?", "alt": "Italy",
              "answers": ["France"], "rephrase": "Paris is the capital of which country?",
              "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare"}
    record.update(overrides)
    return record


def test_bad_records_are_skipped_and_counted_per_reason(tmp_path):
    records = [
        _zsre(),                                    # kept
        _zsre(src=""),                              # missing_prompt
        {k: v for k, v in _zsre().items() if k != "src"},  # missing_prompt
        _zsre(alt="   "),                           # missing_target_new
        _zsre(alt=None),                            # missing_target_new
        _zsre(answers=[]),                          # missing_ground_truth
        _zsre(answers=[""]),                        # missing_ground_truth
        "not a record",                             # not_an_object
        _zsre(rephrase="Reformulated Question:"),   # kept, rephrase missing
        _zsre(subject="Rome"),                      # kept, subject not in prompt -> dropped from the request
        _zsre(loc=None),                            # kept, no locality
        _zsre(alt="  Spain "),                      # kept, stripped
    ]
    rs = load_requests("zsre", _write(tmp_path, records))
    assert rs.skipped == {"missing_prompt": 2, "missing_target_new": 2, "missing_ground_truth": 2,
                          "not_an_object": 1}
    assert [r["case_id"] for r in rs] == [0, 8, 9, 10, 11]
    assert rs.missing == {"rephrase_prompt": 1, "subject": 1, "locality": 1}
    assert "rephrase_prompt" not in rs[1] and "subject" not in rs[2]
    assert rs[3]["locality"] == {} and "loc_prompt" not in rs[3]
    assert rs[4]["target_new"] == "Spain"
    assert rs[0]["locality"]["neighborhood"]["prompt"] == "who wrote hamlet"


def test_counterfact_requires_ground_truth(tmp_path):
    good = {"case_id": 7, "prompt": "The mother tongue of X is", "target_new": "English", "subject": "X",
            "ground_truth": "French", "rephrase_prompt": "X speaks", "locality_prompt": "Y speaks",
            "locality_ground_truth": "French"}
    rs = load_requests("counterfact", _write(tmp_path, [good, {**good, "ground_truth": ""}]))
    assert [r["case_id"] for r in rs] == [7] and rs.skipped == {"missing_ground_truth": 1}


def test_jsonl_records(tmp_path):
    path = tmp_path / "zsre.jsonl"
    path.write_text("\n".join(json.dumps(_zsre(alt=f"Country {i}")) for i in range(3)) + "\n", encoding="utf-8")
    rs = load_requests("zsre", path, start=1)
    assert [r["target_new"] for r in rs] == ["Country 1", "Country 2"] and (rs.start, rs.stop) == (1, 3)


# --------------------------------------------------------------------------------------------------------------------
# Ranges, names and default paths
# --------------------------------------------------------------------------------------------------------------------


def test_range_and_name_errors(tmp_path):
    path = _write(tmp_path, [_zsre() for _ in range(5)])
    assert len(load_requests("zsre", path, start=4, count=1)) == 1
    with pytest.raises(ValueError, match=r"start=5 .*5 records.*0 <= start <= 4"):
        load_requests("zsre", path, start=5)
    with pytest.raises(ValueError, match=r"start=-1"):
        load_requests("zsre", path, start=-1)
    with pytest.raises(ValueError, match=r"count=3 .*1 <= count <= 2"):
        load_requests("zsre", path, start=3, count=3)
    with pytest.raises(ValueError, match=r"count=0"):
        load_requests("zsre", path, count=0)
    with pytest.raises(ValueError, match=r"'mquake'.*zsre.*counterfact.*wikibigedit"):
        load_requests("mquake", path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_requests("zsre", tmp_path / "nope.json")
    with pytest.raises(ValueError, match="JSON list"):
        load_requests("zsre", _write(tmp_path, {"records": []}, "dict.json"))


def test_default_data_path(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    # ../shared/data next to the repository that contains the working directory.
    repo = tmp_path / "main"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub").mkdir()
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    _write(shared, [_zsre()], "zsre_eval.json")
    monkeypatch.chdir(repo / "sub")
    assert default_data_path("zsre") == shared / "zsre_eval.json"
    assert len(load_requests("zsre")) == 1
    # The environment variable comes first.
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    _write(env_dir, [_zsre(), _zsre()], "zsre_eval.json")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
    assert default_data_path("zsre") == env_dir / "zsre_eval.json"
    # Nothing found: the error names the places tried and the variable.
    with pytest.raises(FileNotFoundError, match=r"counterfact.json.*CRISPEDIT_DATA_DIR"):
        default_data_path("counterfact")
    with pytest.raises(ValueError, match="valid choices"):
        default_data_path("zsre_train")


# --------------------------------------------------------------------------------------------------------------------
# Agreement with EasyEdit's own dataset readers
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easyedit_datasets():
    from crispedit_easyedit.easyedit import datasets

    try:
        datasets.import_easyeditor()
    except ImportError as err:
        pytest.skip(f"easyeditor cannot be imported here: {err}")
    return datasets


@needs_data
@pytest.mark.parametrize(
    ("dataset", "path", "start", "count"),
    [("zsre", ZSRE_TRAIN, 0, 1000), ("zsre", ZSRE_EVAL, 0, 300), ("counterfact", COUNTERFACT, 0, 2000),
     ("counterfact", COUNTERFACT, 1500, 500)],
)
def test_easyedit_dataset_path_agrees(easyedit_datasets, dataset, path, start, count):
    ours = load_requests(dataset, path, start, count)
    theirs = easyedit_datasets.load_requests_with_easyedit(dataset, path, start, count)
    assert theirs.source == f"easyeditor:{path}"
    assert theirs.requests == ours.requests
    assert theirs.skipped == ours.skipped and theirs.missing == ours.missing
    assert len(ours) == count - ours.n_skipped


@needs_data
def test_easyedit_path_for_six_field_wikibigedit_falls_back_to_core_reader(easyedit_datasets):
    ours = load_requests("wikibigedit", WIKIBIGEDIT, 0, 200)
    theirs = easyedit_datasets.load_requests_with_easyedit("wikibigedit", WIKIBIGEDIT, 0, 200)
    assert theirs.requests == ours.requests and theirs.source == str(WIKIBIGEDIT)


class _MainWikiBigEditDataset:
    """The item layout of EasyEdit main's WikiBigEditDataset (easyeditor/dataset/wikibigedit.py), for files in the
    release form; used where only the PyPI EasyEdit (which lacks the class) is installed."""

    def __init__(self, data_dir, size=None):
        raw = json.loads(Path(data_dir).read_text(encoding="utf-8"))
        self._data = [{
            "subject": r["subject"], "prompt": r["update"], "target_new": r["ans"],
            "ground_truth": r.get("ground_truth"), "rephrase": r["rephrase"],
            "portability_personas": r.get("personas"), "portability_hop": r.get("mhop"),
            "portability_hop_ans": r.get("mhop_ans"), "locality": r.get("loc"), "locality_ans": r.get("loc_ans"),
        } for r in raw][:size]

    def __getitem__(self, item):
        return self._data[item]

    def __len__(self):
        return len(self._data)


def test_easyedit_wikibigedit_release_form_agrees(tmp_path, monkeypatch):
    from crispedit_easyedit.easyedit import datasets

    records = [{"subject": f"S{i}", "update": f"Where is S{i}?", "ans": f"A{i}", "rephrase": f"S{i} is where?",
                "personas": f"As a child, where is S{i}?" if i % 2 else None, "mhop": None, "mhop_ans": None,
                "loc": f"Where is T{i}?", "loc_ans": f"B{i}"} for i in range(6)]
    path = _write(tmp_path, records)
    fake = types.SimpleNamespace(WikiBigEditDataset=_MainWikiBigEditDataset)
    monkeypatch.setattr(datasets, "import_easyeditor", lambda: fake)
    theirs = datasets.load_requests_with_easyedit("wikibigedit", path, 1, 4)
    ours = load_requests("wikibigedit", path, 1, 4)
    assert theirs.source == f"easyeditor:{path}" and theirs.requests == ours.requests
    assert [r["case_id"] for r in theirs] == [1, 2, 3, 4]
    assert theirs[0]["portability"] == {"personas": {"prompt": "As a child, where is S1?", "ground_truth": "A1"}}
    # Without the class (PyPI EasyEdit) the core reader is used.
    monkeypatch.setattr(datasets, "import_easyeditor", lambda: types.SimpleNamespace())
    assert datasets.load_requests_with_easyedit("wikibigedit", path, 1, 4).source == str(path)


# --------------------------------------------------------------------------------------------------------------------
# CounterFact in ROME's release form, and files of hub dataset repositories
# --------------------------------------------------------------------------------------------------------------------


def _rome(**overrides):
    """A record shaped like ROME/MEMIT's counterfact.json (its fields; the texts are the test's own)."""
    record = {"case_id": 3, "pararel_idx": 11,
              "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                    "target_new": {"str": "English", "id": "Q1860"},
                                    "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
              "paraphrase_prompts": ["Some context. Danielle Darrieux spoke the language", "Danielle Darrieux is a"],
              "neighborhood_prompts": ["The mother tongue of Michel Rocard is", "Léon Blum spoke"],
              "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
              "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    record.update(overrides)
    return record


def test_counterfact_rome_release_form_maps_like_the_easyedit_form(tmp_path):
    no_paraphrase = _rome(case_id=4, paraphrase_prompts=[])
    no_truth = _rome(case_id=5, requested_rewrite={**_rome()["requested_rewrite"], "target_true": {}})
    rs = load_requests("counterfact", _write(tmp_path, [_rome(), no_paraphrase, no_truth]))
    assert rs.skipped == {"missing_ground_truth": 1} and rs.missing == {"rephrase_prompt": 1}
    assert rs[0] == {
        "case_id": 3,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Some context. Danielle Darrieux spoke the language",
        "subject": "Danielle Darrieux",
        "locality": {"neighborhood": {"prompt": "The mother tongue of Michel Rocard is", "ground_truth": "French"}},
        "loc_prompt": "The mother tongue of Michel Rocard is French",
        "portability": {},
    }
    assert "rephrase_prompt" not in rs[1] and rs[1]["case_id"] == 4


def _hub_cache(root, repo, files):
    """Lay out ``files`` ({path in repo: records}) as huggingface_hub's cache holds a downloaded dataset repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, records in files.items():
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records) if name.endswith(".json") else
                        "\n".join(json.dumps(r) for r in records), encoding="utf-8")


def test_hub_dataset_files_by_name_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    records = [_zsre(alt=f"Country {i}") for i in range(3)]
    _hub_cache(tmp_path / "hub", "someone/zsre-mend", {"data/zsre_mend_eval.json": records,
                                                       "data/zsre_mend_eval.jsonl": records})
    local = load_requests("zsre", _write(tmp_path, records), start=1)
    for name in ("data/zsre_mend_eval.json", "data/zsre_mend_eval.jsonl"):
        spec = f"hf:someone/zsre-mend:{name}"
        rs = load_requests("zsre", spec, start=1)
        assert rs.requests == local.requests and rs.source == spec  # same mapping; the spec, not a cache path
    # offline and not cached, or no file named: the error says how to go on without internet
    with pytest.raises(FileNotFoundError, match=r"'data/other\.json' of hub dataset 'someone/zsre-mend'.*--data-path"):
        load_requests("zsre", "hf:someone/zsre-mend:data/other.json")
    with pytest.raises(FileNotFoundError, match=r"hub dataset 'someone/zsre-mend'.*--data-path"):
        load_requests("zsre", "hf:someone/zsre-mend")
    with pytest.raises(ValueError, match=r"names no hub dataset; valid form: 'hf:<owner>/<name>"):
        load_requests("zsre", "hf:zsre-mend")
    with pytest.raises(ValueError, match=r"must end in \.json or \.jsonl, got 'data/train\.parquet'"):
        load_requests("zsre", "hf:someone/zsre-mend:data/train.parquet")
