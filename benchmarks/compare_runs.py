"""Side-by-side table of several `crispedit edit` runs (their result.json files) on the same records.

Usage: python benchmarks/compare_runs.py NAME=RUN_DIR [NAME=RUN_DIR ...]
Prints a markdown table: every metric row of the report, the unedited value once, then each run's edited value,
followed by per-run edit time, final loss, the K-FAC predicted loss increase, measured perplexity change and memory.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    args = parser.parse_args()
    results = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        results[name] = json.loads((Path(folder) / "result.json").read_text())
    first = next(iter(results.values()))
    for name, result in results.items():
        if result["requests"] != first["requests"]:
            raise SystemExit(f"run {name!r} edited other records than the first run: {result['requests']}")
    print("| group | metric | unedited | " + " | ".join(results) + " |")
    print("|---|---|---|" + "---|" * len(results))
    for i, row in enumerate(first["rows"]):
        edited = " | ".join(fmt(r["rows"][i]["after"]) for r in results.values())
        print(f"| {row['group']} | {row['metric']} | {fmt(row['before'])} | {edited} |")
    print()
    print("| run | edit seconds | final loss | K-FAC predicted loss increase (nats/token) | measured ln(ppl ratio) | "
          "peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cap_before, cap_after = r["before"]["capability"], r["after"]["capability"]
        measured = math.log(cap_after["heldout_perplexity"] / cap_before["heldout_perplexity"])
        print(f"| {name} | {r['seconds']['edit']:.0f} | {r['edit']['final_loss']:.4f} | "
              f"{r['edit']['predicted_loss_increase']:.5f} | {measured:.5f} | {r['memory'].get('peak_rss_gib')} |")


if __name__ == "__main__":
    main()
