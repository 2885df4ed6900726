"""The side-by-side harness: one run = one method on one model, one record range and one evaluation -> one JSONL row.

:func:`run_one` loads the model once, the records and the probes (the same ``job.Probes`` as the main job:
requests, Factbook probes, held-out Wikipedia windows, WILD templates), measures the unedited model through the
before-evaluation cache (:mod:`crispedit_easyedit.bench.before_cache`), calls the method (``methods.get_method``)
once, or once per chunk of ``method.chunk_size`` requests on the same model (a sequential run, which also records
the retention curve: after each chunk, the teacher-forced reliability of every chunk edited so far), measures the
edited model with ``job.measure`` (the same evaluation for every method, EasyEdit's evaluator included when
``easyeditor`` imports), and appends one row to ``results_file``.

The config (a mapping; the Hydra app passes its composed config) has these sections, all optional
(:data:`DEFAULTS`): ``method`` (``name``, ``hparams``, ``overrides``, ``chunk_size``; other keys pass through to
the method; a null override keeps the hparams file's value), ``model`` (``name``, ``hparams_name``, ``cache_dir``, ``dtype``), ``dataset`` (``name``, ``path``,
``start``, ``count``), ``evaluation`` (``hparams``: the CrispEdit YAML whose max_length and EasyEdit fields the
evaluation reads, the same for every method; ``templates``, ``n_probes``, ``heldout_sequences``,
``heldout_seq_len``, ``eval_batch_size``, ``easyedit_metrics``) and the top-level ``seed``, ``device``,
``results_file``, ``before_cache``, ``before_cache_dir``, ``progress``.

A row (:data:`ROW_KEYS`): ``schema``, ``method``, ``setting`` (the method overrides and chunk size as one label),
``seed``, ``config`` (fully resolved), ``environment`` (versions, git commit), ``records`` (dataset, source,
range, counts, content hash), ``receipts`` (one per method call), ``before``/``after`` (every metric),
``comparison`` (``job.comparison_rows``), ``retention`` (sequential runs, else None), ``seconds`` per phase,
``memory`` (the process's peak so far, and ``runs_in_process``: in a multirun the peak includes earlier runs of the
same process), ``factbook_probes`` (asked, pool, dropped as leaking), ``factbook_changes`` (the probes an edit got
wrong or right, with both answers: ``probes.probe_changes``; None without probes), ``before_cache`` and
``finished``. Paths in a row are relative (``job.portable_path``); nothing absolute.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ROW_SCHEMA_VERSION = 1
ROW_KEYS = ("schema", "method", "setting", "seed", "config", "environment", "records", "receipts", "before",
            "after", "comparison", "retention", "seconds", "memory", "factbook_probes", "factbook_changes",
            "before_cache", "finished")
RECEIPT_KEYS = ("method", "settings", "seconds", "n_requests")
"""Keys every method's receipt has (``methods.base``)."""

DEFAULTS: dict[str, Any] = {
    "method": {"name": "crispedit", "hparams": None, "overrides": {}, "chunk_size": None},
    "model": {"name": "smollm2-135m-instruct-offline", "hparams_name": "SmolLM2-135M-Instruct", "cache_dir": None,
              "dtype": "float32"},
    "dataset": {"name": "zsre", "path": None, "start": 0, "count": 10},
    "evaluation": {"hparams": None, "templates": None, "n_probes": 240, "heldout_sequences": 16,
                   "heldout_seq_len": 256, "eval_batch_size": 16, "easyedit_metrics": True},
    "seed": 0,
    "device": "cpu",
    "results_file": "outputs/bench/results.jsonl",
    "before_cache": True,
    "before_cache_dir": None,
    "progress": True,
}
_OPEN_SECTIONS = ("method",)  # extra keys pass through to the method


