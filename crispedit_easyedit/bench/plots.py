"""The kept/removed curvature-energy spectrum per edited layer, with the gamma cut (a PNG for the report)."""

from __future__ import annotations

import logging
import math
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
