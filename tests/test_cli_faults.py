"""Bad input and faults on the command line (issue 10), table-driven: each case ends with one ``crispedit:`` line
naming the input, exit code 2 (bad input) or 1 (a fault inside the job), before the long work, and leaves no
output folder, cache file or temporary behind."""

from __future__ import annotations

import re

import pytest
import torch

from crispedit_easyedit import cli
from crispedit_easyedit.curvature import model_fingerprint
from crispedit_easyedit.delta import save_changed_tensors
from tests.test_cli import base_args, needs_data, setup  # noqa: F401 - setup is a fixture
from tests.tiny_models import SHARED_DATA, tiny_llama, tiny_tokenizer

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


def _file(tmp, name, content: bytes | str = "x"):
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _model_without(tmp, model_dir, pattern):
    import shutil

    folder = tmp / f"model-without-{pattern.strip('*.')}"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(pattern))
    return str(folder)


def _hparams_variant(tmp, hparams, name, transform):
    path = tmp / name
    path.write_bytes(transform(hparams.read_text()))
    return str(path)


def _records_file(tmp, name, transform):
    text = (SHARED_DATA / "zsre_train.json").read_text()
    path = tmp / name
    path.write_bytes(transform(text))
    return str(path)


def _delta(tmp, model_dir, base_seed=0, dtype=torch.float32):
    """A changed-tensors file made on the tiny Llama with ``base_seed`` (the CLI's base model has seed 0)."""
    base = tiny_llama(seed=base_seed).to(dtype)
    fingerprint = model_fingerprint(base, NAMES)
    with torch.no_grad():
        for name in NAMES:
            dict(base.named_parameters())[name].add_(0.01)
    return str(save_changed_tensors(base, NAMES, tmp / f"delta-{base_seed}-{dtype}" / "changed_tensors.safetensors",
                                    base_fingerprint=fingerprint))


# (id, command, extra arguments built from (tmp, model_dir, hparams), exit code, message regex)
CASES = [
    ("output dir is a file", "edit", lambda t, m, h: ["--output-dir", _file(t, "plain")], 2,
     r"--output-dir '.*plain' cannot be a folder: '.*plain' is a file"),
    ("output dir under a file", "edit", lambda t, m, h: ["--output-dir", _file(t, "plain2") + "/sub"], 2,
     r"cannot be a folder: '.*plain2' is a file"),
    ("model folder missing", "edit", lambda t, m, h: ["--model", str(t / "nope")], 2,
     r"model folder '.*nope' does not exist"),
    ("model is a plain file", "edit", lambda t, m, h: ["--model", _file(t, "weights.bin")], 2,
     r"--model '.*weights.bin' is a file; give a model folder"),
    ("model without tokenizer files", "edit", lambda t, m, h: ["--model", _model_without(t, m, "tokenizer*")], 2,
     r"has no tokenizer files \(one of tokenizer.json"),
    ("model without config", "edit", lambda t, m, h: ["--model", _model_without(t, m, "config.json")], 2,
     r"has no config.json"),
    ("data path is a folder", "edit", lambda t, m, h: ["--data-path", str(t)], 2,
     r"Benchmark file '.*' is a folder; give a .json or .jsonl records file"),
    ("data file truncated", "edit",
     lambda t, m, h: ["--data-path", _records_file(t, "cut.json", lambda s: s[:5000].encode())], 2,
     r"cut.json is not valid UTF-8 JSON \(truncated or damaged\?\)"),
    ("data file missing", "edit", lambda t, m, h: ["--data-path", str(t / "absent.json")], 2,
     r"absent.json' does not exist"),
    ("hparams is a folder", "edit", lambda t, m, h: ["--hparams", str(t)], 2, r"--hparams '.*' is a folder"),
    ("hparams not UTF-8", "edit",
     lambda t, m, h: ["--hparams", _hparams_variant(t, h, "latin1.yaml", lambda s: s.encode() + b"# caf\xe9\n")], 2,
     r"latin1.yaml' is not UTF-8 text"),
    ("hparams repeats a key", "edit",
     lambda t, m, h: ["--hparams", _hparams_variant(t, h, "dup.yaml", lambda s: (s + "lr: 1.0\n").encode())], 2,
     r"duplicate key 'lr' \(first at line \d+\)"),
    ("alias gamma", "edit", lambda t, m, h: ["--set", "gamma=0.9"], 2,
     r"unknown CrispEdit hparams key 'gamma': did you mean 'energy_threshold'\?"),
    ("misspelt alias gama", "edit", lambda t, m, h: ["--set", "gama=0.9"], 2, r"did you mean 'energy_threshold'\?"),
    ("alias n", "edit", lambda t, m, h: ["--set", "n=100"], 2, r"did you mean 'mom2_n_samples'\?"),
    ("alias lr_rate", "edit", lambda t, m, h: ["--set", "lr_rate=0.1"], 2, r"did you mean 'lr'\?"),
    ("nonsense key", "edit", lambda t, m, h: ["--set", "zzqx=1"], 2, r"'zzqx': valid keys: alg_name"),
    ("curvature_seq_len beyond positions", "edit", lambda t, m, h: ["--set", "curvature_seq_len=300"], 2,
     r"curvature_seq_len is 300, but the model has only 256 positions"),
    ("max_length beyond positions", "edit", lambda t, m, h: ["--set", "max_length=400"], 2,
     r"max_length is 400, but the model has only 256 positions"),
    ("heldout-seq-len beyond positions", "edit", lambda t, m, h: ["--heldout-seq-len", "300"], 2,
     r"--heldout-seq-len is 300, but the model has only 256 positions"),
    ("lr nan", "edit", lambda t, m, h: ["--set", "lr=.nan"], 2, r"lr must be a number > 0"),
    ("batch_size 0", "edit", lambda t, m, h: ["--set", "batch_size=0"], 2, r"batch_size must be an integer >= 1"),
    ("changed tensors missing", "eval", lambda t, m, h: ["--changed-tensors", str(t / "none.safetensors")], 2,
     r"no changed-tensors file at .*none.safetensors"),
    ("changed tensors truncated", "eval",
     lambda t, m, h: ["--changed-tensors", _file(t, "cut.safetensors", open(_delta(t, m), "rb").read()[:300])], 2,
     r"changed-tensors file .*cut.safetensors cannot be read"),
    ("changed tensors of another base", "eval", lambda t, m, h: ["--changed-tensors", _delta(t, m, base_seed=1)], 2,
     r"the model's weights fingerprint is .*, but the edit was made on a base with fingerprint"),
    ("changed tensors in another dtype", "eval",
     lambda t, m, h: ["--changed-tensors", _delta(t, m), "--dtype", "bfloat16"], 2,
     r"is torch.float32 in the file but torch.bfloat16 in the model"),
    ("changed tensors not ours", "eval",
     lambda t, m, h: ["--changed-tensors", str(m / "model.safetensors")], 2,
     r"without crispedit_easyedit metadata .*: not a changed-tensors file"),
]


