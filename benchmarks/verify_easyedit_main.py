"""CrispEdit (the real apply function) inside EasyEdit GitHub main on CPU, with tiny models from configs.

Checks what CI cannot (main has no setup.py): every shipped YAML through main's ``edit()`` (which asserts
``batch_size == 1``) and ``batch_edit()``, and how the edit state reads main's calls: ``batch_edit`` in chunks with
``sequential_edit=False`` (main restores the weights: every call a fresh Algorithm 1 from the same curvature and
eigenbases) and ``sequential_edit=True`` (CrispEdit-Seq across calls).

Run from a folder outside the repository (EasyEdit writes ./logs), with main's environment
(benchmarks/EASYEDIT_MAIN.md):
    PYTHONPATH=$REPO:$EASYEDIT_MAIN ~/venv-main/bin/python $REPO/benchmarks/verify_easyedit_main.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.basicConfig(level=logging.WARNING)

from crispedit_easyedit.easyedit import ModelPair, compat, registry  # noqa: E402
from crispedit_easyedit.hparams import CrispEditHyperParams  # noqa: E402
from crispedit_easyedit.state import edit_state  # noqa: E402
from tests.counting import count_core_work  # noqa: E402
from tests.test_easyedit_pypi import PROMPTS, TARGETS, TWELVE  # noqa: E402
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer, training_text  # noqa: E402


def main() -> None:
    assert compat.detect_generation() == "github-main", compat.detect_generation()
    # CPU torch without timm/torchvision: stub main's multimodal modules explicitly (never done for main by itself)
    assert registry.register(neutralise_multimodal=True) == "github-main"
    from easyeditor import BaseEditor

    corpus = Path("crispedit-verify-corpus.txt").resolve()
    corpus.write_text("\n\n".join(training_text()))
    tiny = dict(device="cpu", mom2_dataset=str(corpus), lr=2e-2, num_steps=40, max_length=40, mom2_n_samples=8,
                curvature_seq_len=32, curvature_batch_size=4, energy_threshold=0.5, cache_dir=None)

    def tiny_hparams(path: Path, **overrides) -> tuple[CrispEditHyperParams, torch.nn.Module]:
        shipped = CrispEditHyperParams.from_hparams(path)
        gpt2 = shipped.rewrite_module_tmp.startswith("transformer.h.")
        model = tiny_gpt2() if gpt2 else tiny_llama()
        values = dict(shipped.to_dict(), **tiny, layers=[0, 1] if gpt2 else [1, 2],
                      model_name=ModelPair(model, tiny_tokenizer(), name="gpt2-tiny" if gpt2 else "llama-tiny"))
        values.update(overrides)
        return CrispEditHyperParams.from_dict(values), model

    for path in sorted((ROOT / "hparams" / "CrispEdit").glob("*.yaml")):
        hparams, _ = tiny_hparams(path)
        assert hparams.batch_size == 1, path.name
        metrics, _, _ = BaseEditor.from_hparams(hparams).edit(prompts=PROMPTS[0], target_new=TARGETS[0])
        assert metrics[0]["post"]["rewrite_acc"][0] == 1.0, (path.name, metrics[0]["post"])
        hparams, model = tiny_hparams(path, batch_size=2)
        metrics, _, _ = BaseEditor.from_hparams(hparams).batch_edit(prompts=PROMPTS[:2], target_new=TARGETS[:2])
        assert all(m["post"]["rewrite_acc"][0] == 1.0 for m in metrics), (path.name, metrics)
        print(f"{path.name}: edit() and batch_edit() rewrite_acc 1.0")

    llama_yaml = ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"
    for sequential in (False, True):
        hparams, model = tiny_hparams(llama_yaml, batch_size=3, train_batch_size=2, num_steps=60)
        editor = BaseEditor.from_hparams(hparams)
        with count_core_work() as counts:
            metrics, _, _ = editor.batch_edit(prompts=[p for p, _ in TWELVE], target_new=[t for _, t in TWELVE],
                                              sequential_edit=sequential)
        state = edit_state(model)
        print(f"batch_edit of 12 in chunks of 3, sequential_edit={sequential}: {dict(counts)}, state "
              f"{state.num_edits} edits in {state.num_chunks} chunk(s), post rewrite_acc "
              f"{sum(m['post']['rewrite_acc'][0] for m in metrics) / len(metrics):.3f}")
        if sequential:
            assert dict(counts) == {"capability_collections": 1, "edit_statistics_collections": 3,
                                    "eigh_calls": 4 * 2 * len(hparams.layers)}, counts
            assert (state.num_edits, state.num_chunks) == (12, 4)
        else:
            assert dict(counts) == {"capability_collections": 1, "eigh_calls": 2 * len(hparams.layers)}, counts
            assert (state.num_edits, state.num_chunks) == (3, 1)
    print("torch", torch.__version__, "| python", sys.version.split()[0])
    print("ALL CHECKS PASSED")


if __name__ == "__main__":
    main()
