"""The CLI end to end on a tiny Llama saved to a folder: report, JSON, plot, changed tensors, error paths."""

import json

import pytest
import torch

from crispedit_easyedit.bench import cli, job
from crispedit_easyedit.delta import apply_changed_tensors
from tests.tiny_models import SHARED_DATA, tiny_llama, tiny_tokenizer, training_text

needs_data = pytest.mark.skipif(not (SHARED_DATA / "zsre_train.json").exists(), reason="needs ../shared/data")

HPARAMS = """alg_name: CrispEdit
model_name: tiny-llama
device: cpu
layers: [1, 2]
rewrite_module_tmp: "model.layers.{{}}.mlp.down_proj.weight"
num_steps: 30
lr: 1e-2
train_batch_size: 4
max_length: 48
energy_threshold: 0.5
mom2_dataset: "{corpus}"
mom2_n_samples: 8
curvature_seq_len: 32
curvature_batch_size: 4
cache_dir: "{cache}"
"""


@pytest.fixture
def setup(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(training_text()))
    hparams = tmp_path / "tiny.yaml"
    hparams.write_text(HPARAMS.format(corpus=corpus, cache=tmp_path / "kfac"))
    return tmp_path, model_dir, hparams


def base_args(model_dir, hparams, out, *extra):
    return ["edit", "--model", str(model_dir), "--hparams", str(hparams), "--data-path",
            str(SHARED_DATA / "zsre_train.json"), "--count", "3", "--output-dir", str(out), "--n-probes", "4",
            "--heldout-sequences", "2", "--heldout-seq-len", "32", "--quiet", "--no-easyedit-metrics", *extra]


@needs_data
def test_edit_writes_report_json_plot_and_exact_changed_tensors(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    edited = {}
    real_apply = job.apply_crispedit
    monkeypatch.setattr(job, "apply_crispedit",
                        lambda model, *a, **k: edited.setdefault("model", model) and real_apply(model, *a, **k))
    out = tmp_path / "out"
    assert cli.main(base_args(model_dir, hparams, out, "--save", "delta")) == 0
    printed = capsys.readouterr().out
    assert "| edit (teacher-forced) | reliability (rewrite token acc.) |" in printed
    assert "held-out Wikipedia perplexity" in printed and "Factbook probe accuracy" in printed
    # a before value true by definition shows as "-", not as a constant, and the probes are counted
    kl_line = next(line for line in printed.splitlines() if "next-token KL(before || after)" in line)
    cells = [c.strip() for c in kl_line.strip().strip("|").split("|")]
    assert cells[-3] == "-" and cells[-1] == "-" and cells[-2] not in ("-", "0.0000")  # before, change; after
    assert "Factbook probes: " in printed and "questions that contain their own answer dropped" in printed
    for name in ("report.md", "result.json", "energy_spectrum.png", "changed_tensors.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "energy_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "result.json").read_text())
    assert result["requests"]["n_edits"] == 3
    assert result["config"]["hparams"]["layers"] == [1, 2]
    assert result["environment"]["versions"]["torch"] == torch.__version__
    assert result["before"]["teacher_forced"]["reliability"] < result["after"]["teacher_forced"]["reliability"]
    assert result["after"]["capability"]["heldout_kl"] > 0
    kl_row = next(r for r in result["rows"] if r["metric"].startswith("held-out next-token KL"))
    assert kl_row["before"] is None and kl_row["change"] is None and kl_row["after"] > 0
    assert result["factbook_probes"]["asked"] == 4  # --n-probes 4
    assert result["factbook_probes"]["pool"] > 4 and result["factbook_probes"]["dropped_leaking"] >= 4
    assert set(result["seconds"]) >= {"load model", "edit", "curvature (cache or collect)"}
    # the changed tensors applied to a fresh base model reproduce the edited weights bit-exactly
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_changed_tensors(fresh, out / "changed_tensors.safetensors")
    for (name, p), (_, q) in zip(fresh.named_parameters(), edited["model"].named_parameters()):
        assert torch.equal(p, q), name
    # the eval subcommand applies them onto the base and reports the same edit success
    out2 = tmp_path / "eval"
    args = base_args(model_dir, hparams, out2, "--changed-tensors", str(out / "changed_tensors.safetensors"))
    args[0] = "eval"
    assert cli.main(args) == 0
    evaluated = json.loads((out2 / "result.json").read_text())
    assert evaluated["after"]["teacher_forced"]["reliability"] == result["after"]["teacher_forced"]["reliability"]


