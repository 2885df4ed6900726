"""Run ``crispedit edit`` on a tiny model once per phase, with one fault injected at that phase (used by
tests/test_fault_injection.py in a real subprocess, so that signals are real signals handled by the CLI's handlers).

    python -m tests.fault_driver FAULT WORKDIR

Phases, each run in ``WORKDIR/<phase>/`` (cache ``kfac/``, output ``out/``): collection (the 2nd batch's forward
hook of the K-FAC collection), eigendecomposition (the 2nd ``eigh``), step (optimizer step 3 of the edit),
evaluation (the evaluation after the edit, which follows the saved edit), saving (the changed-tensors file half
written). FAULT: exception (a RuntimeError), sigint or sigterm (the signal sent to this process; the CLI unwinds
both as KeyboardInterrupt, caught here so the next phase can run in the same process: one start of torch for all).

WORKDIR holds ``model/`` (a tiny Llama and its tokenizer) and ``tiny.yaml`` whose ``cache_dir`` is ``CACHE_DIR``.
For each phase one line ``FAULT-RESULT {json}`` goes to stdout: the phase reached (``fired``), the sha256 of the
in-memory weights when the model was loaded (``loaded``) and when the command ended (``final``), and the command's
return code or the exception that ended it (``outcome``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("fault_driver")
PHASES = ("collection", "eigendecomposition", "step", "evaluation", "saving")
FAULTS = ("exception", "sigint", "sigterm")


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fire(fault: str, phase: str) -> None:
    """Raise, or send this process SIGINT/SIGTERM and let its handler unwind the stack (within the sleep)."""
    logger.info("injecting %s in phase %s", fault, phase)
    if fault == "exception":
        raise RuntimeError(f"injected fault in phase {phase}")
    os.kill(os.getpid(), signal.SIGINT if fault == "sigint" else signal.SIGTERM)
    time.sleep(30)  # the handler raises KeyboardInterrupt here
    raise AssertionError("the signal was not delivered")


def on_call(owner, attribute: str, when, action):
    """A patch of ``owner.attribute`` (a context manager) that runs ``action(*args, **kwargs)`` before the call for
    which ``when(n, args, kwargs)`` holds (n counts calls from 1)."""
    from unittest import mock

    real = getattr(owner, attribute)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if when(calls[0], args, kwargs):
            action(*args, **kwargs)
        return real(*args, **kwargs)

    return mock.patch.object(owner, attribute, wrapped)


def run_phase(phase: str, fault: str, workdir: Path) -> dict:
    """One ``crispedit edit`` in ``workdir / phase`` with ``fault`` at ``phase``; returns the FAULT-RESULT record."""
    from unittest import mock

    import safetensors.torch

    from crispedit_easyedit import curvature, optim, projector
    from crispedit_easyedit.bench import cli, job, models

    state = {"phase": phase, "fired": None, "loaded": None, "final": None, "outcome": None}
    loaded = []
    here = workdir / phase
    here.mkdir()
    hparams = here / "tiny.yaml"
    hparams.write_text((workdir / "tiny.yaml").read_text().replace("CACHE_DIR", str(here / "kfac")))

    def trigger(*args, **kwargs):
        state["fired"] = phase
        fire(fault, phase)

    real_load = models.load_model_and_tokenizer

    def load(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        loaded.append(model)
        state["loaded"] = weights_sha256(model)
        return model, tok

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)  # a write cut off midway
        trigger()

    patches = {
        "collection": lambda: on_call(curvature._FactorAccumulator, "_hook", lambda n, a, k: n == 3, trigger),
        "eigendecomposition": lambda: on_call(projector, "stable_eigh", lambda n, a, k: n == 2, trigger),
        "step": lambda: on_call(optim.ProjectedAdam, "step", lambda n, a, k: n == 3, trigger),
        "evaluation": lambda: on_call(job, "measure", lambda n, a, k: k.get("label") == "after", trigger),
        "saving": lambda: on_call(safetensors.torch, "save_file", lambda n, a, k: Path(a[1]).parent == here / "out",
                                  half_written),
    }
    args = ["edit", "--model", str(workdir / "model"), "--hparams", str(hparams), "--data-path",
            os.environ["FAULT_DATA_PATH"], "--count", "2", "--output-dir", str(here / "out"), "--n-probes", "0",
            "--heldout-sequences", "1", "--heldout-seq-len", "16", "--quiet", "--no-easyedit-metrics",
            "--save", "delta"]
    try:
        with mock.patch.object(models, "load_model_and_tokenizer", load), patches[phase]():
            state["outcome"] = cli.main(args)
    except KeyboardInterrupt as exc:  # the signal unwound the command; the next phase runs in this process
        state["outcome"] = f"KeyboardInterrupt: {exc}"
    finally:
        if loaded:
            state["final"] = weights_sha256(loaded[0])
    return state


def main(fault: str, workdir: Path) -> int:
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    # A process started in the background by a non-interactive shell (as CI may start the tests) inherits SIGINT as
    # ignored, and Python then keeps it ignored; restore the interactive behaviour (Ctrl-C raises KeyboardInterrupt),
    # which is what this driver injects.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for phase in PHASES:
        print("FAULT-RESULT " + json.dumps(run_phase(phase, fault, workdir)), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
