"""benchmarks/make_question_pool.py: the retain/chat question pool from unevaluated records' locality questions."""

import importlib.util
import json
from pathlib import Path

import pytest

from crispedit_easyedit.chat_corpus import chat_questions

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_question_pool.py"


@pytest.fixture(scope="module")
def pool_script():
    spec = importlib.util.spec_from_file_location("make_question_pool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _zsre(tmp_path, name, locs):
    path = tmp_path / name
    path.write_text(json.dumps([{"src": f"q{i}", "loc": loc, "loc_ans": "a"} for i, loc in enumerate(locs)]))
    return str(path)


def test_pool_drops_excluded_and_repeated_questions_and_reads_back(pool_script, tmp_path):
    train = _zsre(tmp_path, "train.json", ["nq question: who wrote hamlet", "nq question: evaluated one",
                                           "nq question: where is rome", "nq question: Who wrote Hamlet",
                                           "nq question: kept last"])
    evaluated = _zsre(tmp_path, "eval.json", ["nq question: Evaluated One", "nq question: not in range"])
    out = tmp_path / "pool.txt"
    pool_script.main(["--records", train, "--range", "0-4", "--exclude", f"{evaluated}:0-0", "--out", str(out)])
    expected = ["who wrote hamlet", "where is rome", "kept last"]
    assert out.read_text().splitlines() == expected
    assert chat_questions(str(out)) == expected  # the form retain_source / mom2_chat_source read


def test_pool_range_outside_the_file_names_its_size(pool_script, tmp_path):
    train = _zsre(tmp_path, "train.json", ["nq question: a", "nq question: b"])
    with pytest.raises(ValueError, match=r"valid: 0-1"):
        pool_script.build_pool(train, range(1, 3), [])


def test_counterfact_locality_prompt_is_a_question(pool_script):
    assert pool_script.locality_question({"locality_prompt": "The capital of France is"}) == \
        "The capital of France is"
    assert pool_script.locality_question({"loc": ""}) is None
