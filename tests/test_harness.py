"""The side-by-side harness: the cached before-evaluation, run_one's row for every in-package method, the
retention curve of sequential runs, and a Hydra multirun that the report turns into a table and plots."""

from __future__ import annotations

import json
import math

import pytest

from crispedit_easyedit.bench import job
from tests.test_cli import setup  # noqa: F401 - the tiny model folder, corpus and hparams fixture
from tests.tiny_models import SHARED_DATA, tiny_llama

needs_data = pytest.mark.skipif(not (SHARED_DATA / "zsre_train.json").exists(), reason="needs ../shared/data")


def assert_close_tree(a, b, path="result"):
    """Equal nested results: same keys and lengths, floats within 1e-9 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_close_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} vs {b}"
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


@pytest.fixture
def measured_labels(monkeypatch):
    """The label of every job.measure call (the before-evaluation calls it as 'base' in the eval job)."""
    labels = []
    real = job.measure
    monkeypatch.setattr(job, "measure", lambda *a, **k: labels.append(k.get("label")) or real(*a, **k))
    return labels


def eval_config(model_dir, hparams, tmp_path, **changes):
    values = dict(model=str(model_dir), hparams=str(hparams), data_path=str(SHARED_DATA / "zsre_train.json"),
                  count=3, n_probes=4, heldout_sequences=2, heldout_seq_len=32, easyedit_metrics=False,
                  progress=False, output_dir=str(tmp_path / "out"), before_cache_dir=str(tmp_path / "before"))
    values.update(changes)
    return job.JobConfig(**values)


@needs_data
def test_the_before_evaluation_is_cached_reused_and_invalidated_by_records_or_weights(setup, tmp_path,  # noqa: F811
                                                                                    measured_labels):
    _, model_dir, hparams = setup
    first = job.run_eval_job(eval_config(model_dir, hparams, tmp_path))
    assert measured_labels == ["base", "edited"] and first["before_cache"]["hit"] is False
    assert len(list((tmp_path / "before").glob("*.safetensors"))) == 1  # reference log-probs, no pickle
    measured_labels.clear()
    second = job.run_eval_job(eval_config(model_dir, hparams, tmp_path))
    assert measured_labels == ["edited"] and second["before_cache"] == first["before_cache"] | {"hit": True}
    assert_close_tree(first["before"], second["before"])  # cached == fresh
    assert_close_tree(first["after"], second["after"])  # the KL reference and locality inputs came back intact
    assert second["after"]["capability"]["heldout_kl"] == pytest.approx(0.0, abs=1e-9)
    measured_labels.clear()
    fresh = job.run_eval_job(eval_config(model_dir, hparams, tmp_path, before_cache=False))
    assert measured_labels == ["base", "edited"] and fresh["before_cache"] == {"hit": False, "key": None}
    assert_close_tree(fresh["before"], second["before"])
    # other records: measured again
    measured_labels.clear()
    other = job.run_eval_job(eval_config(model_dir, hparams, tmp_path, start=3))
    assert measured_labels == ["base", "edited"] and other["before_cache"]["key"] != first["before_cache"]["key"]
    # other weights (same architecture and tokenizer): measured again
    changed_dir = tmp_path / "model2"
    tiny_llama(seed=1).save_pretrained(changed_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            (changed_dir / name).write_bytes((model_dir / name).read_bytes())
    measured_labels.clear()
    changed = job.run_eval_job(eval_config(changed_dir, hparams, tmp_path))
    assert measured_labels == ["base", "edited"]
    assert changed["before_cache"]["key"] not in (first["before_cache"]["key"], other["before_cache"]["key"])
    assert len(list((tmp_path / "before").glob("*.json"))) == 3


@needs_data
def test_a_corrupt_cache_entry_is_measured_again_with_a_warning(setup, tmp_path, measured_labels, caplog):  # noqa: F811
    _, model_dir, hparams = setup
    first = job.run_eval_job(eval_config(model_dir, hparams, tmp_path))
    (tmp_path / "before" / f"{first['before_cache']['key']}.safetensors").write_bytes(b"not safetensors")
    measured_labels.clear()
    again = job.run_eval_job(eval_config(model_dir, hparams, tmp_path))
    assert measured_labels == ["base", "edited"] and again["before_cache"]["hit"] is False
    assert "cannot be used" in caplog.text
    assert_close_tree(first["before"], again["before"])