def plain_config(config: Any) -> dict[str, Any]:
    """A plain, resolved dict from a mapping or an OmegaConf/Hydra config."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # Hydra is the bench extra; plain dicts work without it
        pass
    if not isinstance(config, Mapping):
        raise ValueError(f"the harness config must be a mapping, got a {type(config).__name__}")
    return copy.deepcopy(dict(config))


def resolve_config(config: Any) -> dict[str, Any]:
    """``config`` over :data:`DEFAULTS`, checked: sections are mappings, keys known (except in ``method``),
    ``dataset.count``/``method.chunk_size`` positive.

    Raises:
        ValueError: naming the bad key or value and the valid choices.
    """
    given = plain_config(config)
    out = copy.deepcopy(DEFAULTS)
    for key, value in given.items():
        if key in out and isinstance(out[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"config section {key!r} must be a mapping, got {value!r}")
            unknown = [k for k in value if k not in out[key]]
            if unknown and key not in _OPEN_SECTIONS:
                raise ValueError(f"unknown key {key}.{unknown[0]}; valid keys of {key!r}: {sorted(out[key])}")
            out[key].update(value)
        else:
            out[key] = value  # top-level keys (Hydra's own groups such as 'sweep' are kept as given)
    # a null override keeps the hparams file's value (the Hydra method files list sweepable keys as null)
    out["method"]["overrides"] = {k: v for k, v in (out["method"].get("overrides") or {}).items() if v is not None}
    chunk = out["method"].get("chunk_size")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"method.chunk_size must be null or an integer >= 1, got {chunk!r}")
    count = out["dataset"]["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"dataset.count must be an integer >= 1, got {count!r}")
    return out


def setting_label(cfg: Mapping[str, Any]) -> str:
    """The run's setting in one label: the method overrides (sorted) and the chunk size; "default" for none."""
    parts = [f"{k}={v}" for k, v in sorted(cfg["method"]["overrides"].items())]
    if cfg["method"].get("chunk_size"):
        parts.append(f"chunk_size={cfg['method']['chunk_size']}")
    return ", ".join(parts) or "default"


def portable(value: Any) -> Any:
    """``value`` with every absolute path string made relative (``job.portable_path``, else relative to the
    working directory), recursively."""
    from .job import portable_path

    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        made = portable_path(value)
        return made if not os.path.isabs(made) else os.path.relpath(value)
    return value


def git_state() -> dict[str, Any] | None:
    """The repository's commit and whether tracked files differ from it; None when git cannot tell."""
    from .job import REPO_ROOT

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but the seed need not fail without it
        pass


def _job_config(cfg: Mapping[str, Any]):
    """The main job's JobConfig for this run's model, records and evaluation (what ``job.measure`` reads)."""
    from .job import JobConfig
    from .methods import resolve_path

    ev, ds = cfg["evaluation"], cfg["dataset"]
    templates = ev.get("templates")
    return JobConfig(
        model=cfg["model"]["name"], hparams=str(resolve_path(ev["hparams"])) if ev.get("hparams") else None,
        dataset=ds["name"], data_path=ds.get("path"), start=int(ds["start"]), count=int(ds["count"]),
        device=cfg["device"], dtype=cfg["model"].get("dtype", "float32"),
        templates=tuple(templates) if templates else None, n_probes=int(ev["n_probes"]),
        heldout_sequences=int(ev["heldout_sequences"]), heldout_seq_len=int(ev["heldout_seq_len"]),
        eval_batch_size=int(ev["eval_batch_size"]), easyedit_metrics=bool(ev["easyedit_metrics"]),
        model_cache_dir=cfg["model"].get("cache_dir"), progress=bool(cfg["progress"]),
        before_cache=bool(cfg["before_cache"]), before_cache_dir=cfg.get("before_cache_dir"))


def chunk_reliability(model, tok, chunks: Sequence[Sequence[Mapping[str, Any]]], batch_size: int) -> list[float]:
    """Teacher-forced reliability (mean rewrite token accuracy) of each chunk of requests on ``model``."""
    from .evaluation import teacher_forced_accuracy

    flat = [r for chunk in chunks for r in chunk]
    scores = teacher_forced_accuracy(model, tok, [r["prompt"] for r in flat], [r["target_new"] for r in flat],
                                     batch_size=batch_size)
    out, start = [], 0
    for chunk in chunks:
        out.append(sum(scores[start : start + len(chunk)]) / len(chunk))
        start += len(chunk)
    return out


