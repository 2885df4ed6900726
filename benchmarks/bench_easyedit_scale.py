"""CrispEdit through EasyEdit at scale, on the real SmolLM2-135M-Instruct (offline, CPU).

Two measurements, each written as JSON to ``benchmarks/results/``:

* ``calls``: N ZsRE edits through the PyPI easyeditor ``BaseEditor.batch_edit`` as one call (``batch_size = N``:
  one Algorithm 1) and in chunks with accumulation (``batch_size = chunk``, ``keep_original_weight=False``:
  CrispEdit-Seq across calls). Per run: capability collections, past-edit collections and eigendecompositions
  (counted), wall time, and the final teacher-forced reliability / generalisation of *all* N edits.
* ``weights``: CrispEdit-Seq inside one call (``chunk_size``) for several ``edit_stats_weight`` values and
  sequential fine-tuning: retention of the first chunk's edits after the later chunks, and of all edits.

Usage (from the repository root):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_easyedit_scale.py calls --count 300 --chunk 100
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_easyedit_scale.py weights --count 60 --chunk 20
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_easyedit_scale")


def load(args):
    from crispedit_easyedit.bench.data import load_requests
    from crispedit_easyedit.hparams import CrispEditHyperParams
    from crispedit_easyedit.bench.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    requests = list(load_requests("zsre", args.data_path, args.start, args.count).requests)
    hparams = CrispEditHyperParams.from_hparams(ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml")
    return model, tok, requests, hparams


def final_scores(model, tok, requests) -> dict:
    from crispedit_easyedit.bench.evaluation import teacher_forced_scores

    scores = teacher_forced_scores(model, tok, requests, batch_size=16)
    return {"reliability": scores["rewrite_acc"], "generalization": scores["rephrase_acc"]}


def run_calls(args) -> dict:
    """One batch_edit call of all edits vs chunks with accumulation, through PyPI easyeditor."""
    import crispedit_easyedit.easyedit  # noqa: F401 - registers CrispEdit
    from easyeditor import BaseEditor

    from crispedit_easyedit.easyedit import ModelPair
    from crispedit_easyedit.state import reset_edit_state

    from tests.counting import count_core_work

    base_model, tok, requests, base_hparams = load(args)
    results = {}
    for label, batch_size in (("one call", len(requests)), (f"chunks of {args.chunk}", args.chunk)):
        model = copy.deepcopy(base_model)
        reset_edit_state(model)
        hparams = copy.deepcopy(base_hparams)
        hparams.model_name = ModelPair(model, tok, name="llama-smollm2-135m-instruct")
        hparams.batch_size = batch_size
        editor = BaseEditor.from_hparams(hparams)
        started = time.perf_counter()
        with count_core_work() as counter:
            editor.batch_edit(prompts=[r["prompt"] for r in requests],
                              target_new=[r["target_new"] for r in requests],
                              ground_truth=[r["ground_truth"] for r in requests],
                              rephrase_prompts=[r.get("rephrase_prompt") for r in requests],
                              keep_original_weight=False)
        seconds = time.perf_counter() - started
        results[label] = {"batch_size": batch_size, "calls": -(-len(requests) // batch_size),
                          "seconds_batch_edit": round(seconds, 1), **dict(counter),
                          "eigendecomposed_factor_sets": counter["eigh_calls"] // (2 * len(hparams.layers)),
                          "final_all_edits": final_scores(model, tok, requests)}
        logger.info("%s: %s", label, results[label])
    return results


def run_weights(args) -> dict:
    """CrispEdit-Seq retention for several edit_stats_weight values, against sequential fine-tuning."""
    from crispedit_easyedit.editing import apply_crispedit
    from crispedit_easyedit.hparams import CrispEditHyperParams

    base_model, tok, requests, base_hparams = load(args)
    first = requests[: args.chunk]
    settings = [("sequential fine-tuning", {"projection_mode": "none"})]
    settings += [(f"CrispEdit-Seq w={w:g}", {"edit_stats_weight": w}) for w in args.weights]
    results = {}
    for label, overrides in settings:
        model = copy.deepcopy(base_model)
        hparams = CrispEditHyperParams.from_dict(dict(base_hparams.to_dict(), chunk_size=args.chunk, **overrides))
        started = time.perf_counter()
        report = apply_crispedit(model, tok, requests, hparams, progress=False)
        results[label] = {"seconds": round(time.perf_counter() - started, 1),
                          "first_chunk": final_scores(model, tok, first),
                          "all_edits": final_scores(model, tok, requests),
                          "kept_fraction_last_chunk": {k.split(".")[2]: round(v["kept_fraction"], 4)
                                                       for k, v in report.layers.items()},
                          "chunk_leak_fractions": report.chunk_leak_fractions}
        logger.info("%s: %s", label, results[label])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["calls", "weights"])
    parser.add_argument("--data-path", default=str(ROOT.parent / "shared" / "data" / "zsre_eval.json"),
                        help="ZsRE records (default ../shared/data/zsre_eval.json; records 0-299 are for tuning)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    started = time.perf_counter()
    results = run_calls(args) if args.what == "calls" else run_weights(args)
    out = {"what": args.what, "records": f"zsre_eval.json {args.start}-{args.start + args.count - 1}",
           "chunk": args.chunk, "results": results, "torch_threads": torch.get_num_threads(),
           "wall_seconds": round(time.perf_counter() - started, 1)}
    path = Path(args.output or ROOT / "benchmarks" / "results" / f"easyedit_scale_{args.what}.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
