"""The side-by-side harness: the cached before-evaluation, run_one's row for every in-package method, the
retention curve of sequential runs, and a Hydra multirun that the report turns into a table and plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from crispedit_easyedit.bench import job
from tests.test_cli import setup  # noqa: F401 - the tiny model folder, corpus and hparams fixture
from tests.test_methods import bench_config, tiny_bench  # noqa: F401 - the harness's tiny model and hparams tree
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


# ------------------------------------------------------------------------------------------------------------------
# The harness


@needs_data
def test_run_one_reuses_the_before_evaluation_across_methods_and_measures_again_for_other_records(
        tiny_bench, tmp_path, measured_labels, monkeypatch):  # noqa: F811
    from crispedit_easyedit.bench import harness

    # the row names the code the run imported: the git state is taken before anything is measured
    monkeypatch.setattr(harness, "git_state", lambda: {"measurements_before_it": len(measured_labels)})

    def config(method, start=0):
        cfg = bench_config(tiny_bench, method)
        cfg["before_cache_dir"] = str(tmp_path / "before")
        cfg["results_file"] = str(tmp_path / "results.jsonl")
        cfg["dataset"]["start"] = start
        return cfg

    first = harness.run_one(config("crispedit"))
    assert measured_labels == ["before", "after"] and first["before_cache"]["hit"] is False
    assert first["environment"]["git"] == {"measurements_before_it": 0}
    measured_labels.clear()
    second = harness.run_one(config("ft"))
    assert measured_labels == ["after"] and second["before_cache"] == dict(first["before_cache"], hit=True)
    assert_close_tree(first["before"], second["before"])
    measured_labels.clear()
    harness.run_one(config("ft", start=3))
    assert measured_labels == ["before", "after"]
    assert len(harness.read_rows(tmp_path / "results.jsonl")) == 3


def test_run_one_rejects_a_bad_config_before_loading_anything(tiny_bench):  # noqa: F811
    from crispedit_easyedit.bench import harness

    bad = bench_config(tiny_bench, "crispedit")
    bad["dataset"]["cout"] = 3
    with pytest.raises(ValueError, match=r"unknown key dataset.cout; valid keys of 'dataset': \['count', 'name'"):
        harness.run_one(bad)
    bad = bench_config(tiny_bench, "crispedit", chunk_size=0)
    with pytest.raises(ValueError, match="method.chunk_size must be null or an integer >= 1, got 0"):
        harness.run_one(bad)


SWEEPS = {"gamma": ("method.overrides.energy_threshold", 6), "n": ("dataset.count", 4),
          "layers": ("method.overrides.layers", 3), "lr": ("method.overrides.lr", 3),
          "fisher": ("method.overrides.fisher_type", 2), "mode": ("method.overrides.projection_mode", 3),
          "chunk": ("method.chunk_size", 3)}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_sweep_preset_is_a_multirun_whose_settings_the_harness_accepts(sweep):
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from crispedit_easyedit.bench import harness

    conf = Path(harness.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={sweep}"], return_hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN"
        key, n_values = SWEEPS[sweep]
        params = dict(cfg.hydra.sweeper.params)
        assert list(params) == [key]
        values = OverridesParser.create().parse_overrides([f"{key}={params[key]}"])[0].sweep_iterator()
        values = list(values)
        assert len(values) == n_values
        for value in values:
            job = compose(config_name="config", overrides=[f"{key}={value}" if not isinstance(value, list)
                                                           else f"{key}=[{','.join(map(str, value))}]"])
            resolved = harness.resolve_config(job)
            section, *rest = key.split(".")
            found = resolved[section]
            for part in rest:
                found = found[part]
            assert found == value
        assert not str(cfg.hydra.run.dir).startswith("/") and str(cfg.hydra.run.dir).startswith("outputs/bench/")
        assert str(cfg.hydra.sweep.dir).startswith("outputs/bench/") and cfg.hydra.job.chdir is False


def test_the_tuning_preset_gives_every_method_the_same_records_and_evaluation():
    """sweep=tune: the tuning records (zsre_train.json 0-29, never reported) and the fast evaluation, whatever the
    method; the knob values come from the command line."""
    from hydra import compose, initialize_config_dir

    from crispedit_easyedit.bench import harness

    conf = Path(harness.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for method in ("crispedit", "ft", "easyedit-memit"):
            cfg = compose(config_name="config", overrides=["sweep=tune", f"method={method}"],
                          return_hydra_config=True)
            assert cfg.hydra.mode.name == "MULTIRUN" and cfg.method.name == method
            assert (cfg.dataset.name, cfg.dataset.start, cfg.dataset.count) == ("zsre", 0, 30)
            assert cfg.dataset.path.endswith("/zsre_train.json")
            assert cfg.evaluation.n_probes == 40 and not cfg.evaluation.easyedit_metrics


def test_every_method_file_names_a_registered_method_or_an_easyedit_adapter():
    import yaml

    from crispedit_easyedit.bench import harness
    from crispedit_easyedit.bench.methods import METHODS, load_all

    load_all()
    folder = Path(harness.__file__).parent / "conf" / "method"
    names = {p.stem: yaml.safe_load(p.read_text())["name"] for p in folder.glob("*.yaml")}
    assert all(stem == name for stem, name in names.items())
    assert {n for n in names if not n.startswith("easyedit-")} == {"crispedit", "crispedit-seq", "ft", "ft-seq",
                                                                    "adam-nscl", "lora"} <= set(METHODS)
    assert {n for n in names if n.startswith("easyedit-")} == {
        "easyedit-memit", "easyedit-alphaedit", "easyedit-ultraedit", "easyedit-ft", "easyedit-lora"}


def test_a_missing_method_hparams_file_is_named_before_the_model_loads(tiny_bench, monkeypatch):  # noqa: F811
    from crispedit_easyedit.bench import harness, models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = bench_config(tiny_bench, "crispedit")
    cfg["method"]["hparams"] = "hparams/CrispEdit/no-such-model.yaml"
    with pytest.raises(FileNotFoundError, match="method.hparams 'hparams/CrispEdit/no-such-model.yaml' does not exist"):
        harness.run_one(cfg)
