"""``crispedit-bench-report RESULTS.jsonl --out DIR``: a results file of the harness -> a markdown table and plots.

The table has one row per run: method, setting, seed, dataset, number of edits, then reliability, generalisation
and locality each as "teacher-forced / WILD qa / none / chat" (the paper's WILD "contains" metric beside the
teacher-forced token accuracy; locality: teacher-forced tokens unchanged and greedy answers unchanged), the held-out
perplexity change (%), the next-token KL to the unedited model, the Factbook probe accuracy change, the edit seconds
(all method calls) and the peak memory (shown only for a row that was the only run of its process).

Plots (PNG beside ``report.md``, only for what the file holds):

* ``pareto-<dataset>-n<N>.png`` for every (dataset, number of edits) present: edit success (mean of teacher-forced
  reliability and generalisation) against capability drift (held-out KL; the perplexity change when no KL), one
  point per method and setting (seeds averaged), the Pareto front marked; the report lists which points are not on
  it;
* ``gamma-sweep.png`` when a method and setting ran at two or more energy thresholds (paper Table 8 analogue);
* ``n-sweep.png`` when a method and setting ran at two or more numbers of edits (Table 7 analogue);
* ``retention.png`` for sequential runs: the reliability of each chunk after each later chunk (Figure 7 analogue),
  beside a table of the same numbers and each run's sequential edit seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATES = ("qa", "none", "chat")


@dataclass
class RunSummary:
    """The numbers of one row that the table and plots use (None where the run did not measure it)."""

    method: str
    setting: str
    seed: int
    dataset: str
    n_edits: int
    gamma: float | None
    chunk_size: int | None
    sweep_setting: str  # the setting without energy_threshold (groups the gamma sweep)
    reliability: dict[str, float | None] = field(default_factory=dict)  # "tf", "qa", "none", "chat"
    generalization: dict[str, float | None] = field(default_factory=dict)
    locality: dict[str, float | None] = field(default_factory=dict)
    perplexity_change_pct: float | None = None
    kl: float | None = None
    factbook_change: float | None = None
    edit_seconds: float | None = None
    peak_memory_gib: float | None = None
    retention: dict[str, Any] | None = None

    @property
    def edit_success(self) -> float | None:
        """Mean of teacher-forced reliability and generalisation (reliability alone without rephrases)."""
        values = [v for v in (self.reliability.get("tf"), self.generalization.get("tf")) if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def wild_success(self) -> float | None:
        """The paper's metric: mean of WILD qa-template reliability and generalisation ("contains")."""
        values = [v for v in (self.reliability.get("qa"), self.generalization.get("qa")) if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def tuning_score(self) -> float | None:
        """What the tuning protocol maximises: the mean of edit success (TF) and WILD qa success."""
        values = [v for v in (self.edit_success, self.wild_success) if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def drift(self) -> float | None:
        """Capability drift: the held-out KL, else the perplexity change (%)."""
        return self.kl if self.kl is not None else self.perplexity_change_pct

    @property
    def label(self) -> str:
        return self.method if self.setting == "default" else f"{self.method} ({self.setting})"


def summarize(row: Mapping[str, Any]) -> RunSummary:
    """The table's numbers of one harness row."""
    before, after = row["before"], row["after"]
    overrides = dict(row["config"]["method"].get("overrides") or {})
    settings = (row["receipts"][0].get("settings") or {}) if row.get("receipts") else {}
    chunk = row["config"]["method"].get("chunk_size")
    sweep_parts = [f"{k}={v}" for k, v in sorted(overrides.items()) if k != "energy_threshold"]
    if chunk:
        sweep_parts.append(f"chunk_size={chunk}")
    tf, wild = after["teacher_forced"], after["wild"]["per_template"]
    summary = RunSummary(
        method=row["method"], setting=row["setting"], seed=int(row.get("seed", 0)),
        dataset=row["records"]["dataset"], n_edits=int(row["records"]["n_edits"]),
        gamma=settings.get("energy_threshold"), chunk_size=chunk,
        sweep_setting=", ".join(sweep_parts) or "default")
    summary.reliability["tf"] = tf.get("reliability")
    summary.generalization["tf"] = tf.get("generalization")
    summary.locality["tf"] = tf.get("locality_unchanged_tokens")
    for template in TEMPLATES:
        scores = wild.get(template) or {}
        summary.reliability[template] = scores.get("reliability_contains")
        summary.generalization[template] = scores.get("generalization_contains")
        summary.locality[template] = scores.get("locality_unchanged")
    cb, ca = before["capability"], after["capability"]
    if cb.get("heldout_perplexity") and ca.get("heldout_perplexity") is not None:
        summary.perplexity_change_pct = 100 * (ca["heldout_perplexity"] - cb["heldout_perplexity"]) / cb[
            "heldout_perplexity"]
    summary.kl = ca.get("heldout_kl")
    if cb.get("factbook_accuracy") is not None and ca.get("factbook_accuracy") is not None:
        summary.factbook_change = ca["factbook_accuracy"] - cb["factbook_accuracy"]
    summary.edit_seconds = row.get("seconds", {}).get("edit")
    memory = row.get("memory") or {}
    if memory.get("runs_in_process", 1) == 1:  # a later run of a multirun process reports earlier runs' peaks too
        summary.peak_memory_gib = memory.get("peak_cuda_gib", memory.get("peak_rss_gib"))
    summary.retention = row.get("retention")
    return summary


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _quad(values: Mapping[str, float | None]) -> str:
    return " / ".join(_fmt(values.get(k)) for k in ("tf", *TEMPLATES))


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """One row per run (see the module docstring)."""
    header = ("| method | setting | seed | dataset | n | reliability TF / qa / none / chat | "
              "generalisation TF / qa / none / chat | locality TF / qa / none / chat | perplexity change % | KL | "
              "Factbook acc. change | edit s | peak GiB |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in runs:
        lines.append(f"| {r.method} | {r.setting} | {r.seed} | {r.dataset} | {r.n_edits} | {_quad(r.reliability)} | "
                     f"{_quad(r.generalization)} | {_quad(r.locality)} | {_fmt(r.perplexity_change_pct, 2, True)} | "
                     f"{_fmt(r.kl, 4)} | {_fmt(r.factbook_change, 3, True)} | {_fmt(r.edit_seconds, 1)} | "
                     f"{_fmt(r.peak_memory_gib, 2)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Pareto front


@dataclass
class ParetoPoint:
    """One method/setting on one (dataset, n): seed-averaged edit success and capability drift."""

    label: str
    success: float
    drift: float
    on_front: bool = False


def pareto_points(runs: Sequence[RunSummary], success: str = "edit_success") -> list[ParetoPoint]:
    """One point per method/setting (seeds averaged); ``on_front``: no other point has success >= and drift <=
    with one of them strictly better. Runs without the success measure or drift are left out.

    Args:
        success: the RunSummary property on the y axis: "edit_success" (teacher-forced) or "wild_success" (WILD qa).
    """
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for r in runs:
        if getattr(r, success) is not None and r.drift is not None:
            groups[r.label].append(r)
    points = [ParetoPoint(label, sum(getattr(r, success) for r in rs) / len(rs), sum(r.drift for r in rs) / len(rs))
              for label, rs in groups.items()]
    for p in points:
        p.on_front = not any(q.success >= p.success and q.drift <= p.drift and (q.success > p.success or
                                                                                 q.drift < p.drift)
                             for q in points if q is not p)
    return points


def _mean_of(runs: Sequence[RunSummary], attr: str) -> float | None:
    """Mean of ``attr`` over the runs that measured it (seeds averaged); None when none did."""
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return sum(values) / len(values) if values else None


MAX_TUNING_PERPLEXITY_CHANGE_PCT = 2.0
"""The tuning protocol's capability bound: a setting whose held-out perplexity rises more is not chosen."""

MAX_TUNING_FACTBOOK_DROP = 0.05
"""The tuning protocol's bound on question answering: a setting that loses more Factbook probe accuracy (5 points;
2 of the fast evaluation's 40 probes) is not chosen. Perplexity alone misses it: an edit trained in the QA and chat
formats can answer every question with an edit target while Wikipedia perplexity stays flat."""


def _within_capability_bounds(ppl: float | None, factbook: float | None, max_ppl: float) -> bool:
    return (ppl is None or ppl <= max_ppl) and (factbook is None or factbook >= -MAX_TUNING_FACTBOOK_DROP - 1e-12)


def tuning_choices(runs: Sequence[RunSummary],
                   max_perplexity_change_pct: float = MAX_TUNING_PERPLEXITY_CHANGE_PCT) -> list[tuple[str, str, str]]:
    """The tuning protocol's choice per (method, dataset, n) with two or more settings: the setting with the highest
    ``tuning_score`` among those whose perplexity change is at most ``max_perplexity_change_pct`` and whose Factbook
    accuracy falls at most ``MAX_TUNING_FACTBOOK_DROP`` (seeds averaged); when none is, the one with the smallest
    perplexity change.

    Returns:
        ``(task, method, "setting: why")`` rows, sorted.
    """
    groups: dict[tuple[str, str, int], dict[str, list[RunSummary]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r.method, r.dataset, r.n_edits)][r.setting].append(r)
    out = []
    for (method, dataset, n), settings in sorted(groups.items()):
        if len(settings) < 2:
            continue
        scored = [(s, _mean_of(rs, "tuning_score"), _mean_of(rs, "perplexity_change_pct"),
                   _mean_of(rs, "factbook_change")) for s, rs in settings.items()]
        allowed = [x for x in scored
                   if x[1] is not None and _within_capability_bounds(x[2], x[3], max_perplexity_change_pct)]
        if allowed:
            setting, score, ppl, _ = max(allowed, key=lambda x: x[1])
            why = f"score {score:.3f}, perplexity {_fmt(ppl, 2, True)}% (of {len(scored)} settings)"
        else:
            setting, score, ppl, _ = min(scored, key=lambda x: float("inf") if x[2] is None else x[2])
            why = (f"no setting kept perplexity within +{max_perplexity_change_pct}% and Factbook accuracy within "
                   f"-{MAX_TUNING_FACTBOOK_DROP}: the smallest perplexity change {_fmt(ppl, 2, True)}%")
        out.append((f"{dataset} n={n}", method, f"{setting}: {why}"))
    return out


def _sweep_series(runs: Sequence[RunSummary], x: str, group_key) -> dict[str, list[RunSummary]]:
    """Runs grouped by ``group_key``, keeping groups with two or more distinct values of attribute ``x``, each
    sorted by ``x``."""
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for r in runs:
        if getattr(r, x) is not None:
            groups[group_key(r)].append(r)
    return {key: sorted(rs, key=lambda r: getattr(r, x)) for key, rs in groups.items()
            if len({getattr(r, x) for r in rs}) >= 2}


def gamma_series(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """Gamma sweeps: same method, setting (gamma aside), dataset and n; two or more gammas."""
    return _sweep_series(runs, "gamma", lambda r: f"{r.method} ({r.sweep_setting}) {r.dataset} n={r.n_edits}")


def n_series(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """Number-of-edits sweeps: same method, setting and dataset; two or more n."""
    return _sweep_series(runs, "n_edits", lambda r: f"{r.label} {r.dataset}")


# ------------------------------------------------------------------------------------------------------------------
# The report


def build_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Write ``report.md`` and the PNG plots for ``rows`` into ``out_dir``; returns the report's path.

    Raises:
        ValueError: no rows.
    """
    from . import plots

    if not rows:
        raise ValueError("the results file holds no rows; run crispedit-bench first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [summarize(row) for row in rows]
    lines = [f"# Side-by-side results ({len(runs)} runs)", "",
             "Edit metrics: teacher-forced token accuracy (TF) / WILD 'contains' with the qa, none and chat templates "
             "(greedy answers). Locality: TF tokens unchanged / greedy answers unchanged. Capability: held-out "
             "Wikipedia perplexity change, next-token KL(before || after), Factbook probe accuracy change. "
             "'-': not measured.", "", markdown_table(runs), ""]
    by_task: dict[tuple[str, int], list[RunSummary]] = defaultdict(list)
    for r in runs:
        by_task[(r.dataset, r.n_edits)].append(r)
    lines += ["## Pareto fronts (edit success vs capability drift)", "",
              "Edit success: mean of reliability and generalisation, teacher-forced (TF) and, in the second chart, "
              "WILD qa 'contains' (the paper's metric). Drift: held-out KL (perplexity change % where no KL). One "
              "point per method/setting, seeds averaged.", ""]
    for (dataset, n), task_runs in sorted(by_task.items()):
        drift_label = ("held-out KL" if all(r.kl is not None for r in task_runs)
                       else "capability drift (KL or perplexity change %)")
        for success, kind, prefix in (("edit_success", "teacher-forced", "pareto"),
                                      ("wild_success", "WILD qa (the paper's metric)", "pareto-wild")):
            points = pareto_points(task_runs, success)
            if not points:
                continue
            name = f"{prefix}-{dataset}-n{n}.png"
            plots.plot_pareto(points, out / name, title=f"{dataset}, {n} edits: {kind} success vs capability drift",
                              drift_label=drift_label, success_label=f"edit success ({kind})")
            front = sorted(p.label for p in points if p.on_front)
            off = sorted(p.label for p in points if not p.on_front)
            lines += [f"### {dataset}, {n} edits, {kind}", "", f"![Pareto front]({name})", "",
                      f"On the front: {', '.join(front)}.", "",
                      f"Not on the front: {', '.join(off) if off else 'none'}.", ""]
    choices = tuning_choices(runs)
    if choices:
        lines += ["## Tuning choices", "",
                  f"Per method and task with two or more settings: the highest tuning score (mean of TF edit success "
                  f"and WILD qa success) among settings whose perplexity rises at most "
                  f"{MAX_TUNING_PERPLEXITY_CHANGE_PCT}% and whose Factbook probe accuracy falls at most "
                  f"{MAX_TUNING_FACTBOOK_DROP}.", "", "| task | method | chosen setting |", "|---|---|---|"]
        lines += [f"| {task} | {method} | {choice} |" for task, method, choice in choices]
        lines.append("")
    gammas = gamma_series(runs)
    if gammas:
        plots.plot_sweep(gammas, "gamma", "energy threshold gamma", out / "gamma-sweep.png",
                         title="Metrics against gamma (paper Table 8 analogue)")
        lines += ["## Gamma sweep", "", "![gamma sweep](gamma-sweep.png)", ""]
    ns = n_series(runs)
    if ns:
        plots.plot_sweep(ns, "n_edits", "number of edits", out / "n-sweep.png",
                         title="Metrics against the number of edits (paper Table 7 analogue)")
        lines += ["## Number-of-edits sweep", "", "![n sweep](n-sweep.png)", ""]
    sequential = [r for r in runs if r.retention]
    if sequential:
        plots.plot_retention(sequential, out / "retention.png")
        lines += ["## Retention in sequential runs", "",
                  "Teacher-forced reliability of each chunk after each later chunk (paper Figure 7 analogue).", "",
                  retention_table(sequential), "", "![retention](retention.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    logger.info("wrote %s", path)
    return path


def retention_table(runs: Sequence[RunSummary]) -> str:
    """Markdown table of sequential runs: each chunk's teacher-forced reliability before editing and after the last
    chunk, the first chunk's after every chunk (how fast early edits are forgotten), their mean after the last chunk,
    and the edit seconds of all chunks (the sequential wall time)."""
    lines = ["| method | setting | seed | n | chunk size | chunk reliability before | after the last chunk "
             "(chunk 1 ... last) | chunk 1 after each chunk | mean after the last chunk | edit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        retention = run.retention
        last = retention["after_chunk"][-1]
        first = [after[0] for after in retention["after_chunk"]]
        lines.append(f"| {run.method} | {run.setting} | {run.seed} | {run.n_edits} | {retention['chunk_size']} | "
                     f"{' / '.join(_fmt(v) for v in retention['before'])} | {' / '.join(_fmt(v) for v in last)} | "
                     f"{' -> '.join(_fmt(v) for v in first)} | {_fmt(sum(last) / len(last))} | "
                     f"{_fmt(run.edit_seconds, 1)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``crispedit-bench-report RESULTS.jsonl [MORE.jsonl ...] --out DIR``: one report over the rows of every file
    (e.g. the 100- and the 300-edit files together draw the number-of-edits sweep)."""
    from .harness import read_rows

    parser = argparse.ArgumentParser(prog="crispedit-bench-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results files written by crispedit-bench (JSON lines)")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_report([row for results in args.results for row in read_rows(results)], args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"crispedit-bench-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
