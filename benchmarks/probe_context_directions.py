"""How many input directions the context null space protects, and how much of a subject key it leaves (issue 9).

Under ``edit_positions: subject_last_only`` with ``context_null_space_energy`` the weight change may not act on the
top-energy input directions of the edit examples' other positions, and the edit is made through the part of each
subject key outside them (:mod:`crispedit_easyedit.context_null_space`). This probe measures, for the first
``--count`` records of ``zsre_train.json`` trained in the raw, qa and chat formats with EOS on
SmolLM2-135M-Instruct at its shipped gamma, per edited layer and per setting:

* ``positions``: "context" (every attended non-key position, what the option builds) or "prompt" (the same without
  the answer's own tokens, i.e. the positions whose labels are targets);
* ``energy``: 0.9, 0.95 and 0.99 of the context covariance's trace;

the number of protected directions, the mean share of a subject key's norm outside them
``||(I - U U^T) x|| / ||x||``, the mean of the same share over the context inputs themselves, and the share of the
keyed edit gradient's norm the exact intersection with the capability projection keeps (``exact_norm_kept``): the
smaller these shares, the larger the change an edit needs. One JSON line per layer and setting.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_context_directions.py --count 100 > out.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "zsre_train.json"  # ../shared/data beside the repo
HPARAMS = REPO_ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"
ENERGIES = (0.9, 0.95, 0.99)


def outside_share(inputs: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean over rows of ``inputs`` (n, d_in) of the share of the row's norm outside the columns of ``basis``
    (d_in, r, orthonormal)."""
    rest = inputs - (inputs @ basis) @ basis.T
    return float((rest.norm(dim=1) / inputs.norm(dim=1).clamp_min(1e-12)).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args(argv)

    from crispedit_easyedit.bench.data import load_requests
    from crispedit_easyedit.bench.models import load_model_and_tokenizer
    from crispedit_easyedit.context_null_space import ContextNullSpace, ExactIntersection, context_covariances
    from crispedit_easyedit.editing import (IGNORE_INDEX, _batches, build_projectors, edit_examples,
                                            edit_key_positions, edit_loss, edit_targets, pad_token_id,
                                            resolve_module)
    from crispedit_easyedit.hparams import CrispEditHyperParams
    from crispedit_easyedit.key_positions import forward_hooks, gradient_only_at
    from crispedit_easyedit.state import capability_curvature

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    requests = load_requests("zsre", args.data, 0, args.count).requests
    hp = dataclasses.replace(CrispEditHyperParams.from_hparams(HPARAMS), train_formats=["raw", "qa", "chat"],
                             train_eos=True, edit_positions="subject_last_only", context_null_space_energy=0.99)
    targets = edit_targets(model, hp)
    projectors = build_projectors(capability_curvature(model, tok, hp, progress=False).eigenbases, targets,
                                  hp.energy_threshold)
    examples = edit_examples(tok, requests, hp)
    batches = _batches(examples, hp.train_batch_size, pad_token_id(tok),
                       edit_key_positions(tok, requests, hp, examples))
    modules = {t.name: resolve_module(model, t.name) for t in targets}
    # "prompt": the answer's own tokens count as keys, i.e. outside the covariance
    without_answers = [{**b, "key_mask": b["key_mask"] | (b["labels"] != IGNORE_INDEX)} for b in batches]
    covariances = {"context": context_covariances(model, modules, batches),
                   "prompt": context_covariances(model, modules, without_answers)}

    captured: dict[str, dict[str, list[torch.Tensor]]] = {n: {"key": [], "context": []} for n in modules}
    names = {id(module): name for name, module in modules.items()}
    batch_in_flight: dict[str, torch.Tensor] = {}

    def capture(module, inputs, output):
        rows = inputs[0].detach().float()
        key = batch_in_flight["key_mask"]
        context = batch_in_flight["attention_mask"].bool() & ~key
        captured[names[id(module)]]["key"].append(rows[key])
        captured[names[id(module)]]["context"].append(rows[context])

    with forward_hooks(list(modules.values()), capture), torch.no_grad():
        for batch in batches:
            batch_in_flight.update(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for t in targets:
        t.param.requires_grad_(True)
    for batch in batches:
        batch = dict(batch)
        with gradient_only_at(list(modules.values()), batch.pop("key_mask")):
            loss, _ = edit_loss(model, batch)
        loss.backward()  # summed over the batches: the direction is what is measured
    for t in targets:
        keys, contexts = (torch.cat(captured[t.name][part]) for part in ("key", "context"))
        gradient = t.as_matrix(t.param.grad.float())
        for positions, per_layer in covariances.items():
            covariance, tokens = per_layer[t.name]
            for energy in ENERGIES:
                space = ContextNullSpace.from_covariance(covariance, energy, tokens)
                kept = ExactIntersection(projectors[t.name], space)(gradient)
                print(json.dumps({
                    "layer": t.name, "count": args.count, "gamma": hp.energy_threshold, "positions": positions,
                    "energy": energy, "context_tokens": tokens, "keys": int(keys.shape[0]),
                    "protected_directions": space.protected_directions,
                    "key_share_outside": round(outside_share(keys, space.basis), 4),
                    "context_share_outside": round(outside_share(contexts, space.basis), 4),
                    "exact_norm_kept": round(float(kept.norm() / gradient.norm()), 4)}), flush=True)


if __name__ == "__main__":
    main()
