"""EasyEdit's own baselines in the harness (``crispedit_easyedit.bench.methods.easyedit_main``).

Two kinds of tests:

* without EasyEdit's GitHub main (CI): the module imports, the methods are registered, and a call fails with an
  error that names ``EASYEDIT_PATH``; the patches that need no EasyEdit behave as documented.
* with a checkout configured (``EASYEDIT_PATH`` set and importable in this venv, e.g. the one built by
  ``benchmarks/easyedit_main_env.sh``): each method edits a tiny random Llama end to end.

The tiny model is random, so its attention does not carry a subject's information to later positions: the MEMIT /
AlphaEdit requests end with their subject (the edited key is then the last prompt token), and the z-step gets room
(clamp 20, 60 steps, no weight decay); AlphaEdit's ridge ``L2`` is scaled to the tiny model's key norms (~1e-2), FT
and UltraEdit get step sizes that move a random model. Those are test settings, not baselines.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from crispedit_easyedit.bench.evaluation import teacher_forced_scores
from crispedit_easyedit.bench.methods import METHODS, get_method
from crispedit_easyedit.bench.methods import easyedit_locate, easyedit_patches, easyedit_stats
from crispedit_easyedit.bench.methods.easyedit_locate import EasyEditUnavailable
from tests.tiny_models import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
NAMES = ("easyedit-memit", "easyedit-alphaedit", "easyedit-ultraedit", "easyedit-ft", "easyedit-lora")

PROMPTS = ["The capital of France", "The author of Hamlet", "The river Nile"]
SUBJECTS = ["France", "Hamlet", "Nile"]
TARGETS = ["Berlin", "Charles Dickens", "Germany"]
GROUND = ["Paris", "William Shakespeare", "Egypt"]
REPHRASES = ["The capital city of France", "The writer of Hamlet", "The long river Nile"]


def requests(n: int = 3) -> list[dict[str, Any]]:
    return [{"case_id": i, "prompt": PROMPTS[i], "subject": SUBJECTS[i], "target_new": TARGETS[i],
             "ground_truth": GROUND[i], "rephrase_prompt": REPHRASES[i], "locality": {}, "portability": {}}
            for i in range(n)]


def _main_configured() -> tuple[bool, str]:
    path = os.environ.get("EASYEDIT_PATH")
    if not path:
        return False, "EASYEDIT_PATH is unset (no EasyEdit GitHub main checkout configured)"
    try:
        easyedit_locate.import_easyeditor({})
    except EasyEditUnavailable as err:
        return False, f"EasyEdit GitHub main at EASYEDIT_PATH={path} is not importable in this venv: {err}"
    return True, ""


# ------------------------------------------------------------------------------------------ without EasyEdit --
def test_methods_are_registered_without_easyedit() -> None:
    get_method("easyedit-memit")  # load_all imports easyedit_main whether or not EasyEdit is there
    assert set(NAMES) <= set(METHODS)


def test_call_without_checkout_names_easyedit_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from crispedit_easyedit.easyedit import compat

    monkeypatch.delenv("EASYEDIT_PATH", raising=False)
    monkeypatch.setattr(compat, "easyeditor_location", lambda: None)
    for name in NAMES:
        with pytest.raises(EasyEditUnavailable, match="EASYEDIT_PATH is unset") as info:
            get_method(name)(tiny_llama(), tiny_tokenizer(), requests(1), {"chunk_index": 0})
        assert "benchmarks/easyedit_main_env.sh" in str(info.value)


def test_bad_checkout_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASYEDIT_PATH", str(tmp_path))
    with pytest.raises(EasyEditUnavailable, match=r"EASYEDIT_PATH=.* is not an EasyEdit checkout"):
        get_method("easyedit-ft")(tiny_llama(), tiny_tokenizer(), requests(1), {})
    with pytest.raises(EasyEditUnavailable, match=r"easyedit_path=.* is not an EasyEdit checkout"):
        get_method("easyedit-ft")(tiny_llama(), tiny_tokenizer(), requests(1), {"easyedit_path": str(tmp_path)})


def test_pypi_generation_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crispedit_easyedit.easyedit import compat

    fake = tmp_path / "site" / "easyeditor"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.delenv("EASYEDIT_PATH", raising=False)
    monkeypatch.setattr(compat, "easyeditor_location", lambda: fake)
    with pytest.raises(EasyEditUnavailable, match="'pypi' generation, not EasyEdit's GitHub main"):
        easyedit_locate.import_easyeditor({})


def test_memit_needs_subjects_before_importing_easyedit() -> None:
    reqs = requests(2)
    del reqs[1]["subject"]
    with pytest.raises(ValueError, match=r"needs a 'subject'.*case_id \[1\]"):
        get_method("easyedit-memit")(tiny_llama(), tiny_tokenizer(), reqs, {})


def test_bad_chunk_index_is_named() -> None:
    with pytest.raises(ValueError, match="chunk_index must be a non-negative integer, got -1"):
        get_method("easyedit-ft")(tiny_llama(), tiny_tokenizer(), requests(1), {"chunk_index": -1})


def test_patch_list_is_documented() -> None:
    doc = easyedit_patches.__doc__
    for number, name in enumerate(easyedit_patches.PATCH_NAMES, start=1):
        assert f"{number}. ``{name}``" in doc, name
        assert callable(getattr(easyedit_patches, name, None)), name


def test_padding_rule_mirrors_base_editor() -> None:
    side = easyedit_patches.easyedit_padding_side
    assert side("MEMIT", "llama-smollm2") == "right"
    assert side("AlphaEdit", "qwen2-x") == "right"
    assert side("FT", "llama-smollm2") == "left"
    assert side("LoRA", "gpt2-tiny") == "left"
    assert side("MEMIT", "gpt2-tiny") == "unchanged"


def test_sniff_name_carries_the_family() -> None:
    model = tiny_llama()
    model.config._name_or_path = "/some/where/SmolLM2-135M-Instruct"
    assert easyedit_patches.sniff_name(model) == "llama-SmolLM2-135M-Instruct"
    model.config.model_type = "falcon"
    with pytest.raises(ValueError, match="model_type 'falcon' is not supported.*valid model types"):
        easyedit_patches.sniff_name(model)


def test_tied_lm_head_points_at_the_embeddings() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    tied = LlamaForCausalLM(cfg)
    hp = type("HP", (), {"lm_head_module": "lm_head"})()
    record = easyedit_patches.tied_lm_head(hp, tied)
    assert hp.lm_head_module == "model.embed_tokens" and record.name == "tied_lm_head"
    untied = tiny_llama()
    hp2 = type("HP", (), {"lm_head_module": "lm_head"})()
    assert easyedit_patches.tied_lm_head(hp2, untied) is None and hp2.lm_head_module == "lm_head"


def test_ultraedit_batch_sizes_drop_no_request() -> None:
    hp = type("HP", (), {"batch_size": 100, "batch_size_once": 10})()
    easyedit_patches.ultraedit_batch_sizes(hp, 14)
    assert (hp.batch_size, hp.batch_size_once) == (14, 7)
    easyedit_patches.ultraedit_batch_sizes(hp, 3)
    assert (hp.batch_size, hp.batch_size_once) == (3, 3)


def test_restore_model_flags_puts_everything_back() -> None:
    model = tiny_llama()
    out: list[easyedit_patches.Patch] = []
    with easyedit_patches.restore_model_flags(model, out):
        for p in model.parameters():
            p.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert [p.name for p in out] == ["restore_model_flags"]
    assert "requires_grad" in out[0].detail and ".grad of 1 parameters" in out[0].detail


def test_default_hparams_follow_the_model_folder_name() -> None:
    main = easyedit_main()
    model = tiny_llama()
    model.config._name_or_path = "/cache/models/smollm2-135m-instruct"
    for name, spec in main.METHODS.items():
        path = main.default_hparams_path(spec, model)
        assert main.repo_relative(path) == f"hparams/{spec.hparams_dir}/SmolLM2-135M-Instruct.yaml", name
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match=r"no default hparams for model ''.*config\['hparams'\].*SmolLM2"):
        main.default_hparams_path(main.METHODS["easyedit-ft"], model)


def test_stats_defaults_match_crispedit_smollm2_hparams() -> None:
    crisp = yaml.safe_load((REPO / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml").read_text())
    assert easyedit_stats.DEFAULT_CORPUS == crisp["mom2_dataset"]
    assert easyedit_stats.DEFAULT_SEQ_LEN == crisp["curvature_seq_len"]
    for alg in ("MEMIT", "AlphaEdit"):
        ours = yaml.safe_load((REPO / "hparams" / alg / "SmolLM2-135M-Instruct.yaml").read_text())
        assert ours["mom2_n_samples"] == crisp["mom2_n_samples"] and ours["layers"] == crisp["layers"]
    for alg in ("FT", "LoRA"):
        assert yaml.safe_load((REPO / "hparams" / alg / "SmolLM2-135M-Instruct.yaml").read_text())["layers"] \
            == crisp["layers"]
    ultra = yaml.safe_load((REPO / "hparams" / "UltraEdit" / "SmolLM2-135M-Instruct.yaml").read_text())
    assert sorted({int(p.split(".")[2]) for p in ultra["inner_params"]}) == crisp["layers"]


def test_stats_key_separates_models_and_corpora(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    settings = easyedit_stats.StatsSettings()
    ia = easyedit_stats.stats_identity(a, tok, settings, 8, "float32", 0)
    ib = easyedit_stats.stats_identity(b, tok, settings, 8, "float32", 0)
    assert ia["model_weights_sha256"] != ib["model_weights_sha256"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some other text.\n\nAnd another document.\n")
    local = easyedit_stats.StatsSettings(corpus=str(corpus))
    assert easyedit_stats.stats_identity(a, tok, local, 8, "float32", 0)["corpus"] != ia["corpus"]
    assert easyedit_stats.stats_identity(a, tok, settings, 16, "float32", 0) != ia
    # a later chunk keeps the base model's key even after its weights changed
    with torch.no_grad():
        a.model.layers[1].mlp.down_proj.weight.add_(1.0)
    assert easyedit_stats.stats_identity(a, tok, settings, 8, "float32", 1) == ia
    assert str(Path.home()) not in json.dumps(ia) and str(tmp_path) not in json.dumps(ia)


# --------------------------------------------------------------------------------------- with EasyEdit main --
CONFIGURED, REASON = _main_configured() if os.environ.get("EASYEDIT_PATH") else (False, "EASYEDIT_PATH is unset "
                                                                                         "(no EasyEdit GitHub main "
                                                                                         "checkout configured)")
needs_main = pytest.mark.skipif(not CONFIGURED, reason=REASON)

TINY = {
    "easyedit-memit": {"layers": [1, 2], "v_loss_layer": 3, "lm_head_module": "lm_head", "mom2_n_samples": 8,
                       "clamp_norm_factor": 20, "v_num_grad_steps": 60, "v_weight_decay": 0.0},
    "easyedit-alphaedit": {"layers": [1, 2], "v_loss_layer": 3, "lm_head_module": "lm_head", "mom2_n_samples": 8,
                           "clamp_norm_factor": 20, "v_num_grad_steps": 60, "v_weight_decay": 0.0, "L2": 1e-4},
    "easyedit-ft": {"layers": [1, 2], "lr": 5e-2},
    "easyedit-lora": {"layers": [1, 2]},
    "easyedit-ultraedit": {"inner_params": ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"],
                           "lr": 1e-2},
}
EDITED = {
    "easyedit-memit": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    "easyedit-alphaedit": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    "easyedit-ft": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    "easyedit-lora": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    "easyedit-ultraedit": ["model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"],
}
RECEIPT_KEYS = {"method", "alg_name", "easyedit", "hparams_path", "hparams", "seconds", "n_requests", "chunk_index",
                "sequential", "patches", "statistics", "easyedit_metrics"}
SEQ_LEN = 32


def config_for(name: str, stats_dir: Path, chunk_index: int = 0) -> dict[str, Any]:
    folder = easyedit_main().METHODS[name].hparams_dir
    return {"hparams": f"hparams/{folder}/SmolLM2-135M-Instruct.yaml", "overrides": dict(TINY[name]),
            "stats_dir": str(stats_dir), "corpus_seq_len": SEQ_LEN,
            "chunk_index": chunk_index, "sequential": chunk_index > 0}


def run(name: str, model: torch.nn.Module, stats_dir: Path, chunk_index: int = 0,
        reqs: list[dict[str, Any]] | None = None):
    tok = tiny_tokenizer()
    reqs = reqs or requests()
    pre = teacher_forced_scores(model, tok, reqs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outcome = get_method(name)(model, tok, reqs, config_for(name, stats_dir, chunk_index))
    post = teacher_forced_scores(outcome.model, tok, reqs)
    changed = sorted(n for n, p in outcome.model.named_parameters() if not torch.equal(before[n], p))
    return outcome, pre, post, changed


@needs_main
@pytest.mark.parametrize("name", NAMES)
def test_method_edits_the_given_model(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # EasyEdit writes ./logs/run.log
    model = tiny_llama()
    outcome, pre, post, changed = run(name, model, tmp_path / "stats")
    assert outcome.model is model
    assert changed == EDITED[name]
    receipt = outcome.receipt
    assert set(receipt) == RECEIPT_KEYS
    assert receipt["method"] == name and receipt["n_requests"] == 3 and receipt["chunk_index"] == 0
    assert receipt["hparams_path"] == f"hparams/{easyedit_main().METHODS[name].hparams_dir}/SmolLM2-135M-Instruct.yaml"
    assert receipt["easyedit"]["commit"] and receipt["easyedit"]["source"] == "env"
    for key, value in TINY[name].items():
        assert receipt["hparams"][key] == value, key
    assert receipt["hparams"]["device"] == "cpu"
    assert set(receipt["seconds"]) == {"statistics", "edit", "easyedit_eval"} and receipt["seconds"]["edit"] > 0.0
    names = [p["name"] for p in receipt["patches"]]
    assert set(names) <= set(easyedit_patches.PATCH_NAMES)
    assert {"device_from_model", "name_for_sniffing", "padding_side_as_easyedit"} <= set(names)
    assert post["rewrite_acc"] > pre["rewrite_acc"], (pre["rewrite_acc"], post["rewrite_acc"])
    assert json.dumps(receipt)  # JSON-serialisable
    # the model is handed back usable: eval mode, gradients off as before, no peft wrapper
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")


def easyedit_main():
    return importlib.import_module("crispedit_easyedit.bench.methods.easyedit_main")


@needs_main
@pytest.mark.parametrize("name", ["easyedit-memit", "easyedit-alphaedit"])
def test_statistics_from_our_corpus_once_then_cached(name: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    builds: list[tuple[str, int, int]] = []
    real = easyedit_stats.corpus_windows

    def counting(spec: str, tok: Any, seq_len: int, n: int):
        builds.append((spec, seq_len, n))
        return real(spec, tok, seq_len, n)

    monkeypatch.setattr(easyedit_stats, "corpus_windows", counting)
    model = tiny_llama()
    first, _, _, _ = run(name, model, tmp_path / "stats")
    stats = first.receipt["statistics"]
    assert builds == [("wikipedia-offline", SEQ_LEN, 8)]
    assert stats["samples"] == 8 and stats["tokens"] == 8 * SEQ_LEN and stats["corpus"] == "wikipedia-offline"
    assert stats["layers"] == {"model.layers.1.mlp.down_proj": "computed", "model.layers.2.mlp.down_proj": "computed"}
    folder = tmp_path / "stats" / stats["key"]
    files = sorted(folder.rglob("*.npz"))
    assert len(files) == 2 and all(f.name.endswith("_float32_mom2_8.npz") for f in files)
    assert json.loads((folder / "identity.json").read_text())["windows"] == 8
    # the second moment is the one of our corpus windows at the base weights (EasyEdit: sum of x x^T / tokens)
    from crispedit_easyedit.corpora import corpus_sequences

    ids = corpus_sequences("wikipedia-offline", tiny_tokenizer(), SEQ_LEN, 8)["input_ids"]
    base, feats = tiny_llama(), []
    hook = base.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        base(input_ids=ids)
    hook.remove()
    x = feats[0].reshape(-1, feats[0].shape[-1]).double()
    saved = np.load([f for f in files if "layers.1." in f.name][0])
    assert int(saved["mom2.count"]) == 8 * SEQ_LEN
    moment = torch.from_numpy(saved["mom2.mom2"]).double() / float(saved["mom2.count"])
    torch.testing.assert_close(moment, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-10)
    if name == "easyedit-alphaedit":
        assert stats["projection"]["source"] == "computed" and stats["projection"]["dims"] == 64
        assert len(list(folder.glob("alphaedit_P-*.safetensors"))) == 1
        assert not (tmp_path / "null_space_project.pt").exists()

    # a second run on another copy of the same base model reuses the files: nothing computed, no corpus built
    builds.clear()
    second, _, _, _ = run(name, tiny_llama(), tmp_path / "stats")
    assert second.receipt["statistics"]["key"] == stats["key"]
    assert second.receipt["statistics"]["computed"] == 0 and builds == []
    assert set(second.receipt["statistics"]["layers"].values()) == {"cached"}
    # another model never shares the files
    third, _, _, _ = run(name, tiny_llama(seed=3), tmp_path / "stats")
    assert third.receipt["statistics"]["key"] != stats["key"] and third.receipt["statistics"]["computed"] == 2


@needs_main
def test_alphaedit_cache_c_spans_chunks_and_resets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    alpha = importlib.import_module(easyedit_patches.ALPHAEDIT_MODULE)
    model = tiny_llama()
    reqs = requests()
    run("easyedit-alphaedit", model, tmp_path / "stats", 0, reqs[:2])
    after_first = alpha.cache_c.clone()
    assert float(after_first.abs().sum()) > 0.0
    run("easyedit-alphaedit", model, tmp_path / "stats", 1, reqs[2:])
    after_second = alpha.cache_c.clone()
    # chunk 1 added its keys on top of chunk 0's (kept across calls)
    assert torch.all(after_second.diagonal(dim1=1, dim2=2) >= after_first.diagonal(dim1=1, dim2=2) - 1e-12)
    assert float((after_second - after_first).abs().sum()) > 0.0
    # chunk_index 0 on a fresh model starts over: cache_c holds only that chunk's keys
    # (its context templates are sampled anew, so the keys differ slightly from the first run's)
    other = tiny_llama()
    run("easyedit-alphaedit", other, tmp_path / "stats", 0, reqs[:2])
    added = float((after_second - after_first).norm())
    assert float((alpha.cache_c - after_first).norm()) < 0.1 * added
    # a later chunk on a model whose run did not start here is refused
    with pytest.raises(ValueError, match="cache_c belongs to another run"):
        get_method("easyedit-alphaedit")(tiny_llama(seed=5), tiny_tokenizer(), reqs[:1],
                                         config_for("easyedit-alphaedit", tmp_path / "stats", 1))


@needs_main
def test_lora_sequential_chunks_merge_each_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    reqs = requests()
    first, _, _, _ = run("easyedit-lora", model, tmp_path / "stats", 0, reqs[:2])
    assert "lora_merge" in [p["name"] for p in first.receipt["patches"]]
    second, _, post, changed = run("easyedit-lora", model, tmp_path / "stats", 1, reqs[2:])
    assert second.model is model and changed == EDITED["easyedit-lora"]
    assert not any("lora_" in n for n, _ in model.named_parameters())


@needs_main
def test_unknown_override_names_valid_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"override 'nonsense' is not a field of FTHyperParams; valid fields: \["):
        get_method("easyedit-ft")(tiny_llama(), tiny_tokenizer(), requests(1),
                                  {"hparams": "hparams/FT/SmolLM2-135M-Instruct.yaml", "overrides": {"nonsense": 1}})


logging.getLogger("easyeditor").setLevel(logging.WARNING)
