"""Run EasyEdit's own baselines (the harness methods ``easyedit-*``) on the offline SmolLM2 and print a table.

Each method edits a freshly loaded SmolLM2-135M-Instruct with ZsRE requests (default: ``zsre_eval.json`` records
0-9, the tuning range) through the harness signature ``method(model, tok, requests, config)``; teacher-forced
rewrite / rephrase / locality accuracy are measured with ``crispedit_easyedit.bench.evaluation.teacher_forced_scores``
before and after; ``ee_rewrite`` is EasyEdit's own post-edit rewrite accuracy from ``batch_edit`` (its metric, for
a cross-check), ``pre`` the rewrite accuracy before the edit.

Usage (in the environment built by ``benchmarks/easyedit_main_env.sh``)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 EASYEDIT_PATH=<EasyEdit main checkout> \\
        PYTHONPATH=<this repository> <venv>/bin/python benchmarks/check_easyedit_baselines.py \\
        --data <shared>/data/zsre_eval.json [--methods easyedit-memit easyedit-ft] [--json out.json] \\
        [--override easyedit-ultraedit:lr=1e-3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from crispedit_easyedit.bench.data import load_requests  # noqa: E402
from crispedit_easyedit.bench.evaluation import teacher_forced_scores  # noqa: E402
from crispedit_easyedit.bench.methods import get_method  # noqa: E402
from crispedit_easyedit.bench.models import load_model_and_tokenizer  # noqa: E402

logger = logging.getLogger("check_easyedit_baselines")

ALL_METHODS = ("easyedit-memit", "easyedit-alphaedit", "easyedit-ultraedit", "easyedit-ft", "easyedit-lora")


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD:KEY=VALUE`` items -> ``{method: {key: value}}`` (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or method not in ALL_METHODS:
            raise SystemExit(f"--override {item!r}: use METHOD:KEY=VALUE with METHOD one of {list(ALL_METHODS)}")
        out.setdefault(method, {})[key] = yaml.safe_load(value)
    return out


def run_one(name: str, requests: list[dict[str, Any]], config: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Edit a fresh model with ``name``; returns the scores before/after and the receipt's essentials."""
    model, tok = load_model_and_tokenizer(model_name)
    pre = teacher_forced_scores(model, tok, requests)
    start = time.perf_counter()
    outcome = get_method(name)(model, tok, requests, config)
    wall = time.perf_counter() - start
    post = teacher_forced_scores(outcome.model, tok, requests, pre=pre)
    receipt = outcome.receipt
    stats = receipt.get("statistics") or {}
    return {"method": name, "pre_rewrite": pre["rewrite_acc"], "rewrite": post["rewrite_acc"],
            "rephrase": post["rephrase_acc"], "locality": post["locality_acc"], "wall_s": wall,
            "seconds": receipt["seconds"], "samples": stats.get("samples"), "stats_layers": stats.get("layers"),
            "patches": [p["name"] for p in receipt["patches"]], "easyedit_commit": receipt["easyedit"]["commit"],
            "hparams_path": receipt["hparams_path"], "overrides": config.get("overrides", {}),
            "easyedit_post_rewrite": receipt["easyedit_metrics"]["post_rewrite_acc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="ZsRE records (.json), e.g. shared/data/zsre_eval.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--stats-dir", default=None, help="statistics cache (default: the adapters' default)")
    parser.add_argument("--override", action="append", default=[], help="METHOD:KEY=VALUE hparams override")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = parse_overrides(args.override)
    requests = list(load_requests("zsre", args.data, args.start, args.count))
    rows = []
    for name in args.methods:
        config: dict[str, Any] = {"chunk_index": 0, "sequential": False, "overrides": overrides.get(name, {})}
        if args.stats_dir:
            config["stats_dir"] = args.stats_dir
        logger.info("running %s on %d requests", name, len(requests))
        rows.append(run_one(name, requests, config, args.model))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = (f"{'method':<20} {'pre':>5} {'rewrite':>7} {'rephrase':>8} {'locality':>8} {'stats_s':>7} "
              f"{'edit_s':>7} {'samples':>7} {'ee_rewrite':>10}")
    lines = [f"{len(requests)} ZsRE edits (records {args.start}-{args.start + len(requests) - 1}), "
             f"EasyEdit {rows[0]['easyedit_commit'] if rows else '?'}", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<20} {fmt(r['pre_rewrite']):>5} {fmt(r['rewrite']):>7} {fmt(r['rephrase']):>8} "
                     f"{fmt(r['locality']):>8} {r['seconds']['statistics']:>7.1f} {r['seconds']['edit']:>7.1f} "
                     f"{r['samples'] if r['samples'] is not None else '-':>7} {fmt(r['easyedit_post_rewrite']):>10}")
    print("\n".join(lines))  # the script's final table
    return 0


if __name__ == "__main__":
    sys.exit(main())
