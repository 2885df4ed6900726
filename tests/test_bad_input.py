"""Every bad input of issue 10 in one table (CLI and Python API), each row asserting the one-line message that
names the input, the value and what is allowed; exit code 2 from the CLI or the named exception from the API; and
that nothing was written or changed: no output folder, no cache file, no temporary, the model folder's files and the
in-memory weights bit-identical. Faults inside a running job (signals, exceptions per phase) are in
``tests/test_fault_injection.py``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from crispedit_easyedit.bench import cli
from crispedit_easyedit.checks import CurvatureError, NotWritableError
from crispedit_easyedit.curvature import FactorSet, KFACFactors, model_fingerprint
from crispedit_easyedit.delta import apply_changed_tensors, save_changed_tensors
from crispedit_easyedit.editing import apply_crispedit
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.optim import ProjectedAdam
from crispedit_easyedit.projector import Eigenbasis, stable_eigh
from crispedit_easyedit.state import capability_curvature
from tests.test_cli import base_args, needs_data, setup  # noqa: F401 - setup is a fixture
from tests.test_state import make_hparams
from tests.tiny_models import SHARED_DATA, tiny_gpt2, tiny_llama, tiny_tokenizer, training_text

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


def spd(n: int, seed: int) -> torch.Tensor:
    """(n, n) symmetric positive definite matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g)
    return x @ x.T / (3 * n)


def factor_set(model, scale_a: float = 1.0, names=NAMES) -> FactorSet:
    """Valid (or, with ``scale_a`` < 0, sign-flipped) factors for ``names``: A (d_in, d_in), S (d_out, d_out)."""
    params = dict(model.named_parameters())
    out = {}
    for i, n in enumerate(names):
        d_out, d_in = params[n].shape
        out[n] = KFACFactors(scale_a * spd(d_in, i), spd(d_out, 10 + i), 100)
    return FactorSet(out, {})