@needs_data
@pytest.mark.parametrize("command,make,code,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_before_the_work(setup, monkeypatch, capsys, command, make, code, message):
    tmp_path, model_dir, hparams = setup
    import crispedit_easyedit.job as job
    import crispedit_easyedit.state as state

    started = []
    monkeypatch.setattr(state, "_collect_capability", lambda *a, **k: started.append("collection"))
    monkeypatch.setattr(job, "measure", lambda *a, **k: started.append("evaluation"))
    out = tmp_path / "out"
    args = base_args(model_dir, hparams, out)
    args[0] = command
    extra = make(tmp_path, model_dir, hparams)
    if "--output-dir" in extra:  # replace the default one
        index = args.index("--output-dir")
        del args[index : index + 2]
    assert cli.main([*args, *extra]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("crispedit: error:"), err
    assert re.search(message, err[-1]), err[-1]
    assert started == []  # no collection and no evaluation began
    assert not out.exists()  # nothing written
    assert not (tmp_path / "kfac").exists()


@needs_data
def test_nan_weights_fail_the_cache_command_and_cache_nothing(setup, capsys):
    tmp_path, model_dir, hparams = setup
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tiny_tokenizer().save_pretrained(broken)
    code = cli.main(["cache", "--hparams", str(hparams), "--model", str(broken), "--set", "fisher_type=empirical",
                     "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "crispedit: cache failed: CurvatureError: K-FAC factor" in err and "non-finite entries" in err
    assert "curvature ready" not in capsys.readouterr().out
    assert not (tmp_path / "kfac").exists() or not list((tmp_path / "kfac").iterdir())


@needs_data
def test_read_only_cache_dir_is_an_argument_error_before_the_collection(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    import crispedit_easyedit.checks as checks
    import crispedit_easyedit.state as state

    started = []
    monkeypatch.setattr(state, "_collect_capability", lambda *a, **k: started.append(1))
    real = checks.ensure_writable_dir

    def read_only_cache(path, what):
        if what == "cache_dir":
            raise checks.NotWritableError(f"cache_dir {str(path)!r} is not writable (PermissionError)")
        return real(path, what)

    monkeypatch.setattr(state, "ensure_writable_dir", read_only_cache)
    assert cli.main(["cache", "--hparams", str(hparams), "--model", str(model_dir), "--quiet"]) == 2
    assert "crispedit: error: cache_dir" in capsys.readouterr().err and started == []
    out = tmp_path / "out"
    assert cli.main(base_args(model_dir, hparams, out)) == 2
    assert "crispedit: error: cache_dir" in capsys.readouterr().err and started == [] and not out.exists()


@needs_data
def test_the_saved_edit_survives_a_failure_after_the_edit(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    import crispedit_easyedit.job as job

    real = job.measure

    def fail_after(*args, label="", **kwargs):
        if label == "after":
            raise RuntimeError("evaluation crashed")
        return real(*args, label=label, **kwargs)

    monkeypatch.setattr(job, "measure", fail_after)
    out = tmp_path / "out"
    assert cli.main(base_args(model_dir, hparams, out, "--save", "delta")) == 1
    assert "crispedit: edit failed: RuntimeError: evaluation crashed" in capsys.readouterr().err
    assert (out / "changed_tensors.safetensors").stat().st_size > 0
    from crispedit_easyedit.delta import read_changed_tensors

    tensors, meta = read_changed_tensors(out / "changed_tensors.safetensors")
    assert sorted(tensors) == NAMES and len(meta["base_model"]["weights_sha256"]) == 64


@needs_data
def test_one_model_spelt_three_ways_gives_one_cache(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    monkeypatch.chdir(tmp_path)
    outputs = []
    for spelling in ("model", "./model", "model/"):
        assert cli.main(["cache", "--hparams", str(hparams), "--model", spelling, "--quiet"]) == 0
        outputs.append(capsys.readouterr().out)
    assert "collected" in outputs[0] and all("(disk cache; eigenbases disk cache)" in o for o in outputs[1:])
    assert len(list((tmp_path / "kfac").glob("kfac-*.safetensors"))) == 1

