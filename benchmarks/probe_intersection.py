"""How the capability projection and the context null space compose on a real edit gradient (issue 9).

For the first ``--count`` records of ``zsre_train.json`` trained in the raw, qa and chat formats with EOS under
``edit_positions: subject_last_only`` and ``context_null_space_energy`` (default 0.99), on SmolLM2-135M-Instruct at
its shipped gamma, the edit loss's gradient G (d_out, d_in) of every edited layer at the base weights is projected
by

* ``alternate`` with k rounds (:func:`crispedit_easyedit.context_null_space.then_context`), k in 1, 4, 16, 64;
* ``exact`` (:class:`crispedit_easyedit.context_null_space.ExactIntersection`) with 8, 32 (the shipped value) and
  unlimited groups of row prefixes.

One JSON line per layer: per setting the share of the result in the capability projector's removed directions
(``leak_fraction``), for "exact" also its share on the protected context directions ``||P(G) U|| / ||P(G)||``, the
norm kept ``||P(G)|| / ||G||``, and for "exact" the number of groups, the share of kept coordinates given up by
grouping, the dimension of the subspace, seconds to build and to apply, and ``||P(P(G)) - P(G)|| / ||P(G)||``
(idempotence).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_intersection.py --count 30 > out.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "zsre_train.json"  # ../shared/data beside the repo
HPARAMS = REPO_ROOT / "hparams" / "CrispEdit" / "SmolLM2-135M-Instruct.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--energy", type=float, default=0.99)
    args = parser.parse_args(argv)

    from crispedit_easyedit.bench.data import load_requests
    from crispedit_easyedit.bench.models import load_model_and_tokenizer
    from crispedit_easyedit.context_null_space import ExactIntersection, then_context
    from crispedit_easyedit.editing import (_batches, build_projectors, chunk_context_null_spaces, edit_examples,
                                            edit_key_positions, edit_loss, edit_targets, pad_token_id,
                                            resolve_module)
    from crispedit_easyedit.hparams import CrispEditHyperParams
    from crispedit_easyedit.key_positions import gradient_only_at
    from crispedit_easyedit.optim import leak_fraction
    from crispedit_easyedit.state import capability_curvature

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct-offline")
    requests = load_requests("zsre", args.data, 0, args.count).requests
    hp = dataclasses.replace(CrispEditHyperParams.from_hparams(HPARAMS), train_formats=["raw", "qa", "chat"],
                             train_eos=True, edit_positions="subject_last_only",
                             context_null_space_energy=args.energy)
    targets = edit_targets(model, hp)
    projectors = build_projectors(capability_curvature(model, tok, hp, progress=False).eigenbases, targets,
                                  hp.energy_threshold)
    spaces = chunk_context_null_spaces(model, tok, requests, hp, targets)
    examples = edit_examples(tok, requests, hp)
    keys = edit_key_positions(tok, requests, hp, examples)
    modules = [resolve_module(model, t.name) for t in targets]
    for t in targets:
        t.param.requires_grad_(True)
    for batch in _batches(examples, hp.train_batch_size, pad_token_id(tok), keys):
        with gradient_only_at(modules, batch.pop("key_mask")):
            loss, _ = edit_loss(model, batch)
        loss.backward()  # summed over the batches: the direction is what is measured
    for t in targets:
        G = t.as_matrix(t.param.grad.float())
        project, space = projectors[t.name].project, spaces[t.name]
        row = {"layer": t.name, "count": args.count, "energy": args.energy, "gamma": hp.energy_threshold,
               "context_directions": space.protected_directions,
               "gradient_leak": round(leak_fraction(G, project), 4)}
        for groups in (8, 32, None):
            started = time.perf_counter()
            exact = ExactIntersection(projectors[t.name], space, groups or G.shape[0])
            built = time.perf_counter() - started
            started = time.perf_counter()
            P = exact(G)
            applied = time.perf_counter() - started
            row[f"exact_{groups or 'all'}"] = {
                "leak": round(leak_fraction(P, project), 6),
                "context_share": round(float((P @ space.basis).norm() / P.norm()), 6),
                "norm_kept": round(float(P.norm() / G.norm()), 4), "groups": len(exact.groups),
                "dropped_share": round(exact.dropped_share, 4), "dimension": exact.dimension,
                "build_s": round(built, 2), "apply_s": round(applied, 3),
                "idempotence": float(f"{float((exact(P) - P).norm() / P.norm()):.2e}")}
        for rounds in (1, 4, 16, 64):
            P = then_context(project, space, False, rounds)(G)
            row[f"alternate_{rounds}"] = {"leak": round(leak_fraction(P, project), 4),
                                          "norm_kept": round(float(P.norm() / G.norm()), 4)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
