"""The main job as a library: load a model, edit it with CrispEdit on benchmark records, and measure what the edit
achieved and what it cost the model, before and after, on the same model object.

The CLI (``crispedit_easyedit.bench.cli``) is a thin layer over :func:`run_edit_job` and :func:`run_eval_job`; the
benchmarks call the same functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .. import __version__
from ..editing import apply_crispedit, check_edit_inputs, edit_targets
from ..state import capability_curvature
from ..hparams import CrispEditHyperParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct-offline"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"
SAVE_MODES = ("none", "delta", "full")


class UsageError(ValueError):
    """A problem with what the job was asked to do (a bad option, file, record range or layer), found before any
    work: the CLI reports it as an argument error (exit 2); every other failure is a job failure (exit 1)."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Re-raise ValueError, KeyError and FileNotFoundError (and OSError of a missing model) as UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(message) from exc


@contextmanager
def unwritable_as_usage_error() -> Iterator[None]:
    """Re-raise NotWritableError (e.g. a read-only cache_dir, found before the collection) as UsageError."""
    from ..checks import NotWritableError

    try:
        yield
    except NotWritableError as exc:
        raise UsageError(str(exc)) from exc


@dataclass
class JobConfig:
    """Everything the main job needs; every field has a CLI option of the same name."""

    model: str | None = None
    hparams: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # None: crispedit_easyedit.bench.data.default_dataset(data_path)
    data_path: str | None = None
    start: int = 0
    count: int = 10
    output_dir: str | None = None
    device: str | None = None
    dtype: str = "float32"
    templates: tuple[str, ...] | None = None
    n_probes: int = 240
    heldout_sequences: int = 16
    heldout_seq_len: int = 256
    eval_batch_size: int = 16
    easyedit_metrics: bool = True
    lm_eval_tasks: tuple[str, ...] = ()
    save: str = "none"
    model_cache_dir: str | None = None
    progress: bool = True
    before_cache: bool = True  # reuse the unedited model's evaluation across runs (bench.before_cache)
    before_cache_dir: str | None = None  # None: bench.before_cache.default_cache_dir()

    def __post_init__(self) -> None:
        if self.dataset is None:
            from .data import default_dataset

            self.dataset = default_dataset(self.data_path)
        if self.save not in SAVE_MODES:
            raise ValueError(f"save must be one of {SAVE_MODES}, got {self.save!r}")
        for name in ("count", "n_probes", "heldout_sequences", "heldout_seq_len", "eval_batch_size"):
            if getattr(self, name) < 0 or (name != "n_probes" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start!r}")


# ------------------------------------------------------------------------------------------------------------------
# Phases, timing and memory


