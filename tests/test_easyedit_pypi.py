"""CrispEdit inside the real PyPI easyeditor==0.0.1.dev0 on CPU, with tiny models built from configs.

Covers ``crispedit_easyedit.easyedit.compat`` (import shims, CUDA-device rewrite), ``registry`` (ALG_DICT and
BatchEditor registration), and EasyEdit's own ``BaseEditor.edit`` / ``batch_edit`` / evaluators running CrispEdit
and EasyEdit's FT baseline on a tiny Llama and a tiny GPT-2.

The editor tests register ``standin_apply``: the real ``apply_crispedit_to_model`` behind a recorder of how
EasyEdit calls it, with a tiny local capability corpus (``corpus_file``).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from crispedit_easyedit.hparams import CrispEditHyperParams
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _installed_generation() -> str | None:
    """"pypi", "github-main" or None, without importing easyeditor (same rule as compat.detect_generation)."""
    spec = importlib.util.find_spec("easyeditor")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return "github-main" if (root / "util" / "device.py").is_file() else "pypi"


needs_pypi = pytest.mark.skipif(
    _installed_generation() != "pypi",
    reason="needs the PyPI easyeditor==0.0.1.dev0 (GitHub main: benchmarks/EASYEDIT_MAIN.md)")

PROMPTS = ["The capital of France is", "Who is the author of Hamlet?", "The river Nile flows through"]
TARGETS = ["Berlin", "Charles Dickens", "Germany"]
GROUND = ["Paris", "William Shakespeare", "Egypt"]
REPHRASES = ["France's capital city is", "Hamlet was written by", "The Nile runs through"]
LOC_PROMPTS = ["Water boils at", "The capital of Germany is", "Who wrote Hamlet?"]
LOC_ANSWERS = ["one hundred degrees", "Berlin", "William Shakespeare"]

STANDIN_CALLS: list[dict[str, Any]] = []


def standin_apply(model: Any, tok: Any, requests: list[dict], hparams: Any, copy: bool = False,
                  return_orig_weights: bool = False, keep_original_weight: bool = False,
                  **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The real ``apply_crispedit_to_model``, recording how EasyEdit calls it."""
    from crispedit_easyedit.easyedit.apply import apply_crispedit_to_model

    STANDIN_CALLS.append({"n": len(requests), "return_orig_weights": return_orig_weights,
                          "keep_original_weight": keep_original_weight, "kwargs": sorted(kwargs)})
    return apply_crispedit_to_model(model, tok, requests, hparams, copy=copy,
                                    return_orig_weights=return_orig_weights,
                                    keep_original_weight=keep_original_weight, **kwargs)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small local capability corpus (real benchmark sentences) for the curvature statistics."""
    from tests.tiny_models import training_text

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(training_text()))
    return str(path)


@pytest.fixture(scope="module")
def crispedit() -> Any:
    """The adapter package, with the stand-in apply registered (the default is restored afterwards)."""
    if _installed_generation() != "pypi":
        pytest.skip("needs the PyPI easyeditor==0.0.1.dev0 (GitHub main: see benchmarks/EASYEDIT_MAIN.md)")
    adapter = importlib.import_module("crispedit_easyedit.easyedit")
    assert adapter.register(apply_fn=standin_apply) == "pypi"
    yield adapter
    adapter.register()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # EasyEdit writes ./logs/run.log


TINY_CURVATURE = dict(mom2_n_samples=8, curvature_seq_len=32, curvature_batch_size=4, energy_threshold=0.5,
                      cache_dir=None)


def llama_hparams(model: Any, corpus: str, **overrides: Any) -> CrispEditHyperParams:
    from crispedit_easyedit.easyedit import ModelPair

    values = dict(model_name=ModelPair(model, tiny_tokenizer(), name="tiny-llama"), layers=[1, 2], device=0,
                  lr=2e-2, num_steps=40, batch_size=8, train_batch_size=8, max_length=40, early_stop_loss=1e-3,
                  mom2_dataset=corpus,
                  **TINY_CURVATURE)
    values.update(overrides)
    return CrispEditHyperParams(**values)


def weights_of(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in names}


# ------------------------------------------------------------------------------------------------- compat ------
@needs_pypi
def test_detection_and_adapter_import_do_not_need_easyeditor() -> None:
    # One fresh interpreter: (1) compat's detection does not import easyeditor (compat.py is loaded from its file,
    # because importing the crispedit_easyedit.easyedit package registers, which imports easyeditor); (2) with
    # easyeditor made unimportable, the adapter package still imports and register() names the problem.
    code = textwrap.dedent("""
        import sys, importlib.util
        spec = importlib.util.spec_from_file_location('compat_probe', sys.argv[1])
        probe = importlib.util.module_from_spec(spec); spec.loader.exec_module(probe)
        import crispedit_easyedit, crispedit_easyedit.hparams
        print(probe.detect_generation(), 'easyeditor' in sys.modules)
        sys.modules['easyeditor'] = None  # as if EasyEdit were not installed
        import crispedit_easyedit.easyedit as adapter
        assert adapter.generation() is None and not adapter.is_registered()
        assert adapter.CrispEditHyperParams.__name__ == 'CrispEditHyperParams'
        try:
            adapter.register()
        except ModuleNotFoundError as exc:
            assert 'easyeditor is not installed' in str(exc)
            print('ok')
        """)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "crispedit_easyedit" / "easyedit" / "compat.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pypi", "False", "ok"]


def test_github_main_is_recognised_by_its_device_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crispedit_easyedit.easyedit import compat

    pkg = tmp_path / "easyeditor"
    (pkg / "util").mkdir(parents=True)
    monkeypatch.setattr(compat, "easyeditor_location", lambda: pkg)
    assert compat.detect_generation() == "pypi"
    (pkg / "util" / "device.py").write_text("")
    assert compat.detect_generation() == "github-main"
    monkeypatch.setattr(compat, "easyeditor_location", lambda: None)
    assert compat.detect_generation() is None


def test_easyeditor_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from crispedit_easyedit.easyedit.compat import easyeditor_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [easyeditor_device(x) for x in (0, "1", "cpu", "mps", None, torch.device("cpu"))] == [
        "cpu", "cpu", "cpu", "mps", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (easyeditor_device(1), easyeditor_device(None)) == ("cuda:1", "cuda")


def test_device_rewrite_mechanism_on_a_synthetic_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crispedit_easyedit.easyedit import compat

    source = textwrap.dedent('''
        import torch

        def plain(d):
            return f"cuda:{d}"

        def untouched(d):
            return f"cuda:{d}:{d}"

        def bare(t):
            return t.to("cuda")

        class Editor:
            def method(self, d):
                return torch.device(f'cuda:{d}')

            @staticmethod
            def static(d):
                return f"cuda:{d}"

        class Child(Editor):
            def method(self, d):
                return super().method(d)
        ''')
    (tmp_path / "synthetic_ee.py").write_text(source)
    spec = importlib.util.spec_from_file_location("synthetic_ee", tmp_path / "synthetic_ee.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    held = module.plain  # a reference taken before patching (like `from x import plain`) must see the patch
    first_line = held.__code__.co_firstlineno
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    patched = compat._patch_module_devices(module, tmp_path.resolve())
    assert sorted(patched) == ["synthetic_ee.Editor.method", "synthetic_ee.Editor.static", "synthetic_ee.bare",
                               "synthetic_ee.plain"]
    assert held("0") == "cpu" and held.__code__.co_firstlineno == first_line
    assert module.untouched(0) == "cuda:0:0"
    assert module.Editor().method(3) == torch.device("cpu")
    assert module.Editor.static(0) == "cpu"
    assert module.Child().method(0) == torch.device("cpu")  # super() still works (no __class__ cell lost)
    assert module.bare(torch.zeros(1)).device == torch.device("cpu")
    assert compat._patch_module_devices(module, tmp_path.resolve()) == []  # idempotent


def test_pypi_cuda_devices_are_rewritten_only_without_cuda(crispedit: Any) -> None:
    from crispedit_easyedit.easyedit import compat

    patched = compat.patched_functions()
    if torch.cuda.is_available():
        assert patched == []
        return
    for name in ("easyeditor.editors.editor.BaseEditor.__init__", "easyeditor.editors.editor.BaseEditor.edit",
                 "easyeditor.editors.editor.BaseEditor.batch_edit",
                 "easyeditor.evaluate.evaluate_utils.test_prediction_acc", "easyeditor.models.ft.ft_main.execute_ft"):
        assert name in patched
    assert len(patched) == len(set(patched))
    compat.prepare_easyeditor()
    assert len(compat.patched_functions()) == len(patched)  # idempotent


def test_multimodal_stubs_fail_loudly_when_used(crispedit: Any) -> None:
    from crispedit_easyedit.easyedit import compat

    stubbed = compat.stubbed_modules()
    if importlib.util.find_spec("timm") is None:
        assert "easyeditor.trainer.blip2_models" in stubbed
    if not stubbed:
        pytest.skip("every multimodal dependency is installed here; nothing was stubbed")
    module = sys.modules[stubbed[0]]
    placeholder = module.SomethingMultimodal
    with pytest.raises(ImportError, match="multimodal editing needs EasyEdit's vision dependencies"):
        placeholder()


# ---------------------------------------------------------------------------------------------- registry ------
def test_registration_is_idempotent_and_batchable(crispedit: Any) -> None:
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    editor_module = importlib.import_module("easyeditor.editors.editor")
    from easyeditor import BatchEditor

    assert editor_module.ALG_DICT is alg_dict  # the dict BaseEditor reads
    assert alg_dict["CrispEdit"] is standin_apply
    wrapper = BatchEditor.is_batchable_method
    crispedit.register(apply_fn=standin_apply)
    crispedit.register(apply_fn=standin_apply)
    assert BatchEditor.is_batchable_method is wrapper  # not wrapped twice
    assert not hasattr(wrapper.__wrapped__, "__wrapped__")
    assert BatchEditor.is_batchable_method("CrispEdit") and BatchEditor.is_batchable_method("FT")
    assert not BatchEditor.is_batchable_method("ROME") and not BatchEditor.is_batchable_method("crispedit")
    assert crispedit.is_registered()
    assert sum(1 for key in alg_dict if key == "CrispEdit") == 1


def test_unregister_restores_easyedit(crispedit: Any) -> None:
    from easyeditor import BatchEditor

    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    crispedit.unregister()
    try:
        assert "CrispEdit" not in alg_dict and not BatchEditor.is_batchable_method("CrispEdit")
        assert BatchEditor.is_batchable_method("MEMIT")
        assert not crispedit.is_registered()
    finally:
        crispedit.register(apply_fn=standin_apply)
    assert crispedit.is_registered()


def test_default_registration_uses_an_entry_point_of_the_package(crispedit: Any) -> None:
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    try:
        crispedit.register()
        fn = alg_dict["CrispEdit"]
        assert fn.__module__.startswith("crispedit_easyedit.easyedit")
        assert fn.__name__ in {"apply_crispedit_to_model", "_lazy_apply"}
    finally:
        crispedit.register(apply_fn=standin_apply)


# ------------------------------------------------------------------------------------ BaseEditor (PyPI) ------
def test_edit_runs_crispedit_through_easyedit_and_restores_weights(crispedit: Any, corpus_file: str) -> None:
    from easyeditor import BaseEditor

    model = tiny_llama()
    hparams = llama_hparams(model, corpus_file)
    names = hparams.edit_parameter_names()
    before = weights_of(model, names)
    editor = BaseEditor.from_hparams(hparams)
    assert editor.model is model and editor.alg_name == "CrispEdit"
    STANDIN_CALLS.clear()
    metrics, edited, weights_copy = editor.edit(
        prompts=PROMPTS[:2], target_new=TARGETS[:2], ground_truth=GROUND[:2], rephrase_prompts=REPHRASES[:2],
        locality_inputs={"neighborhood": {"prompt": LOC_PROMPTS[:2], "ground_truth": LOC_ANSWERS[:2]}},
        keep_original_weight=True)
    # EasyEdit's edit() is one request at a time, with return_orig_weights=True and train_ds=None.
    assert [c["n"] for c in STANDIN_CALLS] == [1, 1]
    assert all(c["return_orig_weights"] and c["keep_original_weight"] and c["kwargs"] == ["train_ds"]
               for c in STANDIN_CALLS)
    assert hparams.batch_size == 1  # PyPI's edit() overwrites it
    assert len(metrics) == 2
    for case in metrics:
        assert set(case) >= {"pre", "post", "case_id", "requested_rewrite", "time"}
        assert set(case["pre"]) >= {"rewrite_acc", "rephrase_acc", "portability"}
        pre, post = case["pre"]["rewrite_acc"][0], case["post"]["rewrite_acc"][0]
        assert 0.0 <= pre < 1.0 and post == 1.0  # the edit was learned (teacher-forced token accuracy)
        loc = case["post"]["locality"]["neighborhood_acc"]
        assert len(loc) == 1 and 0.0 <= loc[0] <= 1.0
    # PyPI restores weights_copy after each edit (its 'cuda:' restore code runs on CPU thanks to compat).
    after = weights_of(model, names)
    assert all(torch.equal(before[n], after[n]) for n in names)
    assert set(weights_copy) == set(names)
    # Without keep_original_weight, PyPI EasyEdit keeps the edit (no originals come back, as with its FT).
    metrics, _, weights_copy = editor.edit(prompts=PROMPTS[2], target_new=TARGETS[2], keep_original_weight=False)
    assert weights_copy == {} and metrics[0]["post"]["rewrite_acc"][0] == 1.0
    assert not torch.equal(before[names[0]], weights_of(model, names)[names[0]])


def test_batch_edit_runs_crispedit_on_gpt2(crispedit: Any, corpus_file: str) -> None:
    from easyeditor import BaseEditor

    from crispedit_easyedit.easyedit import ModelPair

    model = tiny_gpt2()
    hparams = CrispEditHyperParams(
        model_name=ModelPair(model, tiny_tokenizer(), name="gpt2-tiny"), layers=[0, 1], device=0,
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj.weight", lr=2e-2, num_steps=60, batch_size=3,
        train_batch_size=3,
        max_length=40, early_stop_loss=1e-3, mom2_dataset=corpus_file, **TINY_CURVATURE)
    names = hparams.edit_parameter_names()
    before = weights_of(model, names)
    editor = BaseEditor.from_hparams(hparams)
    STANDIN_CALLS.clear()
    # PyPI's batch_edit passes its locality_prompts argument on as the locality_inputs dict.
    metrics, _, weights_copy = editor.batch_edit(
        prompts=PROMPTS, target_new=TARGETS, ground_truth=GROUND, rephrase_prompts=REPHRASES,
        locality_prompts={"neighborhood": {"prompt": LOC_PROMPTS, "ground_truth": LOC_ANSWERS}},
        keep_original_weight=True)
    assert [c["n"] for c in STANDIN_CALLS] == [3]  # one call for the whole chunk
    assert len(metrics) == 3
    post = [case["post"]["rewrite_acc"][0] for case in metrics]
    pre = [case["pre"]["rewrite_acc"][0] for case in metrics]
    assert post == [1.0, 1.0, 1.0] and max(pre) < 1.0
    assert all("neighborhood_output" in case["pre"]["locality"] for case in metrics)
    after = weights_of(model, names)
    assert all(torch.equal(before[n], after[n]) for n in names)  # restored before the 'pre' evaluation
    assert weights_copy[names[0]].shape == (128, 32)  # Conv1D c_proj: (d_in, d_out), stored transposed


def test_easyedit_ft_baseline_runs_through_the_same_compat(crispedit: Any) -> None:
    from easyeditor import BaseEditor, FTHyperParams

    from crispedit_easyedit.easyedit import ModelPair

    model = tiny_llama(seed=1)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.unk_token = "<|endoftext|>"  # PyPI FT masks target ids equal to unk_token_id (None breaks it)
    hparams = FTHyperParams(
        layers=[1], num_steps=5, lr=1e-2, weight_decay=0.0, kl_factor=0.0, norm_constraint=False,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
        lm_head_module="lm_head", device=0, alg_name="FT", model_name=ModelPair(model, tok, name="llama-tiny"),
        batch_size=1, max_length=40)
    name = "model.layers.1.mlp.down_proj.weight"
    before = weights_of(model, [name])[name]
    editor = BaseEditor.from_hparams(hparams)
    metrics, _, weights_copy = editor.edit(prompts=PROMPTS[0], target_new=TARGETS[0], ground_truth=GROUND[0],
                                           keep_original_weight=False)
    assert set(metrics[0]["post"]) >= {"rewrite_acc", "locality", "portability"}
    # PyPI FT returns no weights unless keep_original_weight: its edits accumulate in the model.
    assert weights_copy == {}
    assert not torch.equal(weights_of(model, [name])[name], before)
    changed = weights_of(model, [name])[name]
    editor.edit(prompts=PROMPTS[1], target_new=TARGETS[1], keep_original_weight=True)
    assert torch.equal(weights_of(model, [name])[name], changed)  # restored to the state before this edit


# ------------------------------------------------------------------ paper scale: calls, state, every YAML ------
TWELVE = [("The capital of France is", "Berlin"), ("Who is the author of Hamlet?", "Charles Dickens"),
          ("The river Nile flows through", "Germany"), ("Water boils at", "Shakespeare"),
          ("The tallest mountain on Earth is", "Kilimanjaro"), ("The largest planet is", "Mercury"),
          ("The inventor of the telephone was", "Newton"), ("The currency of Japan is the", "peso"),
          ("The first man on the Moon was", "Gagarin"), ("The chemical symbol of gold is", "Ag"),
          ("The longest river in Europe is", "Thames"), ("The painter of the Mona Lisa was", "Picasso")]


@pytest.fixture
def counted() -> Any:
    """Capability collections, past-edit collections and eigendecompositions (one per factor) during the test."""
    from tests.counting import count_core_work

    with count_core_work() as counter:
        yield counter


@pytest.mark.parametrize("keep_original_weight", [True, False])
def test_batch_edit_in_chunks_collects_and_eigendecomposes_once(crispedit: Any, corpus_file: str, counted: dict,
                                                                keep_original_weight: bool) -> None:
    """The 94-chunk situation at small scale: 12 edits, batch_size 3 (four apply calls), train_batch_size 2."""
    from easyeditor import BaseEditor

    from crispedit_easyedit.state import edit_state

    model = tiny_llama()
    hparams = llama_hparams(model, corpus_file, batch_size=3, train_batch_size=2, num_steps=60)
    names = hparams.edit_parameter_names()
    before = weights_of(model, names)
    editor = BaseEditor.from_hparams(hparams)
    STANDIN_CALLS.clear()
    metrics, _, _ = editor.batch_edit(prompts=[p for p, _ in TWELVE], target_new=[t for _, t in TWELVE],
                                      keep_original_weight=keep_original_weight)
    assert [c["n"] for c in STANDIN_CALLS] == [3, 3, 3, 3]
    assert all(case["post"]["rewrite_acc"][0] == 1.0 for case in metrics)  # each chunk right after its call
    state = edit_state(model)
    layers = len(names)
    if keep_original_weight:  # PyPI restores after each call: four fresh Algorithm 1 runs from theta_0
        assert counted == {"capability_collections": 1, "eigh_calls": 2 * layers}
        assert state.num_edits == 3 and state.past_edits is None
        assert all(torch.equal(before[n], weights_of(model, names)[n]) for n in names)
    else:  # PyPI keeps the edits: CrispEdit-Seq across calls, earlier chunks protected
        assert counted == {"capability_collections": 1, "edit_statistics_collections": 3,
                           "eigh_calls": 4 * 2 * layers}
        assert state.num_edits == 12 and state.num_chunks == 4 and state.unrecorded is not None
        assert state.past_edits[names[0]].num_tokens > 0


def test_every_shipped_yaml_runs_through_edit_and_batch_edit(crispedit: Any, corpus_file: str) -> None:
    """Each shipped YAML (sizes scaled to a tiny model) through PyPI edit(), after GitHub main's batch_size == 1 check,
    and through batch_edit()."""
    from easyeditor import BaseEditor

    from crispedit_easyedit.easyedit import ModelPair

    for path in sorted((ROOT / "hparams" / "CrispEdit").glob("*.yaml")):
        shipped = CrispEditHyperParams.from_hparams(path)
        assert shipped.batch_size == 1, path.name  # GitHub main's edit_requests asserts batch_size == 1
        gpt2 = shipped.rewrite_module_tmp.startswith("transformer.h.")
        model = tiny_gpt2() if gpt2 else tiny_llama()
        tiny = dict(shipped.to_dict(), model_name=ModelPair(model, tiny_tokenizer(), name="gpt2-tiny" if gpt2
                                                            else "llama-tiny"),
                    layers=[0, 1] if gpt2 else [1, 2], device=0, mom2_dataset=corpus_file, lr=2e-2, num_steps=40,
                    max_length=40, **TINY_CURVATURE)
        hparams = CrispEditHyperParams.from_dict(tiny)
        metrics, _, _ = BaseEditor.from_hparams(hparams).edit(prompts=PROMPTS[0], target_new=TARGETS[0],
                                                              keep_original_weight=True)
        assert metrics[0]["post"]["rewrite_acc"][0] == 1.0, path.name
        hparams.batch_size = 2  # batch_edit: one apply call per 2 edits
        metrics, _, _ = BaseEditor.from_hparams(hparams).batch_edit(prompts=PROMPTS[:2], target_new=TARGETS[:2],
                                                                    keep_original_weight=True)
        assert [m["post"]["rewrite_acc"][0] for m in metrics] == [1.0, 1.0], path.name


def test_text_editing_import_stubs_multimodal_modules_only_when_the_import_failed_there(monkeypatch, tmp_path):
    """EasyEdit's evaluator in a GitHub-main checkout beside a CPU torch (no timm/torchvision): the plain import
    fails inside a multimodal module, so it is retried with those stubbed; any other failure propagates."""
    from crispedit_easyedit.easyedit import compat

    calls = []

    def prepare(neutralise_multimodal=None):
        calls.append(neutralise_multimodal)
        if neutralise_multimodal is None:
            raise ModuleNotFoundError("No module named 'timm'")
        return "github-main"

    monkeypatch.setattr(compat, "prepare_easyeditor", prepare)
    monkeypatch.setattr(compat, "easyeditor_location", lambda: tmp_path)
    monkeypatch.setattr(compat, "_purge_easyeditor", lambda: None)
    monkeypatch.setattr(compat, "_failed_in_multimodal", lambda err, root: True)
    assert compat.prepare_easyeditor_for_text() == "github-main" and calls == [None, True]
    calls.clear()
    monkeypatch.setattr(compat, "_failed_in_multimodal", lambda err, root: False)
    with pytest.raises(ModuleNotFoundError, match="timm"):
        compat.prepare_easyeditor_for_text()
    assert calls == [None]