@dataclass
class Api:
    """What an API row may use: a tiny Llama (replaceable; its bits are compared after the call), a corpus and a
    cache folder that must stay empty."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    model: torch.nn.Module = field(default_factory=tiny_llama)
    tok: object = field(default_factory=tiny_tokenizer)

    @property
    def cache(self) -> Path:
        return self.tmp / "kfac"

    def hp(self, **overrides) -> CrispEditHyperParams:
        corpus = self.tmp / "corpus.txt"
        if not corpus.exists():
            corpus.write_text("\n\n".join(training_text()))
        return make_hparams(str(corpus), cache_dir=str(self.cache), **overrides)

    def edit(self, requests, hp=None, **kwargs):
        return lambda: apply_crispedit(self.model, self.tok, requests, hp or self.hp(), progress=False, **kwargs)


def _set(hp, **fields):
    for key, value in fields.items():
        setattr(hp, key, value)
    return hp


def _nan_weight(a: Api) -> Api:
    with torch.no_grad():
        a.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return a


def _saved_factors(a: Api, damage) -> Path:
    factors = factor_set(a.model)
    damage(factors[NAMES[0]].S)
    return factors.save(a.tmp / "given" / "factors.safetensors")


def _read_only(a: Api, what: str):
    import crispedit_easyedit.state as state

    def refuse(path, name):
        raise NotWritableError(f"{name} {str(path)!r} is not writable (PermissionError: Permission denied)")

    a.monkeypatch.setattr(state, "ensure_writable_dir", refuse)
    a.monkeypatch.setattr(state, "_collect_capability", lambda *args, **kw: pytest.fail("collection started"))
    return a


def _hparams_file(a: Api, name: str, content: bytes | None) -> Path:
    path = a.tmp / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def _nan_factors(a: Api):
    factors = factor_set(a.model)
    factors[NAMES[1]].A[0, 0] = float("nan")
    return a.edit(FACT, factors=factors)


def _nan_spd(n: int) -> torch.Tensor:
    m = spd(n, 0)
    m[2, 3] = m[3, 2] = float("nan")
    return m


def _apply(a: Api, path):
    return lambda: apply_changed_tensors(a.model, path)


def _curvature(a: Api, **overrides):
    hp = a.hp(**overrides)
    return lambda: capability_curvature(a.model, a.tok, hp, progress=False)


def _applied(a: Api) -> str:
    path = _delta(a.tmp, None)
    apply_changed_tensors(a.model, path)
    return path


def _cut(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


HP_TEXT = "alg_name: CrispEdit\nmodel_name: m\nlayers: [1]\nlr: 1e-3\n"
FACT = [{"prompt": "The capital of France is", "target_new": "Rome"}]

# CLI rows: (id, command, extra arguments from (tmp, model folder, hparams file), exit code, message regex)
# API rows: (id, "api", callable from an Api, the exception type, message regex)
CASES = [
    # ---- the command line: folders, model, records, hparams, lengths, changed tensors ----
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
    ("record start beyond the file", "edit", lambda t, m, h: ["--start", "100000000"], 2,
     r"start=100000000 is out of range for .* with \d+ records"),
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
    ("energy_threshold above 1", "edit", lambda t, m, h: ["--set", "energy_threshold=1.5"], 2,
     r"energy_threshold .*1\.5"),
    ("layer the model lacks", "edit", lambda t, m, h: ["--set", "layers=[9]"], 2, r"model.layers.9.mlp.down_proj"),
    ("curvature_seq_len beyond positions", "edit", lambda t, m, h: ["--set", "curvature_seq_len=300"], 2,
     r"curvature_seq_len is 300, but the model has only 256 positions"),
    ("max_length beyond positions", "edit", lambda t, m, h: ["--set", "max_length=400"], 2,
     r"max_length is 400, but the model has only 256 positions"),
    ("heldout-seq-len beyond positions", "edit", lambda t, m, h: ["--heldout-seq-len", "300"], 2,
     r"--heldout-seq-len is 300, but the model has only 256 positions"),
    ("lr nan", "edit", lambda t, m, h: ["--set", "lr=.nan"], 2, r"lr must be a number > 0"),
    ("batch_size 0", "edit", lambda t, m, h: ["--set", "batch_size=0"], 2, r"batch_size must be an integer >= 1"),
    ("read-only cache_dir", "edit", "read-only cache", 2, r"cache_dir '.*kfac' is not writable"),
    ("read-only cache_dir (cache command)", "cache", "read-only cache", 2, r"cache_dir '.*kfac' is not writable"),
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
    # ---- the Python API: requests ----
    ("prompt None", "api", lambda a: a.edit([{"prompt": None, "target_new": "Rome"}]), ValueError,
     r"request 0: prompt must be a string, got NoneType None"),
    ("prompt empty", "api", lambda a: a.edit([{"prompt": "", "target_new": "Rome"}]), ValueError,
     r"request 0: prompt is empty"),
    ("prompt blank", "api", lambda a: a.edit([{"prompt": "   ", "target_new": "Rome"}]), ValueError,
     r"request 0: prompt is empty"),
    ("target_new an int", "api", lambda a: a.edit(FACT + [{"prompt": "x is", "target_new": 5}]), ValueError,
     r"request 1: target_new must be a string, got int 5"),
    ("target_new empty", "api", lambda a: a.edit([{"prompt": "x is", "target_new": ""}]), ValueError,
     r"request 0: target_new is empty"),
    ("a string in place of a request", "api", lambda a: a.edit(["The capital of France is"]), ValueError,
     r"request 0 must be a dict with 'prompt' and 'target_new', got a str"),
    ("requests a string", "api", lambda a: a.edit("The capital of France is"), ValueError,
     r"requests must be a list of request dicts"),
    ("requests a single dict", "api", lambda a: a.edit({"prompt": "a", "target_new": "b"}), ValueError,
     r"requests must be a list of request dicts"),
    ("no target_new", "api", lambda a: a.edit([{"prompt": "The capital is", "ground_truth": "Paris"}]), ValueError,
     r"request 0 has no 'target_new'"),
    ("no requests", "api", lambda a: a.edit([]), ValueError, r"no edit requests given"),
    # ---- the Python API: hparams changed after construction, lengths ----
    ("lr NaN after construction", "api", lambda a: a.edit(FACT, _set(a.hp(), lr=math.nan)), ValueError,
     r"lr must be a number > 0"),
    ("ProjectedAdam lr NaN", "api", lambda a: lambda: ProjectedAdam([a.model.lm_head.weight], [None], lr=math.nan),
     ValueError, r"lr must be > 0 and finite, got nan"),
    ("batch_size 0 after construction", "api", lambda a: a.edit(FACT, _set(a.hp(), batch_size=0)), ValueError,
     r"batch_size must be an integer >= 1, got 0"),
    ("max_length beyond a GPT-2's positions", "api",
     lambda a: _set(a, model=tiny_gpt2()).edit(FACT, a.hp(layers=[1], max_length=300,
                                                         rewrite_module_tmp="transformer.h.{}.mlp.c_proj.weight")),
     ValueError, r"max_length is 300, but the model has only 256 positions"),
    ("curvature_seq_len beyond positions (API)", "api",
     lambda a: _curvature(a, curvature_seq_len=300),
     ValueError, r"curvature_seq_len is 300, but the model has only 256 positions"),
    ("read-only cache_dir (API)", "api",
     lambda a: _curvature(_read_only(a, "cache_dir")),
     NotWritableError, r"cache_dir '.*kfac' is not writable"),
    # ---- the Python API: curvature numbers ----
    ("factors for other layers", "api",
     lambda a: a.edit(FACT, factors=factor_set(a.model, names=["model.layers.0.mlp.down_proj.weight", NAMES[0]])),
     ValueError, rf"the given factors have no layer '{NAMES[1]}'"),
    ("sign-flipped given factors", "api", lambda a: a.edit(FACT, factors=factor_set(a.model, scale_a=-1.0)),
     CurvatureError, rf"factor A of {NAMES[0]}.*not positive semi-definite"),
    ("NaN in given factors", "api", _nan_factors, CurvatureError,
     rf"factor A of {NAMES[1]} \(given\) has 1 non-finite"),
    ("NaN weight, empirical Fisher", "api",
     lambda a: _curvature(_nan_weight(a), fisher_type="empirical"),
     CurvatureError, r"K-FAC factor [AS] of model\.layers\.1\.mlp\.down_proj\.weight \(collected\) has \d+ "
                     r"non-finite entries"),
    ("cached factor with inf", "api",
     lambda a: lambda: FactorSet.load(_saved_factors(a, lambda m: m.fill_(math.inf))), CurvatureError,
     rf"factor S of {NAMES[0]} .*factors.safetensors.* non-finite entries"),
    ("cached factor asymmetric", "api",
     lambda a: lambda: FactorSet.load(_saved_factors(a, lambda m: m.add_(torch.triu(torch.ones_like(m), 1)))),
     CurvatureError, rf"factor S of {NAMES[0]} .*factors.safetensors.* not symmetric"),
    ("negative definite factor", "api", lambda a: lambda: stable_eigh(-spd(16, 1), torch.float64, label="A of L"),
     CurvatureError, r"A of L is not positive semi-definite: smallest eigenvalue -"),
    ("indefinite factor", "api",
     lambda a: lambda: stable_eigh(spd(16, 1) - 0.5 * torch.eye(16) * spd(16, 1).diagonal().mean(), torch.float64,
                                   label="A of L"),
     CurvatureError, r"A of L is not positive semi-definite"),
    ("NaN factor into eigh", "api", lambda a: lambda: Eigenbasis.from_factors(spd(8, 1), _nan_spd(8), layer="L"),
     CurvatureError, r"K-FAC factor S of L has non-finite"),
    # ---- the Python API: saved edits ----
    ("changed tensors of another base (API)", "api",
     lambda a: _apply(_set(a, model=tiny_llama(seed=1)), _delta(a.tmp, None)),
     ValueError, r"weights fingerprint is [0-9a-f]{16}\.\.\., but the edit was made on a base with fingerprint"),
    ("changed tensors onto a bfloat16 base", "api",
     lambda a: _apply(_set(a, model=tiny_llama(dtype=torch.bfloat16)), _delta(a.tmp, None)),
     ValueError, rf"{NAMES[0]} is torch.float32 in the file but torch.bfloat16 in the model"),
    ("changed tensors applied twice", "api",
     lambda a: _apply(a, _applied(a)), ValueError, r"already edited"),
    ("changed tensors file missing (API)", "api",
     lambda a: _apply(a, a.tmp / "none.safetensors"), FileNotFoundError,
     r"no changed-tensors file"),
    ("changed tensors cut in half", "api",
     lambda a: _apply(a, _cut(_delta(a.tmp, None))), ValueError, r"cannot be read"),
    ("changed tensors not safetensors", "api",
     lambda a: _apply(a, _file(a.tmp, "x.safetensors", "not safetensors")), ValueError,
     r"cannot be read"),
    # ---- the Python API: hparams files and keys ----
    ("hparams file repeats a key", "api",
     lambda a: lambda: CrispEditHyperParams.from_hparams(_hparams_file(a, "dup.yaml", (HP_TEXT + "lr: 1.0\n").encode())),
     ValueError, r"dup.yaml' is not valid YAML: duplicate key 'lr' \(first at line 4\)"),
    ("hparams file latin-1", "api",
     lambda a: lambda: CrispEditHyperParams.from_hparams(_hparams_file(a, "latin.yaml", HP_TEXT.encode() + b"#\xe9\n")),
     ValueError, r"latin.yaml' is not UTF-8 text"),
    ("hparams path a folder", "api",
     lambda a: lambda: CrispEditHyperParams.from_hparams(_hparams_file(a, "folder.yaml", None)), ValueError,
     r"folder.yaml' is a folder; give a YAML file"),
    *[(f"hparams key {key}", "api", lambda a, key=key: lambda: CrispEditHyperParams.from_dict(
        {"alg_name": "CrispEdit", "model_name": "m", "layers": [1], key: 1}), ValueError,
       f"unknown CrispEdit hparams key '{key}': did you mean '{suggestion}'\\?")
      for key, suggestion in [("gamma", "energy_threshold"), ("gama", "energy_threshold"), ("n", "mom2_n_samples"),
                              ("num_samples", "mom2_n_samples"), ("chunk", "chunk_size"), ("learning_rate", "lr"),
                              ("energy_treshold", "energy_threshold"), ("layer", "layers"), ("epochs", "num_steps")]],
]


def _bits(model: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter's bytes (NaN compares equal to itself, unlike torch.equal)."""
    return {n: p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for n, p in model.named_parameters()}


