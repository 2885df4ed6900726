"""``crispedit-bench``: the side-by-side harness as a Hydra app (config package ``crispedit_easyedit/bench/conf``).

Every run composes the groups ``method``, ``model``, ``dataset``, ``evaluation`` (and optionally a ``sweep``
preset), calls :func:`crispedit_easyedit.bench.harness.run_one` and appends its row to ``results_file``::

    crispedit-bench method=ft dataset=counterfact dataset.count=100
    crispedit-bench --multirun method.overrides.energy_threshold=0.9,0.99 dataset.count=10,20
    crispedit-bench sweep=gamma
    crispedit-bench --cfg job            # print the composed config and stop

Hydra keeps its own logs and config copies under ``outputs/bench/hydra*/`` (``hydra.run.dir``/``hydra.sweep.dir``)
and does not change the working directory, so relative paths (``results_file``, ``hparams_root``) are relative to
where the command runs. ``python -m crispedit_easyedit.bench.hydra_app`` works the same without the console script.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting slow torch down many times over on a shared few-core machine (see cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

logger = logging.getLogger("crispedit_easyedit.bench.hydra_app")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one composed config through the harness and print its one-line result."""
    from .harness import run_one

    row = run_one(cfg)
    after, before = row["after"]["teacher_forced"], row["before"]["teacher_forced"]
    capability = row["after"]["capability"]
    print(f"{row['method']} ({row['setting']}) on {row['records']['dataset']} x{row['records']['n_edits']}: "
          f"reliability {before['reliability']:.3f} -> {after['reliability']:.3f}, KL "
          f"{capability.get('heldout_kl', float('nan')):.4f}; edit {row['seconds'].get('edit', 0.0):.1f}s; "
          f"row appended to {cfg.results_file}")


if __name__ == "__main__":
    main()
