"""A quick probe of CrispEdit settings on a few CounterFact edits (minutes, not the harness's hour).

For each setting (a JSON object of hparams overrides on hparams/CrispEdit/SmolLM2-135M-Instruct.yaml) the same
records are edited from the base weights with a fresh edit state, and five numbers are printed:

* reliability: teacher-forced token accuracy of ``target_new`` after the prompt
  (``bench.evaluation.teacher_forced_accuracy``, EasyEdit's token_em);
* paraphrase: the same after each paraphrase prompt;
* neighbourhood: the same after each neighbourhood prompt (other subjects, same relation): how often the *new*
  target leaked to them (lower is better; the unedited model's value is the floor);
* neighbourhood unchanged: the share of the neighbourhood prompts' teacher-forced argmax tokens over their own
  ground truth left as the unedited model had them (EasyEdit's locality, ``locality_token_agreement``; 1 before);
* perplexity of 8 x 128 held-out Wikipedia tokens.

It is for choosing what to run through the harness (``crispedit-bench``), whose evaluation is the reference.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_counterfact.py --count 32 \
        '{"edit_positions": "all"}' '{"edit_positions": "subject_last", "lr": 2e-3}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "counterfact.json"  # ../shared/data beside the repo
HPARAMS = REPO_ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"

logger = logging.getLogger("probe_counterfact")


def as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="JSON objects of hparams overrides, one per setting")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from crispedit_easyedit.bench.data import load_requests
    from crispedit_easyedit.bench.evaluation import perplexity, teacher_forced_accuracy
    from crispedit_easyedit.bench.evaluation.teacher_forced import (locality_token_agreement,
                                                                    teacher_forced_predictions)
    from crispedit_easyedit.bench.models import load_model_and_tokenizer
    from crispedit_easyedit.corpora import load_corpus, spread_windows
    from crispedit_easyedit.editing import apply_crispedit
    from crispedit_easyedit.hparams import CrispEditHyperParams
    from crispedit_easyedit.state import reset_edit_state

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    requests = load_requests("counterfact", args.data, args.start, args.count).requests
    heldout = spread_windows(load_corpus("wikipedia-offline", split="heldout"), tok, 128, 8)
    heldout_batches = [{k: v[i : i + 4] for k, v in heldout.items()} for i in (0, 4)]

    def mean_accuracy(pairs: list[tuple[str, str]]) -> float:
        """Mean teacher-forced token accuracy (EasyEdit's token_em) of (prompt, target) pairs."""
        scores = teacher_forced_accuracy(model, tok, [p for p, _ in pairs], [t for _, t in pairs])
        return round(sum(scores) / len(scores), 3)

    neighbours = [(p, g) for r in requests
                  for p, g in zip(as_list(r["locality"]["neighborhood"]["prompt"]),
                                  as_list(r["locality"]["neighborhood"]["ground_truth"]))]

    def neighbour_predictions() -> list[list[int]]:
        return [p for p, _ in teacher_forced_predictions(model, tok, [p for p, _ in neighbours],
                                                         [g for _, g in neighbours])]

    neighbours_before = neighbour_predictions()

    def measure() -> dict[str, float]:
        return {"reliability": mean_accuracy([(r["prompt"], r["target_new"]) for r in requests]),
                "paraphrase": mean_accuracy([(p, r["target_new"]) for r in requests
                                             for p in as_list(r["rephrase_prompt"])]),
                "neighbourhood_new_target": mean_accuracy([(p, r["target_new"]) for r in requests
                                                           for p in as_list(r["locality"]["neighborhood"]["prompt"])]),
                "neighbourhood_unchanged": round(locality_token_agreement(neighbours_before,
                                                                          neighbour_predictions()), 3),
                "perplexity": round(perplexity(model, heldout_batches, show_progress=False), 3)}

    base = CrispEditHyperParams.from_hparams(HPARAMS)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
    print(json.dumps({"setting": "before", **measure()}), flush=True)
    for spec in args.settings:
        overrides = json.loads(spec)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in originals:
                    param.copy_(originals[name])
        reset_edit_state(model)
        started = time.time()
        report = apply_crispedit(model, tok, requests, dataclasses.replace(base, **overrides), progress=False)
        print(json.dumps({"setting": overrides, "epochs": report.epochs, "final_loss": round(report.final_loss, 4),
                          **measure(), "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
