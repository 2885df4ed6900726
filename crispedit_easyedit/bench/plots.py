"""The kept/removed curvature-energy spectrum per edited layer, with the gamma cut (a PNG for the report)."""

from __future__ import annotations

import logging
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch

from ..projector import KroneckerProjector

logger = logging.getLogger(__name__)


def energy_spectrum(projector: KroneckerProjector) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cumulative energy of the Kronecker eigenvalue products in decreasing order.

    Returns:
        (directions 1..n, cumulative energy fraction (n,), number of removed directions).
    """
    eig_out = projector.eig_out if projector.eig_out is not None else torch.ones(projector.shape[0])
    products = (eig_out[:, None].double().cpu() * projector.eig_in[None, :].double().cpu()).flatten()
    ordered = torch.sort(products, descending=True).values
    total = float(ordered.sum())
    cumulative = torch.cumsum(ordered, 0) / (total if total > 0 else 1.0)
    return torch.arange(1, ordered.numel() + 1), cumulative, int((~projector.mask).sum())


def plot_energy_spectra(projectors: Mapping[str, KroneckerProjector], path: str | Path, title: str = "") -> Path:
    """One curve per layer: cumulative share of curvature energy held by the top-k Kronecker directions (log k),
    with a marker where the energy rule cuts (directions left of it are removed, the rest are kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, projector in projectors.items():
        k, cumulative, removed = energy_spectrum(projector)
        # thin the curve to ~2000 log-spaced points: a million points add nothing to an 8-inch plot
        idx = torch.unique(torch.logspace(0, math.log10(k.numel()), 2000).long().clamp(1, k.numel())) - 1
        label = f"{name} (removed {removed:,} of {k.numel():,})"
        line, = ax.plot(k[idx].numpy(), cumulative[idx].numpy(), label=label)
        if removed > 0:
            ax.scatter([removed], [float(cumulative[removed - 1])], color=line.get_color(), zorder=3)
    gammas = {p.gamma for p in projectors.values()}
    for gamma in gammas:
        ax.axhline(gamma, color="grey", linestyle="--", linewidth=0.8)
        ax.text(1, gamma, f" gamma = {gamma}", va="top", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("number of top Kronecker directions (log scale)")
    ax.set_ylabel("cumulative share of curvature energy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "K-FAC curvature spectrum per edited layer: removed left of the dot, kept right")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote energy spectrum plot %s", path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# The side-by-side report (crispedit_easyedit.bench.report)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    logger.info("wrote plot %s", path)
    return path


def pareto_key(points, width: int = 130) -> list[str]:
    """The key of a Pareto chart: ``"i: label"`` for the i-th point (from 1), wrapped at ``width`` characters with
    continuation lines indented. The chart marks each point with its number only, so that long settings neither
    hide one another nor squeeze the axes."""
    return [textwrap.fill(f"{index}: {p.label}", width, subsequent_indent="    ")
            for index, p in enumerate(points, start=1)]


def plot_pareto(points, path: str | Path, title: str = "", drift_label: str = "held-out KL",
                success_label: str = "edit success: mean TF reliability and generalisation") -> Path:
    """Edit success (y) against capability drift (x), one numbered point per method/setting with the key
    (:func:`pareto_key`) below the axes; points on the Pareto front (``report.ParetoPoint.on_front``) are filled
    and joined, the others hollow."""
    plt = _pyplot()
    key = pareto_key(points)
    key_height = 0.3 + 0.14 * sum(entry.count("\n") + 1 for entry in key)  # inches, about one line of 7 pt each
    fig, (ax, key_ax) = plt.subplots(2, 1, figsize=(9, 5 + key_height),
                                     gridspec_kw={"height_ratios": [5, key_height]})
    for index, p in enumerate(points, start=1):
        ax.scatter([p.drift], [p.success], s=60, zorder=3, facecolors="C0" if p.on_front else "none",
                   edgecolors="C0")
        ax.annotate(str(index), (p.drift, p.success), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((p for p in points if p.on_front), key=lambda p: p.drift)
    if len(front) > 1:
        ax.plot([p.drift for p in front], [p.success for p in front], color="C0", linestyle="--", linewidth=1,
                label="Pareto front")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(f"capability drift: {drift_label} (lower is better)")
    ax.set_ylabel(success_label)
    ax.set_title(title or "Edit success vs capability drift")
    ax.grid(alpha=0.3)
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key), va="top", ha="left", fontsize=7, transform=key_ax.transAxes)
    return _save(fig, path)


_SWEEP_PANELS = (("reliability (TF)", lambda r: r.reliability.get("tf")),
                 ("reliability (WILD qa)", lambda r: r.reliability.get("qa")),
                 ("generalisation (TF)", lambda r: r.generalization.get("tf")),
                 ("locality tokens unchanged (TF)", lambda r: r.locality.get("tf")),
                 ("perplexity change %", lambda r: r.perplexity_change_pct),
                 ("held-out KL", lambda r: r.kl))


def sweep_points(runs, x: str, value) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """The points of one sweep line: the distinct values of attribute ``x``, sorted; at each, the mean of ``value(run)``
    over its runs (seeds); and every single run's ``(x, value)`` where an ``x`` has more than one run. Runs whose
    value is None are left out."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        measured = value(run)
        if measured is not None:
            by_x[getattr(run, x)].append(measured)
    xs = sorted(by_x)
    singles = [(at, v) for at in xs if len(by_x[at]) > 1 for v in by_x[at]]
    return xs, [sum(by_x[at]) / len(by_x[at]) for at in xs], singles


def plot_sweep(series, x: str, x_label: str, path: str | Path, title: str = "") -> Path:
    """One panel per metric (reliability, generalisation, locality, perplexity change, KL) against attribute ``x``
    of ``report.RunSummary``; one line per series (``{label: runs sorted by x}``) through the mean over the runs
    (seeds) at each ``x``, and a faint dot per run where there are several."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_SWEEP_PANELS), figsize=(4 * len(_SWEEP_PANELS), 3.6))
    for ax, (name, value) in zip(axes, _SWEEP_PANELS):
        for label, runs in series.items():
            xs, means, singles = sweep_points(runs, x, value)
            if xs:
                (line,) = ax.plot(xs, means, marker="o", label=label)
                if singles:
                    ax.scatter(*zip(*singles), s=12, alpha=0.4, color=line.get_color())
        ax.set_xlabel(x_label)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"Metrics against {x_label}")
    return _save(fig, path)


def plot_retention(runs, path: str | Path) -> Path:
    """One panel per sequential run: the teacher-forced reliability of chunk j (one line each, starting at its
    unedited value) after each chunk k >= j."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        retention = run.retention
        after = retention["after_chunk"]
        for j in range(retention["n_chunks"]):
            xs = [0] + [k + 1 for k in range(j, len(after))]
            ys = [retention["before"][j]] + [after[k][j] for k in range(j, len(after))]
            ax.plot(xs, ys, marker="o", label=f"chunk {j + 1}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("chunks edited (0 = unedited)")
        ax.set_ylabel("TF reliability of the chunk")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{run.label}, {run.dataset}, {run.n_edits} edits", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
