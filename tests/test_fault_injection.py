"""Faults injected per phase of ``crispedit edit`` in real subprocesses (issue 10): an exception, SIGINT or SIGTERM
during the K-FAC collection, the eigendecomposition, optimizer step 3, the evaluation after the edit, or the writing
of the saved edit (``tests/fault_driver.py``). Afterwards: the in-memory weights are bit-identical to those loaded
(faults before the edit ends), the model folder is untouched, no ``.tmp-*`` file is left in the cache or output
folder, nothing half-made is cached, and a saved edit written before the fault is intact (it reproduces the edited
weights on the base model). One subprocess per fault runs the five phases (one start of torch each)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault_driver import FAULTS, PHASES, weights_sha256
from tests.test_cli import HPARAMS, needs_data
from tests.tiny_models import SHARED_DATA, tiny_llama, tiny_tokenizer, training_text

ROOT = Path(__file__).resolve().parents[1]
BEFORE_THE_EDIT_ENDS = ("collection", "eigendecomposition", "step")
#: how each fault ends the command: the CLI's failure line (exit 1), or the interrupt unwound to the top
OUTCOMES = {"exception": 1, "sigint": "KeyboardInterrupt: ", "sigterm": "KeyboardInterrupt: terminated by signal 15"}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{fault: (workdir, model-folder digest before, {phase: FAULT-RESULT record}, the subprocess)}, run lazily."""
    done = {}

    def run(fault: str):
        if fault not in done:
            workdir = tmp_path_factory.mktemp(f"fault-{fault}")
            tiny_llama().save_pretrained(workdir / "model")
            tiny_tokenizer().save_pretrained(workdir / "model")
            (workdir / "corpus.txt").write_text("\n\n".join(training_text()))
            (workdir / "tiny.yaml").write_text(HPARAMS.format(corpus=workdir / "corpus.txt", cache="CACHE_DIR"))
            digest = folder_digest(workdir / "model")
            env = dict(os.environ, FAULT_DATA_PATH=str(SHARED_DATA / "zsre_train.json"), HF_HUB_OFFLINE="1",
                       TRANSFORMERS_OFFLINE="1")
            proc = subprocess.run([sys.executable, "-m", "tests.fault_driver", fault, str(workdir)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=600)
            records = {}
            for line in proc.stdout.splitlines():
                if line.startswith("FAULT-RESULT "):
                    record = json.loads(line.removeprefix("FAULT-RESULT "))
                    records[record["phase"]] = record
            done[fault] = (workdir, digest, records, proc)
        return done[fault]

    return run


@functools.lru_cache(maxsize=None)
def _base_model_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


@needs_data
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_in_any_phase_leaves_weights_files_and_caches_whole(runs, fault, phase):
    workdir, model_digest, records, proc = runs(fault)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = records[phase]
    assert result["fired"] == phase, proc.stderr[-3000:]
    expected = OUTCOMES[fault]
    if isinstance(expected, int):
        assert result["outcome"] == expected, result
    else:
        assert isinstance(result["outcome"], str) and result["outcome"].startswith(expected), result
    if fault == "exception":
        assert f"crispedit: edit failed: RuntimeError: injected fault in phase {phase}" in proc.stderr
    assert folder_digest(workdir / "model") == model_digest  # the model on disk is untouched
    here = workdir / phase
    assert list(here.rglob(".tmp-*")) == [], "a temporary file was left behind"
    cache, delta = here / "kfac", here / "out" / "changed_tensors.safetensors"
    cached = sorted(p.name.split("-")[0] for p in cache.iterdir()) if cache.exists() else []
    if phase in BEFORE_THE_EDIT_ENDS:
        assert result["final"] == result["loaded"], "the weights were left changed"
    if phase in ("collection", "eigendecomposition"):
        assert cached == []  # factors are cached only after their eigendecomposition passed
    else:
        from crispedit_easyedit.curvature import read_safetensors

        assert cached == ["eig", "kfac"]
        for path in cache.iterdir():
            read_safetensors(path, "cache")  # whole and readable
    if phase == "evaluation":  # the saved edit was written before the fault: whole, and it is the edit
        from crispedit_easyedit.delta import apply_changed_tensors

        base = _base_model_class().from_pretrained(workdir / "model")
        apply_changed_tensors(base, delta)
        assert weights_sha256(base) == result["final"] != result["loaded"]
    else:
        assert not delta.exists()