@needs_data
@pytest.mark.parametrize("extra,message", [
    (["--dataset", "squad"], "unknown dataset 'squad'"),
    (["--start", "5000"], "start"),
    (["--set", "layers=[9]"], "model.layers.9.mlp.down_proj.weight"),
    (["--set", "energy_threshold=1.5"], "energy_threshold"),
    (["--set", "gamma"], "KEY=VALUE"),
])
def test_bad_arguments_end_with_one_line_and_exit_2(setup, capsys, extra, message):
    tmp_path, model_dir, hparams = setup
    assert cli.main(base_args(model_dir, hparams, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("crispedit: error:") and message in err[-1]


def test_unreadable_hparams_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [1,\nfoo")
    assert cli.main(["cache", "--hparams", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["cache", "--hparams", str(tmp_path / "missing.yaml")]) == 2


def test_the_hparams_file_names_the_model_and_model_overrides_it(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    named = tmp_path / "named.yaml"
    named.write_text(hparams.read_text().replace("model_name: tiny-llama", f'model_name: "{model_dir}"'))
    loaded = []
    import crispedit_easyedit.bench.models as models

    real_load = models.load_model_and_tokenizer
    monkeypatch.setattr(models, "load_model_and_tokenizer",
                        lambda name, **k: loaded.append(name) or real_load(name, **k))
    assert cli.main(["cache", "--hparams", str(named), "--quiet"]) == 0
    assert "curvature ready (collected" in capsys.readouterr().out
    assert cli.main(["cache", "--hparams", str(hparams), "--model", str(model_dir), "--quiet"]) == 0
    assert "curvature ready (disk cache; eigenbases disk cache)" in capsys.readouterr().out
    assert loaded == [str(model_dir), str(model_dir)]
    assert cli.main(["cache", "--hparams", str(hparams), "--quiet"]) == 2  # model_name tiny-llama: no such model
    assert capsys.readouterr().err.startswith("crispedit: error:")


def test_a_failure_inside_the_job_exits_1_with_its_message(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    import crispedit_easyedit.state as state

    def mismatch(*args, **kwargs):
        raise ValueError("no token positions were counted: every batch was empty or fully masked")

    monkeypatch.setattr(state, "capability_curvature", mismatch)
    assert cli.main(["cache", "--hparams", str(hparams), "--model", str(model_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "crispedit: cache failed: ValueError: no token positions were counted" in err
    assert "Traceback" not in err and "-v" in err
    assert cli.main(["-v", "cache", "--hparams", str(hparams), "--model", str(model_dir), "--quiet"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_portable_path_is_relative_also_through_a_symlinked_sibling(tmp_path, monkeypatch):
    """Result files name ../shared/... relative to the working directory, also when ../shared is a symlink to a
    folder elsewhere (as on machines that link the shared data in), and ~ for the home folder."""
    real = tmp_path / "elsewhere" / "shared"
    (real / "data").mkdir(parents=True)
    (real / "data" / "zsre.json").write_text("[]")
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    (tmp_path / "work" / "shared").symlink_to(real)
    monkeypatch.chdir(repo)
    assert job.portable_path(tmp_path / "work" / "shared" / "data" / "zsre.json") == "../shared/data/zsre.json"
    assert job.portable_path(repo / "out" / "x.json") == "out/x.json"
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert job.portable_path(tmp_path / "elsewhere" / "shared" / "data" / "zsre.json") == "~/shared/data/zsre.json"
    outside = "/definitely/not/here.json"
    assert job.portable_path(outside) == outside