def records_digest(requests: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the requests' content (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(list(requests), sort_keys=True, default=str).encode()).hexdigest()


def run_one(config: Any) -> dict[str, Any]:
    """Run one method on one record range and append its row to ``config["results_file"]``.

    Returns:
        The row (see the module docstring).

    Raises:
        ValueError: a bad config (unknown method, key or value), before the model loads.
        FileNotFoundError: the method's hparams file or the records file does not exist, before the model loads.
    """
    from .data import load_requests
    from .job import (PhaseTimer, _portable_source, _public, build_probes, check_lengths, comparison_rows,
                      environment, load_hparams, measure, measure_before, peak_memory)
    from .methods import get_method, resolve_path
    from .models import load_model_and_tokenizer

    code = git_state()  # the code this run imports, taken before the run's minutes in which the tree may move on
    cfg = resolve_config(config)
    name = cfg["method"]["name"]
    method = get_method(name)
    if cfg["method"].get("hparams") and not resolve_path(cfg["method"]["hparams"]).is_file():
        raise FileNotFoundError(f"method.hparams {cfg['method']['hparams']!r} does not exist (relative paths are "
                                "taken from the working directory, then the repository root)")
    job_cfg = _job_config(cfg)
    eval_hparams = load_hparams(job_cfg.hparams, {}, cfg["device"])
    timer = PhaseTimer()
    with timer.phase("load records"):
        request_set = load_requests(job_cfg.dataset, job_cfg.data_path, job_cfg.start, job_cfg.count)
    with timer.phase("load model"):
        model, tok = load_model_and_tokenizer(job_cfg.model, device=cfg["device"], dtype=job_cfg.dtype,
                                              cache_dir=job_cfg.model_cache_dir)
    check_lengths(model, eval_hparams, job_cfg)
    with timer.phase("probes"):
        probes = build_probes(job_cfg, tok, request_set)
    measured = measure_before(model, tok, probes, job_cfg, eval_hparams, timer)
    requests = probes.requests
    size = cfg["method"].get("chunk_size") or len(requests)
    chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
    sequential = len(chunks) > 1
    retention = None
    if sequential:
        per_request = measured.metrics["_teacher_forced"]["rewrite"]
        bounds = [(i, min(i + size, len(requests))) for i in range(0, len(requests), size)]
        retention = {"chunk_size": size, "n_chunks": len(chunks),
                     "before": [sum(per_request[a:b]) / (b - a) for a, b in bounds], "after_chunk": []}
    _seed_everything(int(cfg["seed"]))
    receipts = []
    for index, chunk in enumerate(tqdm(chunks, desc=f"{name} chunks", unit="chunk",
                                       disable=not (cfg["progress"] and sequential))):
        call = dict(cfg["method"], chunk_index=index, sequential=sequential, seed=int(cfg["seed"]),
                    device=cfg["device"], progress=bool(cfg["progress"]))
        with timer.phase("edit"):
            outcome = method(model, tok, chunk, call)
        model = outcome.model
        receipts.append(outcome.receipt)
        if sequential:
            with timer.phase("evaluate retention"):
                retention["after_chunk"].append(chunk_reliability(model, tok, chunks[: index + 1],
                                                                  job_cfg.eval_batch_size))
    after = measure(model, tok, probes, job_cfg, eval_hparams, reference=measured.reference,
                    before=measured.metrics, timer=timer, label="after")
    env = environment()
    env["git"] = code
    row = {
        "schema": ROW_SCHEMA_VERSION,
        "method": name,
        "setting": setting_label(cfg),
        "seed": int(cfg["seed"]),
        "config": portable(cfg),
        "environment": env,
        "records": {"dataset": job_cfg.dataset, "source": _portable_source(job_cfg, request_set.source),
                    "start": job_cfg.start, "count": job_cfg.count, "n_edits": len(requests),
                    "n_skipped": request_set.n_skipped, "skipped": dict(request_set.skipped),
                    "sha256": records_digest(requests)},
        "receipts": portable(receipts),
        "before": _public(measured.metrics),
        "after": _public(after),
        "comparison": comparison_rows(measured.metrics, after),
        "retention": retention,
        "seconds": timer.seconds,
        "memory": dict(peak_memory(), runs_in_process=_count_run()),  # a process peak: one run per process to compare
        "factbook_probes": probes.probe_summary,
        "factbook_changes": _factbook_changes(probes, measured.metrics, after),
        "before_cache": {"hit": measured.cache_hit, "key": measured.key},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    append_row(cfg["results_file"], row)
    return row


def _factbook_changes(probes, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``probes.probe_changes`` of a run, or None when no probes were asked (or a cached before-evaluation from an
    older version holds no answers)."""
    from .probes import probe_changes

    if not probes.probes or "_factbook_answers" not in before or "_factbook_answers" not in after:
        return None
    return probe_changes(probes.probes, before["_factbook_answers"], after["_factbook_answers"])


_RUNS_IN_PROCESS = 0


def _count_run() -> int:
    """How many runs this process has made, this one included: the peak memory of a row is the process's peak, so
    it is the run's own only when this is 1 (a Hydra multirun makes all its runs in one process)."""
    global _RUNS_IN_PROCESS
    _RUNS_IN_PROCESS += 1
    return _RUNS_IN_PROCESS


def append_row(path: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Append ``row`` as one JSON line to ``path`` (folders created)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(row, sort_keys=False, default=str) + "\n")
    logger.info("%s (%s) on %s: appended a row to %s", row["method"], row["setting"], row["records"]["dataset"],
                path)
    return path


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a results file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON (naming the line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number} is not a JSON row: {exc}") from exc
    return rows