class PhaseTimer:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        logger.info("phase: %s", name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 2)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GiB), and peak CUDA memory when CUDA is in use."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def environment() -> dict[str, Any]:
    """Library versions and machine facts recorded with every result."""
    import transformers

    versions = {"crispedit_easyedit": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions["easyeditor"] = version("easyeditor")
    except PackageNotFoundError:
        versions["easyeditor"] = None
    return {"versions": versions, "platform": platform.platform(), "cpu_count": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------------------------------
# Set-up


def load_hparams(path: str | None, overrides: Mapping[str, Any], device: str | None = None) -> CrispEditHyperParams:
    """CrispEditHyperParams from a YAML file (default: the SmolLM2 file), with ``key=value`` overrides applied."""
    path = Path(path) if path else DEFAULT_HPARAMS
    if not path.exists() and not path.with_suffix(".yaml").exists():
        raise FileNotFoundError(f"hparams file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"--hparams {str(path)!r} is a folder; give a YAML file such as "
                         f"hparams/CrispEdit/{DEFAULT_HPARAMS.name}")
    import yaml

    try:
        hparams = CrispEditHyperParams.from_hparams(str(path))
    except yaml.YAMLError as exc:
        raise ValueError(f"hparams file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    values = hparams.to_dict()
    values.update(overrides)
    if device is not None:
        values["device"] = device
    return CrispEditHyperParams.from_dict(values)


def portable_path(path: str | Path) -> str:
    """A path for result files without this machine's layout: relative to the working directory when the file is
    inside it or next to it (``../shared/...``), else with the home folder written as ``~``."""
    import os

    given = Path(path).expanduser()
    candidates = (given.absolute(), given.resolve())  # as written, and with symlinks resolved (../shared may be one)
    for absolute in candidates:
        relative = os.path.relpath(absolute, Path.cwd())
        if not relative.startswith(os.pardir + os.sep + os.pardir):
            return relative
    for home in (Path.home(), Path.home().resolve()):
        for absolute in candidates:
            if absolute.is_relative_to(home):
                return f"~/{absolute.relative_to(home).as_posix()}"
    return str(path)


def model_name(cfg: JobConfig, hparams) -> str:
    """The model to load: ``cfg.model`` (``--model``) if given, else the hparams file's ``model_name``."""
    if cfg.model:
        return cfg.model
    if not isinstance(hparams.model_name, str):
        raise UsageError("the hparams model_name is not a name or path; pass --model")
    return hparams.model_name


def heldout_batches(tok, size: int, n: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Held-out Wikipedia windows (never seen by the curvature statistics) in batches of ``size``."""
    from ..corpora import heldout_sequences

    packed = heldout_sequences("wikipedia-offline", tok, seq_len, n)
    return [{k: v[i : i + size] for k, v in packed.items()} for i in range(0, packed["input_ids"].shape[0], size)]


# ------------------------------------------------------------------------------------------------------------------
# Measuring one model state


@dataclass
class Probes:
    """What is measured on every model state: the requests, the Factbook probes and held-out text."""

    requests: list[dict[str, Any]]
    probes: list[Any]
    heldout: list[dict[str, torch.Tensor]]
    templates: tuple[str, ...] | None
    probe_summary: dict[str, int] | None = None  # probes.probe_pool_summary: asked, pool, dropped as leaking


def measure(model, tok, probes: Probes, cfg: JobConfig, hparams, reference=None,
            before: Mapping[str, Any] | None = None, timer: PhaseTimer | None = None,
            label: str = "", record_reference: bool = False) -> dict[str, Any]:
    """All metrics of one model state (see the README for definitions).

    Args:
        reference: next-token log-probs of the unedited model on ``probes.heldout`` (for KL); None before the edit.
        before: this function's result on the unedited model (for the "unchanged" locality metrics).
        record_reference: also return this model's next-token log-probs on ``probes.heldout`` as ``"_reference"``
            (from the perplexity's forward pass).
    """
    from .evaluation import heldout_scores, locality_unchanged, teacher_forced_scores, wild_scores
    from .probes import probe_accuracy

    timer = timer or PhaseTimer()
    requests = probes.requests
    out: dict[str, Any] = {}
    with timer.phase(f"evaluate {label}: teacher-forced"):
        scores = teacher_forced_scores(model, tok, requests, pre=before.get("_teacher_forced") if before else None,
                                       batch_size=cfg.eval_batch_size)
        out["_teacher_forced"] = scores
        out["teacher_forced"] = {"reliability": scores["rewrite_acc"], "generalization": scores["rephrase_acc"],
                                 "locality_answer_accuracy": scores["locality_truth_acc"]}
        if scores["locality_acc"] is not None:
            out["teacher_forced"]["locality_unchanged_tokens"] = scores["locality_acc"]
    with timer.phase(f"evaluate {label}: WILD generation"):
        out["wild"] = wild_scores(model, tok, requests, templates=probes.templates, batch_size=cfg.eval_batch_size,
                                  show_progress=cfg.progress)
        if before is not None:
            for template, scores in out["wild"]["per_template"].items():
                old = before["wild"]["per_template"][template]["answers"]["locality"]
                scores["locality_unchanged"] = locality_unchanged(old, scores["answers"]["locality"]) if old else None
    with timer.phase(f"evaluate {label}: capability"):
        heldout = heldout_scores(model, probes.heldout, reference=reference, record_reference=record_reference,
                                 show_progress=cfg.progress)
        capability = {"heldout_perplexity": heldout.perplexity}
        if heldout.kl is not None:
            capability["heldout_kl"] = heldout.kl
        if record_reference:
            out["_reference"] = heldout.reference
        if probes.probes:
            from .evaluation import has_chat_template

            template = "chat" if has_chat_template(tok) else "qa"
            accuracy, answers = probe_accuracy(model, tok, probes.probes, template=template,
                                               batch_size=cfg.eval_batch_size, show_progress=cfg.progress)
            capability["factbook_accuracy"] = accuracy
            out["_factbook_answers"] = answers
        out["capability"] = capability
    if cfg.easyedit_metrics:
        with timer.phase(f"evaluate {label}: EasyEdit metrics"):
            out["easyedit"] = _easyedit_metrics(model, tok, requests, hparams, before)
    if cfg.lm_eval_tasks:
        from .evaluation import lm_eval_scores

        with timer.phase(f"evaluate {label}: lm-evaluation-harness"):
            out["lm_eval"] = lm_eval_scores(model, tok, list(cfg.lm_eval_tasks))
    return out


def _easyedit_metrics(model, tok, requests, hparams, before) -> dict[str, Any] | None:
    """EasyEdit's own compute_edit_quality, if EasyEdit is importable (None otherwise, with a log line)."""
    try:
        from ..easyedit.evaluate import easyedit_metrics
    except ImportError as exc:
        logger.info("EasyEdit metrics skipped: %s", exc)
        return None
    pre = before.get("easyedit") if before else None
    try:
        result = easyedit_metrics(model, tok, requests, hparams, model_name=hparams.model_name,
                                  pre=pre.get("_raw") if pre else None, show_progress=False)
    except ModuleNotFoundError as exc:
        logger.info("EasyEdit metrics skipped: %s", exc)
        return None
    summary = {k: result.get(k) for k in ("rewrite_acc", "rephrase_acc", "locality", "generation")}
    summary["_raw"] = result
    return summary


# ------------------------------------------------------------------------------------------------------------------
# The report


def comparison_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (group, metric, before, after, change) for every metric, in report order.

    A "before" value that is true by definition (the KL of the model to itself, "unchanged" shares) is None, shown
    as "-" in the report, and so is its change: the after value says everything.
    """
    rows: list[dict[str, Any]] = []

    def add(group: str, metric: str, b: float | None, a: float | None, relative: bool = False) -> None:
        change = None
        if a is not None and b is not None:
            change = (a - b) / b if relative and b else a - b
        rows.append({"group": group, "metric": metric, "before": b, "after": a, "change": change,
                     "relative": relative})

    tb, ta = before["teacher_forced"], after["teacher_forced"]
    add("edit (teacher-forced)", "reliability (rewrite token acc.)", tb["reliability"], ta["reliability"])
    add("edit (teacher-forced)", "generalisation (rephrase token acc.)", tb["generalization"], ta["generalization"])
    for template, sa in after["wild"]["per_template"].items():
        sb = before["wild"]["per_template"][template]
        for key, name in (("reliability", "reliability"), ("generalization", "generalisation")):
            add(f"edit (WILD, {template})", f"{name} exact match", sb[f"{key}_em"], sa[f"{key}_em"])
            add(f"edit (WILD, {template})", f"{name} contains", sb[f"{key}_contains"], sa[f"{key}_contains"])
    cb, ca = before["capability"], after["capability"]
    add("capability", "held-out Wikipedia perplexity (relative change)", cb["heldout_perplexity"],
        ca["heldout_perplexity"], relative=True)
    add("capability", "held-out next-token KL(before || after)", None, ca.get("heldout_kl"))  # 0 by definition
    if "factbook_accuracy" in ca:
        add("capability", "Factbook probe accuracy", cb["factbook_accuracy"], ca["factbook_accuracy"])
    add("locality", "teacher-forced locality answer accuracy", tb["locality_answer_accuracy"],
        ta["locality_answer_accuracy"])
    if "locality_unchanged_tokens" in ta:
        add("locality", "teacher-forced locality tokens unchanged", None, ta["locality_unchanged_tokens"])
    for template, sa in after["wild"]["per_template"].items():
        if sa.get("locality_unchanged") is not None:
            add("locality", f"greedy locality answers unchanged ({template})", None, sa["locality_unchanged"])
    eb, ea = before.get("easyedit"), after.get("easyedit")
    if eb and ea:
        add("EasyEdit evaluator", "rewrite_acc", eb["rewrite_acc"], ea["rewrite_acc"])
        add("EasyEdit evaluator", "rephrase_acc", eb["rephrase_acc"], ea["rephrase_acc"])
        for key, value in (ea.get("locality") or {}).items():
            add("EasyEdit evaluator", f"locality {key}", None, value)
    return rows


def format_report(result: Mapping[str, Any]) -> str:
    """The report as a markdown table plus timing, memory and the edit receipt."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"# CrispEdit report: {result['config']['job']['model']} on {result['requests']['dataset']} "
             f"records {result['requests']['start']}..{result['requests']['start'] + result['requests']['count'] - 1}"
             f" ({result['requests']['n_edits']} edits, {result['requests']['n_skipped']} skipped)", "",
             f"Records: {result['requests'].get('source', result['requests']['path'])}", "",
             *_probe_line(result.get("factbook_probes")),
             "| group | metric | before | after | change |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        change = row["change"]
        change_text = "-" if change is None else (f"{100 * change:+.2f}%" if row["relative"] else f"{change:+.4f}")
        lines.append(f"| {row['group']} | {row['metric']} | {fmt(row['before'])} | {fmt(row['after'])} | "
                     f"{change_text} |")
    lines += ["", f"Edit: {result['edit']['summary']}", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in result["seconds"].items()]
    lines += ["", "Memory: " + ", ".join(f"{k} {v}" for k, v in result["memory"].items())]
    return "\n".join(lines)


def _probe_line(summary: Mapping[str, int] | None) -> list[str]:
    """The report's line on the Factbook probes (empty when none were asked)."""
    if not summary:
        return []
    excluded = (f", {summary['excluded_countries']} edited countries excluded" if summary["excluded_countries"]
                else "")
    return [f"Factbook probes: {summary['asked']} asked, drawn from {summary['pool']} questions "
            f"({summary['dropped_leaking']} questions that contain their own answer dropped{excluded}). "
            "A before value that is true by definition (KL 0, unchanged 1) shows as -.", ""]


def _public(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Drop bulky private entries (leading underscore) before writing JSON."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("_"):
            continue
        out[key] = _public(value) if isinstance(value, Mapping) else value
    return out


# ------------------------------------------------------------------------------------------------------------------
# Jobs


def output_dir(cfg: JobConfig, kind: str) -> Path:
    """The job's output folder (``--output-dir`` or a timestamped one under outputs/), checked to be writable
    before any work (nothing is created yet)."""
    from ..checks import ensure_writable_dir

    default = (f"outputs/crispedit-{cfg.dataset}-{cfg.start}-{cfg.count}-" if kind == "edit"
               else f"outputs/eval-{cfg.dataset}-") + time.strftime("%Y%m%d-%H%M%S")
    with usage_errors():
        return ensure_writable_dir(cfg.output_dir or default, "--output-dir")


def check_lengths(model, hparams, cfg: JobConfig | None = None) -> None:
    """Every sequence length against the model's positions (curvature_seq_len, max_length, --heldout-seq-len)."""
    from ..curvature import check_positions

    check_positions(model, hparams.curvature_seq_len, "curvature_seq_len")
    check_positions(model, hparams.max_length, "max_length")
    if cfg is not None:
        check_positions(model, cfg.heldout_seq_len, "--heldout-seq-len")


def prepare(cfg: JobConfig, timer: PhaseTimer):
    """Load hparams, requests, model, tokenizer, probes and held-out text (shared by the edit and eval jobs).

    Everything that can be checked is checked before the model loads (hparams, the records file and range), and
    the sequence lengths right after it, before any long work.
    """
    from .data import load_requests
    from .models import load_model_and_tokenizer

    with usage_errors():
        hparams = load_hparams(cfg.hparams, cfg.overrides, cfg.device)
        device = str(hparams.torch_device())
        cfg.model = model_name(cfg, hparams)
        with timer.phase("load records"):
            request_set = load_requests(cfg.dataset, cfg.data_path, cfg.start, cfg.count)
            path = request_set.source
        with timer.phase("load model"):
            model, tok = load_model_and_tokenizer(cfg.model, device=device, dtype=cfg.dtype,
                                                  cache_dir=cfg.model_cache_dir)
        edit_targets(model, hparams)  # fail early, with the closest names, if the layers do not exist
        check_lengths(model, hparams, cfg)
        probes = build_probes(cfg, tok, request_set)
    return hparams, model, tok, request_set, path, probes


def build_probes(cfg: JobConfig, tok, request_set) -> Probes:
    """What every model state is measured on: the usable requests, the Factbook probes (never about a country the
    embedded edit set changes) and the held-out Wikipedia windows (the same for the job and the harness).

    Raises:
        UsageError: the record range holds no usable request.
    """
    from .data import EMBEDDED_DATASET
    from .factbook_edits import edited_countries
    from .probes import factbook_probes, probe_pool_summary

    if not request_set.requests:
        raise UsageError(f"no usable records in {request_set.source} range {cfg.start}..{cfg.start + cfg.count - 1}: "
                         f"skipped {dict(request_set.skipped)}")
    excluded = edited_countries() if cfg.dataset == EMBEDDED_DATASET else ()
    return Probes(requests=list(request_set.requests),
                  probes=factbook_probes(cfg.n_probes, exclude_countries=excluded) if cfg.n_probes else [],
                  heldout=heldout_batches(tok, cfg.eval_batch_size, cfg.heldout_sequences, cfg.heldout_seq_len),
                  templates=cfg.templates,
                  probe_summary=probe_pool_summary(cfg.n_probes, excluded) if cfg.n_probes else None)


def measure_before(model, tok, probes: Probes, cfg: JobConfig, hparams, timer: PhaseTimer, label: str = "before"):
    """The unedited model's measurement and reference log-probs, through the before-evaluation cache unless
    ``cfg.before_cache`` is off (``bench.before_cache.before_evaluation``)."""
    from .before_cache import before_evaluation

    return before_evaluation(model, tok, probes, cfg, hparams, timer=timer, use_cache=cfg.before_cache,
                             cache_dir=cfg.before_cache_dir, label=label)


def _portable_source(cfg: JobConfig, source: str) -> str:
    """The records' source for result files: a file path made portable, a hub spec or the embedded set's name."""
    from .data import EMBEDDED_DATASET

    if cfg.dataset == EMBEDDED_DATASET or source.startswith("hf:"):
        return source
    return portable_path(source)


def _result_header(cfg: JobConfig, hparams, request_set, path, probes: Probes) -> dict[str, Any]:
    return {
        "config": {"job": dataclasses.asdict(cfg), "hparams": hparams.to_dict(redact_secrets=True)},
        "environment": environment(),
        "requests": {"dataset": cfg.dataset, "path": _portable_source(cfg, request_set.source),
                     "source": _portable_source(cfg, request_set.source), "start": cfg.start, "count": cfg.count,
                     "n_edits": len(request_set.requests), "n_skipped": request_set.n_skipped,
                     "skipped": dict(request_set.skipped)},
        "factbook_probes": probes.probe_summary,
    }


def run_edit_job(cfg: JobConfig) -> dict[str, Any]:
    """Measure, edit with CrispEdit, measure again; write the report, JSON, spectrum plot and (optionally) the model.

    Returns:
        The result dictionary that is also written to ``{output_dir}/result.json``.
    """
    from .plots import plot_energy_spectra

    from ..state import edit_state

    timer = PhaseTimer()
    out_dir = output_dir(cfg, "edit")
    hparams, model, tok, request_set, path, probes = prepare(cfg, timer)
    with usage_errors():
        targets = check_edit_inputs(model, probes.requests, hparams)
    with timer.phase("curvature (cache or collect)"), unwritable_as_usage_error():
        curvature = capability_curvature(model, tok, hparams, progress=cfg.progress)
    factors = curvature.factors
    base_fp = edit_state(model).base_fingerprint  # theta_0's fingerprint, edit weights hashed completely
    measured = measure_before(model, tok, probes, cfg, hparams, timer, label="before")
    before, reference = measured.metrics, measured.reference
    with timer.phase("edit"):
        report = apply_crispedit(model, tok, probes.requests, hparams, progress=cfg.progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = _save_model(cfg, model, tok, targets, base_fp, hparams, out_dir, timer)  # survives a later failure
    after = measure(model, tok, probes, cfg, hparams, reference=reference, before=before, timer=timer, label="after")
    plot_path = out_dir / "energy_spectrum.png"
    with timer.phase("plot"):
        try:
            plot_energy_spectra(report.projectors, plot_path,
                                title=f"{cfg.model}: K-FAC curvature energy per edited layer (gamma "
                                      f"{hparams.energy_threshold})")
        except ImportError as exc:  # matplotlib is the "bench" extra
            logger.warning("no energy-spectrum plot (%s); pip install 'crispedit-easyedit[bench]' for plots", exc)
            plot_path = None
    result = _result_header(cfg, hparams, request_set, path, probes)
    result.update({
        "curvature": {k: v for k, v in factors.metadata.items() if k not in ("layers",)},
        "edit": dict(report.to_dict(), summary=report.summary()),
        "before": _public(before), "after": _public(after),
        "rows": comparison_rows(before, after),
        "before_cache": {"hit": measured.cache_hit, "key": measured.key},
        "seconds": timer.seconds, "memory": peak_memory(), "saved": saved,
        "artefacts": {"report": str(out_dir / "report.md"), "json": str(out_dir / "result.json"),
                      "plot": str(plot_path) if plot_path else None},
    })
    _write(result, out_dir)
    return result


def run_eval_job(cfg: JobConfig, changed_tensors: str | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate an edited model against its base: ``cfg.model`` is the base; ``changed_tensors`` (a file written by
    ``--save delta``) is applied onto a copy. Without it, ``cfg.model`` is compared with itself (a baseline run).

    The file is read and checked before the model loads, and checked against the base model (weights fingerprint,
    dtypes; ``force`` applies it anyway) before the base is evaluated.
    """
    import copy

    from ..delta import apply_read_tensors, read_changed_tensors

    timer = PhaseTimer()
    out_dir = output_dir(cfg, "eval")
    if changed_tensors:
        with usage_errors():
            content = read_changed_tensors(changed_tensors)  # read once, before the model loads
    hparams, model, tok, request_set, path, probes = prepare(cfg, timer)
    edited = copy.deepcopy(model)
    meta = {}
    if changed_tensors:
        with usage_errors():
            meta = apply_read_tensors(edited, *content, changed_tensors, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = measure_before(model, tok, probes, cfg, hparams, timer, label="base")
    before, reference = measured.metrics, measured.reference
    after = measure(edited, tok, probes, cfg, hparams, reference=reference, before=before, timer=timer,
                    label="edited")
    result = _result_header(cfg, hparams, request_set, path, probes)
    result.update({"edit": {"summary": f"changed tensors from {changed_tensors}" if changed_tensors else
                            "no changed tensors given: the base model compared with itself",
                            "changed_tensors_metadata": meta},
                   "before": _public(before), "after": _public(after), "rows": comparison_rows(before, after),
                   "before_cache": {"hit": measured.cache_hit, "key": measured.key},
                   "seconds": timer.seconds, "memory": peak_memory(),
                   "artefacts": {"report": str(out_dir / "report.md"), "json": str(out_dir / "result.json")}})
    _write(result, out_dir)
    return result


def _save_model(cfg: JobConfig, model, tok, targets, base_fp, hparams, out_dir: Path, timer: PhaseTimer):
    if cfg.save == "none":
        return None
    with timer.phase("save model"):
        if cfg.save == "delta":
            from ..delta import save_changed_tensors

            path = save_changed_tensors(model, [t.name for t in targets], out_dir / "changed_tensors.safetensors",
                                        base_fingerprint=base_fp, config=hparams.to_dict(redact_secrets=True))
        else:
            path = out_dir / "model"
            model.save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
    return {"mode": cfg.save, "path": portable_path(path)}


def _write(result: Mapping[str, Any], out_dir: Path) -> None:
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "report.md").write_text(format_report(result) + "\n")
    logger.info("wrote %s and %s", out_dir / "report.md", out_dir / "result.json")
