"""Two processes making the same capability-curvature cache at once (issue 10): the second waits for the first's
advisory lock and reads its file, so there is one collection and never a torn file; the lock times out with a
message naming the lock file, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crispedit_easyedit.checks import cache_lock
from tests.tiny_models import training_text

ROOT = Path(__file__).resolve().parents[1]
fcntl = pytest.importorskip("fcntl")

#: one process: wait until both are ready (so their collections would overlap), then get the curvature; the
#: collection sleeps 1 s so that the other process is surely waiting meanwhile
CHILD = """
import hashlib, logging, sys, time
from pathlib import Path
import crispedit_easyedit.state as state
from crispedit_easyedit.state import capability_curvature
from tests.test_state import make_hparams
from tests.tiny_models import tiny_llama, tiny_tokenizer

logging.basicConfig(level=logging.INFO)
work, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real = state._collect_capability

def slow_collection(*args, **kwargs):
    print("COLLECTING", flush=True)
    time.sleep(1.0)
    return real(*args, **kwargs)

state._collect_capability = slow_collection
model, tok = tiny_llama(), tiny_tokenizer()
hp = make_hparams(str(work / "corpus.txt"), cache_dir=str(work / "kfac"))
(work / me).touch()
while not (work / other).exists():
    time.sleep(0.02)
curvature = capability_curvature(model, tok, hp, progress=False)
A = curvature.factors.factors[hp.rewrite_module_tmp.format(1)].A
print("SOURCE", curvature.source, hashlib.sha256(A.numpy().tobytes()).hexdigest(), flush=True)
"""


def test_two_processes_collecting_the_same_cache_collect_once(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(training_text()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), me, other], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in (("ready-1", "ready-2"), ("ready-2", "ready-1"))]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("COLLECTING") == 1, stdout  # one collection
    sources = sorted(line.split()[1] + " " + line.split()[-1] for line in stdout.splitlines()
                     if line.startswith("SOURCE"))
    assert [s.split()[0] for s in sources] == ["collected", "disk"]  # the other read the first one's file
    assert sources[0].split()[-1] == sources[1].split()[-1]  # the same factors, bit for bit
    assert "waiting for it" in "".join(err for _, err in outputs)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "kfac").iterdir())
    assert names == ["eig", "kfac"]  # no lock file, no temporary


def test_the_lock_times_out_naming_the_lock_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "kfac-x.safetensors"
    with cache_lock(path) as held:
        assert held and (tmp_path / "kfac-x.safetensors.lock").exists()
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"waited 0.3 s for the lock '.*kfac-x.safetensors.lock' on the "
                                               r"curvature cache: another process is still making it"):
            with cache_lock(path, timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []
    with cache_lock(path):  # free again
        pass
    assert list(tmp_path.iterdir()) == []
