"""CrispEditHyperParams: validation, EasyEdit-style loading, legacy keys, shipped YAML files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from crispedit_easyedit.hparams import LEGACY_KEYS, CrispEditHyperParams

ROOT = Path(__file__).resolve().parents[1]
HPARAMS_DIR = ROOT / "hparams" / "CrispEdit"
AUTHORS_YAML = Path(__file__).resolve().parent / "fixtures" / "crispedit_authors_llama3-8b.yaml"

BASE: dict[str, Any] = {"model_name": "tiny-llama", "layers": [1, 2], "device": "cpu"}


def make(**overrides: Any) -> CrispEditHyperParams:
    return CrispEditHyperParams.from_dict({**BASE, **overrides})


def test_defaults_match_the_documented_values() -> None:
    hp = make()
    assert hp.alg_name == "CrispEdit"
    assert hp.rewrite_module_tmp == "model.layers.{}.mlp.down_proj.weight"
    assert (hp.num_steps, hp.lr, hp.weight_decay, hp.max_length) == (25, 5e-4, 0.0, 128)
    assert (hp.batch_size, hp.train_batch_size) == (1, 32)  # EasyEdit's edits per call; the paper's minibatch
    assert (hp.curvature_at, hp.edit_stats_weight) == ("base", 1.0)
    assert (hp.energy_threshold, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype) == (
        0.8, "wikipedia-offline", 64, "float32")
    assert (hp.fisher_type, hp.mc_samples, hp.projection_mode) == ("mc", 1, "both")
    assert (hp.curvature_seq_len, hp.curvature_batch_size, hp.exclude_first_tokens) == (256, 8, 0)
    assert (hp.cache_dir, hp.early_stop_loss, hp.seed, hp.chunk_size) == ("~/.cache/crispedit_easyedit", 0.01, 0, None)
    assert hp.edit_kfac_on_full_sequence is True
    # What EasyEdit's BaseEditor/evaluators read, with EasyEdit's defaults.
    assert (hp.fp16, hp.model_parallel, hp.use_chat_template, hp.evaluation_type, hp.api_key) == (
        False, False, False, None, None)
    assert CrispEditHyperParams(model_name="m", layers=[0]).device == 0


def test_every_field_has_help_text() -> None:
    helps = CrispEditHyperParams.field_help()
    assert set(helps) == set(make().to_dict())
    assert all(len(text) > 10 for text in helps.values()), [k for k, v in helps.items() if len(v) <= 10]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("alg_name", "FT", "alg_name must be 'CrispEdit'"),
        ("alg_name", "crispedit", "alg_name must be 'CrispEdit'"),
        ("model_name", "", "model_name must be a non-empty"),
        ("model_name", 3, "model_name must be a model name/path string or a (model, tokenizer) pair"),
        ("model_name", ("model",), "must be a (model, tokenizer) pair"),
        ("device", -1, "device must be a non-negative CUDA index"),
        ("device", "gpu", "device must be a non-negative CUDA index"),
        ("device", "cuda:x", "device must be"),
        ("device", True, "device must be"),
        ("model_parallel", "no", "model_parallel must be true or false"),
        ("layers", [], "layers must be a non-empty list"),
        ("layers", 5, "layers must be a non-empty list"),
        ("layers", [1, -2], "non-negative integers only, got -2"),
        ("layers", [1, 1], "must not repeat an index, got 1 twice"),
        ("layers", [1.5], "non-negative integers only, got 1.5"),
        ("layers", [True], "non-negative integers only, got True"),
        ("rewrite_module_tmp", "model.layers.mlp.down_proj.weight", "containing '{}' exactly once"),
        ("rewrite_module_tmp", "model.layers.{}.{}.weight", "containing '{}' exactly once"),
        ("num_steps", 0, "num_steps must be an integer >= 1, got 0"),
        ("num_steps", 2.5, "num_steps must be an integer >= 1, got 2.5"),
        ("num_steps", True, "num_steps must be an integer >= 1, got True"),
        ("lr", 0, "lr must be a number > 0, got 0"),
        ("lr", -1e-3, "lr must be a number > 0"),
        ("lr", "fast", "lr must be a number > 0, got 'fast'"),
        ("lr", float("nan"), "lr must be a number > 0"),
        ("lr", "inf", "lr must be a number > 0, got inf"),
        ("weight_decay", -0.1, "weight_decay must be a number >= 0, got -0.1"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("train_batch_size", 0, "train_batch_size must be an integer >= 1, got 0"),
        ("curvature_at", "edited", "curvature_at must be one of 'base', 'current'; got 'edited'"),
        ("edit_stats_weight", -1, "edit_stats_weight must be a number >= 0, got -1"),
        ("max_length", 1, "max_length must be an integer >= 2, got 1"),
        ("energy_threshold", 0.0, "energy_threshold must be a number > 0 and <= 1, got 0.0"),
        ("energy_threshold", 1.01, "energy_threshold must be a number > 0 and <= 1, got 1.01"),
        ("mom2_dataset", "", "mom2_dataset must be a non-empty string"),
        ("mom2_dataset", None, "mom2_dataset must be a non-empty string"),
        ("mom2_n_samples", 0, "mom2_n_samples must be an integer >= 1"),
        ("mom2_dtype", "float16", "mom2_dtype must be one of 'float32', 'float64'; got 'float16'"),
        ("fisher_type", "type-2", "fisher_type must be one of 'mc', 'empirical'; got 'type-2'"),
        ("mc_samples", 0, "mc_samples must be an integer >= 1"),
        ("projection_mode", "step", "projection_mode must be one of 'gradient', 'update', 'both', 'eigenbasis', 'none'"),
        ("adam_scaling", "per_row", "adam_scaling must be one of 'elementwise', 'per_matrix'; got 'per_row'"),
        ("gradient_projection_dtype", "fp8", "gradient_projection_dtype must be one of 'basis', 'bfloat16', 'auto'"),
        ("curvature_seq_len", 1, "curvature_seq_len must be an integer >= 2"),
        ("curvature_batch_size", 0, "curvature_batch_size must be an integer >= 1"),
        ("exclude_first_tokens", -1, "exclude_first_tokens must be an integer >= 0"),
        ("exclude_first_tokens", 256, "exclude_first_tokens must be smaller than curvature_seq_len (256)"),
        ("cache_dir", "", "cache_dir must be a non-empty path string or None"),
        ("cache_dir", 5, "cache_dir must be a non-empty path string or None"),
        ("early_stop_loss", -0.5, "early_stop_loss must be a number >= 0"),
        ("seed", "abc", "seed must be an integer, got 'abc'"),
        ("chunk_size", 0, "chunk_size must be None or an integer >= 1, got 0"),
        ("edit_kfac_on_full_sequence", 1, "edit_kfac_on_full_sequence must be true or false, got 1"),
        ("fp16", "false", "fp16 must be true or false"),
        ("use_chat_template", None, "use_chat_template must be true or false"),
        ("evaluation_type", "WILD", "evaluation_type must be one of None, 'LLM-judge', 'generate-text'"),
        ("api_key", 123, "api_key must be a string or None"),
    ],
)
def test_invalid_field_is_rejected_with_a_precise_message(field: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        make(**{field: value})
    assert fragment in str(info.value)
    assert field in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="energy_threshold"):
        CrispEditHyperParams(model_name="m", layers=[0], energy_threshold=2.0)


def test_validate_rechecks_after_assignment() -> None:
    hp = make()
    hp.batch_size = 1  # what EasyEdit's edit() does
    hp.validate()
    hp.projection_mode = "sideways"
    with pytest.raises(ValueError, match="projection_mode"):
        hp.validate()


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ValueError) as info:
        make(energy_treshold=0.5)
    message = str(info.value)
    assert "'energy_treshold'" in message and "did you mean 'energy_threshold'?" in message
    with pytest.raises(ValueError) as info:
        make(zzzz=1)
    assert "'zzzz'" in str(info.value) and "valid keys:" in str(info.value) and "mom2_n_samples" in str(info.value)


def test_missing_required_keys_are_named() -> None:
    with pytest.raises(ValueError, match="miss required key.*layers"):
        CrispEditHyperParams.from_dict({"model_name": "m"})
    with pytest.raises(ValueError, match="miss required key.*model_name"):
        CrispEditHyperParams.from_dict({"layers": [0]})


def test_coercions() -> None:
    hp = make(lr="5e-4", weight_decay=0, mom2_n_samples="1e3", num_steps=10.0, device="1", layers=(3, 4),
              energy_threshold=1, seed="7")
    assert hp.lr == pytest.approx(5e-4) and isinstance(hp.lr, float)
    assert hp.weight_decay == 0.0 and isinstance(hp.weight_decay, float)
    assert hp.mom2_n_samples == 1000 and isinstance(hp.mom2_n_samples, int)
    assert hp.num_steps == 10 and isinstance(hp.num_steps, int)
    assert hp.device == 1 and hp.layers == [3, 4] and hp.energy_threshold == 1.0 and hp.seed == 7


def test_scientific_notation_strings_from_yaml(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 5e-4 and 1e4 as strings; EasyEdit converts them, so must we.
    text = ("alg_name: CrispEdit\nmodel_name: '1234'\nlayers: [0]\nlr: 5e-4\nearly_stop_loss: 1e-3\n"
            "mom2_n_samples: 1e4\n")
    assert isinstance(yaml.safe_load(text)["lr"], str)
    (tmp_path / "sci.yaml").write_text(text)
    hp = CrispEditHyperParams.from_hparams(tmp_path / "sci.yaml")
    assert hp.lr == pytest.approx(5e-4) and hp.early_stop_loss == pytest.approx(1e-3)
    assert hp.mom2_n_samples == 10000
    assert hp.model_name == "1234"  # only numeric fields are converted


def test_yaml_suffix_is_appended_and_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**BASE, "num_steps": 3}))
    assert CrispEditHyperParams.from_hparams(str(tmp_path / "tiny")).num_steps == 3
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        CrispEditHyperParams.from_hparams(tmp_path / "nothere")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        CrispEditHyperParams.from_hparams(tmp_path / "list.yaml")


def test_from_json(tmp_path: Path) -> None:
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({**BASE, "projection_mode": "gradient"}))
    assert CrispEditHyperParams.from_json(path).projection_mode == "gradient"
    assert CrispEditHyperParams.from_hparams(path).projection_mode == "gradient"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CrispEditHyperParams.from_json(tmp_path / "missing.json")


def test_round_trip_to_dict_from_dict(tmp_path: Path) -> None:
    hp = make(chunk_size=100, projection_mode="gradient", energy_threshold=0.95, cache_dir=None, api_key="secret",
              mom2_dtype="float64", fisher_type="empirical", exclude_first_tokens=1)
    again = CrispEditHyperParams.from_dict(hp.to_dict())
    assert again == hp
    # ... and through a YAML file.
    (tmp_path / "rt.yaml").write_text(yaml.safe_dump(hp.to_dict()))
    assert CrispEditHyperParams.from_hparams(tmp_path / "rt.yaml") == hp
    assert hp.to_dict(redact_secrets=True)["api_key"] == "***"
    assert "secret" not in repr(hp)


def test_authors_yaml_loads_with_legacy_keys_ignored(caplog: pytest.LogCaptureFixture) -> None:
    raw = yaml.safe_load(AUTHORS_YAML.read_text())
    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.hparams"):
        hp = CrispEditHyperParams.from_hparams(AUTHORS_YAML)
    assert hp.layers == [19, 20, 21, 22, 23] and hp.energy_threshold == 0.99 and hp.max_length == 40
    assert hp.lr == pytest.approx(5e-4) and hp.mom2_n_samples == 1000 and hp.mom2_dataset == "wikipedia"
    ignored = {key for key in raw if key in LEGACY_KEYS}
    assert ignored == {"kl_factor", "norm_constraint", "objective_optimization", "layer_module_tmp",
                       "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module"}
    logged = caplog.text
    assert all(f"ignoring legacy hparams key {key}" in logged for key in ignored)
    assert "WARNING" not in [r.levelname for r in caplog.records if "legacy" in r.getMessage()]


def test_authors_non_neutral_legacy_value_warns(caplog: pytest.LogCaptureFixture) -> None:
    # Their mistral-7b.yaml sets norm_constraint: 5e-5, which this implementation does not apply.
    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.hparams"):
        make(norm_constraint="5e-5", kl_factor=0)
    levels = {r.getMessage().split("=")[0].split()[-1]: r.levelname for r in caplog.records}
    assert levels == {"norm_constraint": "WARNING", "kl_factor": "INFO"}


def test_authors_alg_name_spelling_is_normalised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.hparams"):
        hp = make(alg_name="CRISPEDIT")
    assert hp.alg_name == "CrispEdit"
    assert "normalised to 'CrispEdit'" in caplog.text


def test_torch_device_and_factor_dtype(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make(device="cpu").torch_device() == torch.device("cpu")
    assert make(mom2_dtype="float64").factor_dtype is torch.float64
    assert make().factor_dtype is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.hparams"):
        assert make(device=0).torch_device() == torch.device("cpu")
    assert "CUDA is not available" in caplog.text
    with pytest.raises(ValueError, match="device='cuda:1' but CUDA is not available"):
        make(device="cuda:1").torch_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert make(device=1).torch_device() == torch.device("cuda:1")
    assert make(device="cuda").torch_device() == torch.device("cuda")
    with pytest.raises(ValueError, match="device=3 but only 2 CUDA device"):
        make(device=3).torch_device()


def test_model_pair_is_accepted_as_model_name() -> None:
    model, tok = torch.nn.Linear(2, 2), object()
    hp = make(model_name=(model, tok))
    assert hp.model_name[0] is model
    assert hp.edit_parameter_names() == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


SHIPPED = sorted(HPARAMS_DIR.glob("*.yaml"))


def test_shipped_hparams_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"SmolLM2-135M-Instruct.yaml", "qwen2.5-0.5b-instruct.yaml", "qwen2.5-1.5b-instruct.yaml",
            "qwen2.5-7b-instruct.yaml", "llama3-8b-instruct.yaml", "mistral-7b-instruct.yaml",
            "gpt2-xl.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_yaml_loads(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 20  # says where the values come from
    raw = yaml.safe_load(path.read_text())
    assert not set(raw) & set(LEGACY_KEYS)  # our files use our keys only
    hp = CrispEditHyperParams.from_hparams(path)
    assert hp.alg_name == "CrispEdit" and hp.layers
    if "gpt2" in path.stem:
        assert hp.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj.weight"
    else:
        assert hp.rewrite_module_tmp == "model.layers.{}.mlp.down_proj.weight"


def test_paper_values_in_shipped_yaml() -> None:
    smol = CrispEditHyperParams.from_hparams(HPARAMS_DIR / "SmolLM2-135M-Instruct")
    assert (smol.model_name, smol.layers, smol.energy_threshold, smol.lr, smol.num_steps, smol.train_batch_size,
            smol.mom2_n_samples, smol.curvature_seq_len, smol.device) == (
        "smollm2-135m-instruct-offline", [14, 15, 16, 17, 18], 0.8, 5e-4, 25, 16, 64, 256, "cpu")
    llama = CrispEditHyperParams.from_hparams(HPARAMS_DIR / "llama3-8b-instruct")
    assert (llama.layers, llama.mom2_n_samples, llama.energy_threshold, llama.train_batch_size, llama.lr,
            llama.num_steps, llama.early_stop_loss) == ([19, 20, 21, 22, 23], 10000, 0.7, 32, 5e-4, 25, 0.01)
    qwen = CrispEditHyperParams.from_hparams(HPARAMS_DIR / "qwen2.5-1.5b-instruct")
    assert (qwen.layers, qwen.mom2_n_samples, qwen.energy_threshold) == ([4, 5, 6], 1000, 0.7)
