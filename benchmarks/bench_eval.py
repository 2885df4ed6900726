"""Evaluation cost benchmark of the main job (issue 11, goal 3): the evaluation as it was against as it is, side by
side in ONE run on the real SmolLM2-135M-Instruct, with the numbers each one reports.

Two parts, each on the default job's own inputs (``crispedit edit``: the embedded edit set's first 10 records, the
240 Factbook probes, 16 held-out Wikipedia windows of 256 tokens, evaluation batch 16):

1. **Generation** (the WILD answers of the 10 requests in the qa/none/chat templates, plus the 240 chat-template
   Factbook probes): ``model.generate`` with a stop-string criterion (the evaluator before issue 11; kept here as
   the reference) against ``crispedit_easyedit.generation.greedy_decode`` (finished rows leave the batch, the
   shared system prompt is computed once). Reports seconds and how many answers are identical.
2. **Held-out text** (perplexity, the unedited model's log-probs, KL): three passes over whole batches of 16 x 256
   positions (before) against one pass in groups of at most 512 positions (``heldout_scores``). The "edited" model
   is the unedited one with its layer-16 ``down_proj`` perturbed (so the KL is not zero). Reports seconds, peak
   resident memory of each (Linux: the high-water mark is reset before each), and both sets of numbers.

Repetitions are interleaved (A, B, A, B) and the medians compared, because these machines are shared.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_eval.py [--reps 2]

Results: a markdown table on stdout and one JSON line appended to ``benchmarks/results/bench_eval.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from crispedit_easyedit.bench.evaluation import (  # noqa: E402
    eos_token_ids, generate_from_ids, heldout_scores, prompt_token_ids, truncate_answer,
)
from crispedit_easyedit.bench.evaluation.wild import _wild_question, locality_pairs  # noqa: E402
from crispedit_easyedit.bench.job import JobConfig, PhaseTimer, environment, prepare  # noqa: E402
from crispedit_easyedit.editing import pad_token_id  # noqa: E402
from crispedit_easyedit.generation import left_pad  # noqa: E402

logger = logging.getLogger("bench_eval")
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "bench_eval.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Memory


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return None


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """(result, seconds, peak RSS in GiB during the call or None)."""
    can_reset = reset_peak_rss()
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started, peak_rss_gib() if can_reset else None


# ----------------------------------------------------------------------------------------------------------------
# The evaluator before issue 11 (reference implementations)


class _StopOnStrings(StoppingCriteria):
    def __init__(self, tok, prompt_len: int, stop_strings=(".", "\n")):
        self.tok, self.prompt_len, self.stop_strings = tok, prompt_len, stop_strings

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_before(model, tok, prompts_ids, batch_size: int = 16, max_new_tokens: int = 40) -> list[str]:
    """``model.generate`` in left-padded batches sorted by length, cut at "." / newline / EOS."""
    eos_ids = eos_token_ids(model, tok)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_new_tokens=0, pad_token_id=pad_token_id(tok),
                              eos_token_id=eos_ids or None)
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    answers = [""] * len(prompts_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = left_pad([prompts_ids[i] for i in idx], pad_token_id(tok))
        width = input_ids.shape[1]
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_StopOnStrings(tok, width)]))
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            new = new[: next((j for j, t in enumerate(new) if t in eos_ids), len(new))]
            answers[i] = truncate_answer(tok.decode(new, skip_special_tokens=True))
    return answers


def heldout_before(model, edited, batches) -> dict[str, float]:
    """Perplexity, reference log-probs and KL in three passes over whole batches (the evaluator before issue 11)."""
    whole = max(b["input_ids"].numel() for b in batches)
    reference = heldout_scores(model, batches, record_reference=True, max_positions=whole, show_progress=False)
    after = heldout_scores(edited, batches, max_positions=whole, show_progress=False)
    kl = heldout_scores(edited, batches, reference=reference.reference, max_positions=whole, show_progress=False)
    return {"perplexity_before": reference.perplexity, "perplexity_after": after.perplexity, "kl": kl.kl}


def heldout_now(model, edited, batches) -> dict[str, float]:
    """The same numbers in one pass per model, 512 positions per forward."""
    reference = heldout_scores(model, batches, record_reference=True, show_progress=False)
    after = heldout_scores(edited, batches, reference=reference.reference, show_progress=False)
    return {"perplexity_before": reference.perplexity, "perplexity_after": after.perplexity, "kl": after.kl}


# ----------------------------------------------------------------------------------------------------------------
# The run


def generation_prompts(tok, probes) -> list[list[int]]:
    """The token ids of every prompt the job generates from: WILD (3 templates) and the Factbook probes."""
    questions = []
    for request in probes.requests:
        questions += [request["prompt"]] + ([request["rephrase_prompt"]] if request.get("rephrase_prompt") else [])
        questions += [_wild_question(p) for p, _ in locality_pairs(request)]
    ids = [prompt_token_ids(tok, q, template) for template in ("qa", "none", "chat") for q in questions]
    return ids + [prompt_token_ids(tok, p.question, "chat") for p in probes.probes]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = JobConfig(progress=False)
    _, model, tok, _, _, probes = prepare(cfg, PhaseTimer())
    prompts = generation_prompts(tok, probes)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        weight = edited.model.layers[16].mlp.down_proj.weight
        weight.add_(0.02 * torch.randn_like(weight))
    runs: dict[str, list[float]] = {"generate before": [], "generate now": [], "held-out before": [],
                                    "held-out now": []}
    peaks: dict[str, float | None] = {}
    outputs: dict[str, Any] = {}
    for rep in range(args.reps):
        for name, fn in (("generate before", lambda: generate_before(model, tok, prompts, cfg.eval_batch_size)),
                         ("generate now", lambda: generate_from_ids(model, tok, prompts, batch_size=cfg.eval_batch_size,
                                                                    show_progress=False)),
                         ("held-out before", lambda: heldout_before(model, edited, probes.heldout)),
                         ("held-out now", lambda: heldout_now(model, edited, probes.heldout))):
            out, seconds, peak = measured(fn)
            runs[name].append(seconds)
            peaks[name] = max(peaks.get(name) or 0.0, peak or 0.0) if peak is not None else None
            outputs[name] = out
            logger.info("rep %d %s: %.1f s, peak %s GiB", rep, name, seconds, peak)
    same = sum(a == b for a, b in zip(outputs["generate before"], outputs["generate now"]))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "benchmark": "bench_eval",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "reps": args.reps,
        "n_prompts": len(prompts),
        "seconds": runs,
        "median_seconds": medians,
        "peak_rss_gib": peaks,
        "generation": {"identical_answers": same, "speedup": medians["generate before"] / medians["generate now"]},
        "heldout": {"before": outputs["held-out before"], "now": outputs["held-out now"],
                    "speedup": medians["held-out before"] / medians["held-out now"]},
    }


def markdown(result: dict[str, Any]) -> str:
    med, peak = result["median_seconds"], result["peak_rss_gib"]
    lines = ["| part | before (s) | now (s) | ratio | peak RSS before / now (GiB) | numbers |", "|---|---:|---:|---:|---|---|"]
    gen = result["generation"]
    lines.append(f"| generation ({result['n_prompts']} prompts) | {med['generate before']:.1f} | "
                 f"{med['generate now']:.1f} | {gen['speedup']:.2f}x | {peak['generate before']} / "
                 f"{peak['generate now']} | {gen['identical_answers']}/{result['n_prompts']} answers identical |")
    held = result["heldout"]
    numbers = ", ".join(f"{k} {held['before'][k]:.6g} / {held['now'][k]:.6g}" for k in held["now"])
    lines.append(f"| held-out perplexity + KL | {med['held-out before']:.1f} | {med['held-out now']:.1f} | "
                 f"{held['speedup']:.2f}x | {peak['held-out before']} / {peak['held-out now']} | {numbers} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each part (default 2)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON-lines file the result is appended to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    print(markdown(result))
    with open(args.output, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
