"""End-to-end edit time of CrispEdit against fine-tuning of the same layers at equal steps (issue 11).

One process, the real SmolLM2-135M-Instruct, the shipped hparams (hparams/CrispEdit/SmolLM2-135M-Instruct.yaml),
the same ZsRE edits; every call is ``apply_crispedit`` from the base weights with a fresh edit state, so each one
loads the capability curvature and eigenbases from the warm disk cache, builds its masks, trains and writes its
report, as a user's single ``edit`` call does. Early stopping is off, so every mode runs exactly ``--epochs`` epochs
(the same optimizer steps). Modes: "none" (fine-tuning: the harness's ``ft``), "both" (the default),
"eigenbasis", and both of these with ``gradient_projection_dtype: bfloat16``. Repetitions are interleaved (none,
both, eigenbasis, ..., none, ...) and medians compared, because these machines are shared. Goal (issue 11):
CrispEdit <= 1.15x fine-tuning.

Reported per mode: the call's wall time, its training part (``EditReport.seconds_editing``) and its curvature part
(``seconds_curvature``: loading the cached factors and eigenbases); ratios to "none" of the medians and the median of
the per-repetition ratios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_edit_time.py [--edits 32] [--epochs 10] [--reps 3]

Results: a markdown table on stdout and one JSON line appended to ``benchmarks/results/bench_edit_time.jsonl``.
The first call of the run (which may collect the curvature when the cache is cold) is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_core import paired_ratio  # this script's folder is on sys.path when run as benchmarks/bench_edit_time.py

logger = logging.getLogger("bench_edit_time")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "bench_edit_time.jsonl"
DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"
MODES: dict[str, dict[str, str]] = {  # label -> hparams overrides
    "none": {"projection_mode": "none"},
    "both": {"projection_mode": "both", "gradient_projection_dtype": "basis"},
    "eigenbasis": {"projection_mode": "eigenbasis", "gradient_projection_dtype": "basis"},
    "both+bf16-gradient": {"projection_mode": "both", "gradient_projection_dtype": "bfloat16"},
    "eigenbasis+bf16-gradient": {"projection_mode": "eigenbasis", "gradient_projection_dtype": "bfloat16"},
}


def zsre_requests(path: Path, count: int) -> list[dict[str, str]]:
    """The first ``count`` ZsRE records as EasyEdit requests (prompt -> target_new)."""
    from crispedit_easyedit.bench.data import load_requests

    return [dict(r) for r in load_requests("zsre", path, start=0, count=count).requests]


def timed_edit(model, tok, requests, hparams, originals: dict[str, torch.Tensor]) -> dict[str, float]:
    """One ``apply_crispedit`` call from the base weights and a fresh edit state; seconds of its parts."""
    from crispedit_easyedit.editing import apply_crispedit
    from crispedit_easyedit.state import reset_edit_state

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    reset_edit_state(model)
    started = time.perf_counter()
    report = apply_crispedit(model, tok, requests, hparams, progress=False)
    wall = time.perf_counter() - started
    return {"wall": wall, "editing": report.seconds_editing, "curvature": report.seconds_curvature,
            "steps": report.steps, "final_loss": report.final_loss}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from crispedit_easyedit.bench.harness import git_state
    from crispedit_easyedit.bench.models import load_model_and_tokenizer
    from crispedit_easyedit.editing import edit_targets
    from crispedit_easyedit.hparams import CrispEditHyperParams

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    base = CrispEditHyperParams.from_hparams(args.hparams)
    requests = zsre_requests(args.zsre, args.edits)
    per_mode = {mode: dataclasses.replace(base, **overrides, num_steps=args.epochs, early_stop_loss=0.0)
                for mode, overrides in MODES.items()}
    originals = {t.name: t.param.detach().clone() for t in edit_targets(model, base)}
    logger.info("warm-up call (collects the curvature if the cache is cold)")
    timed_edit(model, tok, requests, per_mode["both"], originals)
    times: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            times[mode].append(timed_edit(model, tok, requests, per_mode[mode], originals))
            logger.info("rep %d %s: %.1f s (training %.1f s)", rep + 1, mode, times[mode][-1]["wall"],
                        times[mode][-1]["editing"])
    rows = {}
    for mode in MODES:
        walls = [t["wall"] for t in times[mode]]
        trains = [t["editing"] for t in times[mode]]
        rows[mode] = {
            "wall_median_s": statistics.median(walls),
            "editing_median_s": statistics.median(trains),
            "curvature_median_s": statistics.median(t["curvature"] for t in times[mode]),
            "wall_ratio_to_ft": statistics.median(walls) / statistics.median(t["wall"] for t in times["none"]),
            "wall_paired_ratio_to_ft": paired_ratio(walls, [t["wall"] for t in times["none"]]),
            "editing_ratio_to_ft": statistics.median(trains) / statistics.median(t["editing"] for t in times["none"]),
            "steps": times[mode][0]["steps"],
            "final_loss_median": statistics.median(t["final_loss"] for t in times[mode]),
            "raw": times[mode],
        }
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "edits": args.edits, "epochs": args.epochs, "reps": args.reps,
        "train_batch_size": base.train_batch_size, "layers": list(base.layers), "gamma": base.energy_threshold,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "modes": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['edits']} edits, {result['epochs']} epochs, batch {result['train_batch_size']}, "
             f"{result['reps']} interleaved repetitions (load average at the end {result['load_average'][0]:.1f})", "",
             "| mode | steps | call s (median) | training s | curvature s | call / ft | paired | training / ft |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, row in result["modes"].items():
        lines.append(f"| {mode} | {row['steps']} | {row['wall_median_s']:.1f} | {row['editing_median_s']:.1f} | "
                     f"{row['curvature_median_s']:.2f} | {row['wall_ratio_to_ft']:.3f} | "
                     f"{row['wall_paired_ratio_to_ft']:.3f} | {row['editing_ratio_to_ft']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hparams", type=Path, default=DEFAULT_HPARAMS)
    parser.add_argument("--zsre", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "zsre_train.json",
                        help="ZsRE (MEND) records; the first --edits are edited")
    parser.add_argument("--edits", type=int, default=32, help="number of edits (default: one minibatch of 32)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every mode (early stopping is off)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = run(args)
    print(markdown(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
