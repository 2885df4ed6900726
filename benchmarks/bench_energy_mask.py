"""Time and peak memory of the energy mask at the Llama-3-8B down_proj shape (4096 x 14336): the dense definition
(every product in float64, sorted) against ``projector.energy_mask``; each in a fresh process, so ``ru_maxrss``
measures its own peak.

Usage (from the repository root):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_energy_mask.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(which: str, d_out: int, d_in: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from crispedit_easyedit.projector import energy_mask
    from tests.test_projector import dense_energy_mask

    g = torch.Generator().manual_seed(0)
    eig_out, eig_in = torch.rand(d_out, generator=g) ** 3, torch.rand(d_in, generator=g) ** 3
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    mask = (dense_energy_mask if which == "dense" else energy_mask)(eig_out, eig_in, 0.8)
    seconds = time.perf_counter() - started
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"method": which, "seconds": round(seconds, 3), "peak_extra_mib": round(extra / 2**20, 1),
            "mask_mib": round(mask.numel() / 2**20, 1), "kept_fraction": round(float(mask.float().mean()), 6)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], 4096, 14336)))
        return
    rows = []
    for which in ("dense", "energy_mask"):
        out = subprocess.run([sys.executable, __file__, "--one", which], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| method | seconds | peak extra MiB | mask MiB | kept fraction |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']} | {r['peak_extra_mib']} | {r['mask_mib']} | {r['kept_fraction']} |")


if __name__ == "__main__":
    main()