def _folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_the_table_holds_every_case_of_the_issue():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert sum(c[1] != "api" for c in CASES) >= 25 and sum(c[1] == "api" for c in CASES) >= 25


def _row(case):
    marks = [] if case[1] == "api" else [needs_data]
    return pytest.param(*case[1:], id=case[0], marks=marks)


@pytest.mark.parametrize("command,make,expected,message", [_row(c) for c in CASES])
def test_bad_input_is_named_before_the_work(request, tmp_path, monkeypatch, capsys, command, make, expected, message):
    if command == "api":
        api = Api(tmp_path, monkeypatch)
        call = make(api)
        before = _bits(api.model)
        with pytest.raises(expected) as info:
            call()
        assert re.search(message, str(info.value)), str(info.value)
        assert "\n" not in str(info.value).strip()  # one line
        assert _bits(api.model) == before  # nothing changed
        assert not api.cache.exists() or not any(api.cache.iterdir())  # nothing cached
        assert _temporaries(tmp_path) == []
        return
    tmp_path, model_dir, hparams = request.getfixturevalue("setup")
    import crispedit_easyedit.bench.job as job
    import crispedit_easyedit.state as state

    started = []
    monkeypatch.setattr(state, "_collect_capability", lambda *a, **k: started.append("collection"))
    monkeypatch.setattr(job, "measure", lambda *a, **k: started.append("evaluation"))
    if make == "read-only cache":
        _read_only(Api(tmp_path, monkeypatch, model=None, tok=None), "cache_dir")
        make = lambda t, m, h: []  # noqa: E731
    out = tmp_path / "out"
    args = base_args(model_dir, hparams, out)
    args[0] = command
    if command == "cache":
        args = ["cache", "--model", str(model_dir), "--hparams", str(hparams), "--quiet"]
    extra = make(tmp_path, model_dir, hparams)
    if "--output-dir" in extra:  # replace the default one
        index = args.index("--output-dir")
        del args[index : index + 2]
    model_files = _folder_digest(model_dir)
    assert cli.main([*args, *extra]) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("crispedit: error:"), err
    assert re.search(message, err[-1]), err[-1]
    assert started == []  # no collection and no evaluation began
    assert not out.exists()  # nothing written
    assert not (tmp_path / "kfac").exists()
    assert _folder_digest(model_dir) == model_files  # the model folder is untouched
    assert _temporaries(tmp_path) == []


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
def test_the_saved_edit_survives_a_failure_after_the_edit(setup, monkeypatch, capsys):
    tmp_path, model_dir, hparams = setup
    import crispedit_easyedit.bench.job as job

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

