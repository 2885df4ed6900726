"""Core cost benchmark of CrispEdit: K-FAC collection, the projected Adam step, and big-shape eigendecompositions.

Three parts, each timed side by side in ONE run with interleaved repetitions (A, B, A, B, ...), reporting medians and
ratios, because the machines this runs on are shared and noisy:

1. K-FAC collection (``collect_kfac_factors``, fisher "mc", one sample) for the down-projections of five layers of
   the real SmolLM2-135M-Instruct over N sequences x T tokens of offline Wikipedia, relative to a plain
   forward+backward over the same tokens: (a) with every parameter requiring grad (a training step of the whole
   model), (b) with only the five edited weights requiring grad (the fairer comparison for editing).
   Goal: collection <= 1.1x a plain forward+backward of the edit weights (issue 11).
2. One projected Adam step (``ProjectedAdam`` modes "both" and "eigenbasis", each also with the gradient projected
   in bf16 as ``gradient_projection_dtype: bfloat16`` does; projectors from the factors just collected) relative
   to a plain ``torch.optim.Adam`` step over the same weights plus a forward+backward of a batch of ZsRE edits.
   Step overhead = (projected step - plain step) / (plain step + forward/backward). Goal: <= 10 %.
3. Random SPD factors of a big down-projection (Llama-3-8B: d_out 4096, d_in 14336): eigendecomposition time of
   each factor, and one projected step (two projections in "both" mode, one rotation and one unrotation in
   "eigenbasis" mode) vs a plain Adam update of that matrix.

Results: a markdown table on stdout, one JSON line per run appended to ``benchmarks/results/bench_core.jsonl``.

    python benchmarks/bench_core.py                      # CPU, fp32, everything (big part: minutes)
    python benchmarks/bench_core.py --skip-big           # parts 1 and 2 only
    python benchmarks/bench_core.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench_core")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "bench_core.jsonl"
DEFAULT_ZSRE = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_train.json"  # ../shared/data beside the repo
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call of ``fn`` (device-synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device,
                between: Callable[[], Any] | None = None, label: str = "") -> dict[str, list[float]]:
    """Run ``fns`` in turn (A, B, C, A, B, C, ...) ``warmup + reps`` times; return the timed seconds per name.

    ``between`` (untimed) runs after every call, e.g. to restore weights.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            seconds = timed(fn, device)
            if between is not None:
                between()
            if rep >= warmup:
                times[name].append(seconds)
        if rep >= warmup:
            logger.info("%s rep %d/%d: %s", label, rep - warmup + 1, reps,
                        ", ".join(f"{name} {times[name][-1]:.3f}s" for name in fns))
        else:
            logger.info("%s warm-up %d/%d done", label, rep + 1, warmup)
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": [round(v, 6) for v in values]}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-repetition ratios (robust to slow drifts of the machine's load)."""
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------------------------------------------
# Part 1: K-FAC collection vs plain forward+backward


def next_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the attended positions (what a training step would minimise)."""
    from crispedit_easyedit.curvature import loss_positions, model_inputs

    logits = model(**model_inputs(model, batch["input_ids"], batch["attention_mask"])).logits
    counted = loss_positions(batch["attention_mask"])
    labels = batch["input_ids"][:, 1:][counted[:, :-1]]
    return F.cross_entropy(logits[counted].float(), labels)


def part_collection(model, tok, args, device, names) -> tuple[dict[str, Any], Any]:
    from crispedit_easyedit.corpora import load_corpus, spread_windows
    from crispedit_easyedit.curvature import collect_kfac_factors

    texts = load_corpus(args.corpus, split="stats")
    packed = spread_windows(texts, tok, args.seq_len, args.num_sequences)
    batches = [{k: v[i : i + args.batch_size].to(device) for k, v in packed.items()}
               for i in range(0, packed["input_ids"].shape[0], args.batch_size)]
    n_seq, n_tok = int(packed["input_ids"].shape[0]), int(packed["input_ids"].numel())
    logger.info("part 1: %d sequences x %d tokens in %d batches, layers %s", n_seq, args.seq_len, len(batches), names)
    params = dict(model.named_parameters())
    edit_params = [params[n] for n in names]
    result: dict[str, Any] = {}

    def collect():
        result["factors"] = collect_kfac_factors(model, names, batches, fisher_type="mc", mc_samples=1,
                                                 dtype=torch.float32, seed=0, progress=False)

    def fwd_bwd(trainable: list[torch.nn.Parameter]):
        def run():
            for p in model.parameters():
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
            for batch in batches:
                for p in trainable:
                    p.grad = None
                next_token_loss(model, batch).backward()
            for p in trainable:
                p.grad = None
        return run

    model.eval()
    # The label sampling of fisher "mc" in isolation, on the first batch's real predictive distribution:
    # torch.multinomial (what collect_kfac_factors did up to cache format 2) vs sample_labels (inverse CDF, now).
    with torch.no_grad():
        from crispedit_easyedit.curvature import loss_positions, model_inputs, sample_labels

        first = batches[0]
        logits = model(**model_inputs(model, first["input_ids"], first["attention_mask"])).logits
        probs = torch.softmax(logits[loss_positions(first["attention_mask"])].float(), dim=-1)
        del logits
    gen = torch.Generator(device=device).manual_seed(0)

    def sample_multinomial():
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    def sample_inverse_cdf():
        return sample_labels(probs, gen)

    fns = {"kfac_collection": collect,
           "fwd_bwd_all_params": fwd_bwd(list(model.parameters())),
           "fwd_bwd_edit_weights": fwd_bwd(edit_params),
           "mc_sampling_multinomial_batch1": sample_multinomial,
           "mc_sampling_inverse_cdf_batch1": sample_inverse_cdf}
    times = interleaved(fns, args.reps, args.warmup, device, label="part 1")
    del probs
    for p in model.parameters():
        p.requires_grad_(False)
    out = {"num_sequences": n_seq, "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": n_tok,
           "timings": {k: summary(v) for k, v in times.items()}}
    coll = times["kfac_collection"]
    out["ratio_vs_fwd_bwd_all"] = statistics.median(coll) / statistics.median(times["fwd_bwd_all_params"])
    out["ratio_vs_fwd_bwd_edit"] = statistics.median(coll) / statistics.median(times["fwd_bwd_edit_weights"])
    out["paired_ratio_vs_fwd_bwd_all"] = paired_ratio(coll, times["fwd_bwd_all_params"])
    out["paired_ratio_vs_fwd_bwd_edit"] = paired_ratio(coll, times["fwd_bwd_edit_weights"])
    if args.profile:
        out["profile"] = profile_collection(model, names, batches, edit_params, fns["fwd_bwd_edit_weights"])
    return out, result["factors"]


def profile_collection(model, names, batches, edit_params, fwd_bwd_edit) -> dict[str, Any]:
    """Top CPU/CUDA ops of one collection and one edit-weights forward+backward (logged; totals returned)."""
    from torch.profiler import ProfilerActivity, profile

    from crispedit_easyedit.curvature import collect_kfac_factors

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    tables = {}
    for label, fn in (("kfac_collection", lambda: collect_kfac_factors(model, names, batches, fisher_type="mc",
                                                                         progress=False)),
                      ("fwd_bwd_edit_weights", fwd_bwd_edit)):
        with profile(activities=activities) as prof:
            fn()
        averages = prof.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=15)
        logger.info("profile of %s:\n%s", label, table)
        tables[label] = {e.key: round(e.self_cpu_time_total / 1e6, 4)
                         for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]}
    return tables


# ----------------------------------------------------------------------------------------------------------------
# Part 2: projected Adam step vs plain Adam step + forward/backward of an edit batch


def complement_projection(projector) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """PROTOTYPE (not in the package): P(Q) = Q - U_S[:, I] ((U_S[:, I]^T Q U_A[:, J]) * R) U_A[:, J]^T.

    I (J) are the eigenvectors of S (A) that take part in at least one removed Kronecker direction, R the removed
    mask restricted to I x J. Exactly equal to ``projector.project`` up to rounding; costs about |J| / d_in of it.
    """
    removed = ~projector.mask
    rows = removed.any(dim=1).nonzero().squeeze(1)
    cols = removed.any(dim=0).nonzero().squeeze(1)
    u_in = projector.basis_in[:, cols].contiguous()
    u_out = projector.basis_out[:, rows].contiguous()
    r = removed[rows][:, cols].to(u_in.dtype)

    def project(Q: torch.Tensor) -> torch.Tensor:
        q = Q.to(u_in.dtype)
        coords = u_out.T @ (q @ u_in)
        coords.mul_(r)
        return (q - u_out @ (coords @ u_in.T)).to(Q.dtype)

    return project, int(rows.numel()), int(cols.numel())


def part_step(model, tok, args, device, names, factors) -> dict[str, Any]:
    from crispedit_easyedit.editing import collate, edit_loss, pad_token_id, tokenize_edit
    from crispedit_easyedit.optim import ProjectedAdam
    from crispedit_easyedit.projector import KroneckerProjector

    params = dict(model.named_parameters())
    edit_params = [params[n] for n in names]
    records = json.loads(Path(args.zsre).read_text())[: args.edit_batch]
    examples = [tokenize_edit(tok, r["src"], r["alt"], args.max_length) for r in records]
    batch = {k: v.to(device) for k, v in collate(examples, pad_token_id(tok)).items()}
    logger.info("part 2: edit batch of %d sequences, padded length %d, %d target tokens", len(examples),
                batch["input_ids"].shape[1], int((batch["labels"] != -100).sum()))

    def build():
        return {n: KroneckerProjector.from_factors(factors[n].A.to(device), factors[n].S.to(device), args.gamma)
                for n in names}

    projectors: dict[str, Any] = {}
    build_times = [timed(lambda: projectors.update(build()), device) for _ in range(max(1, min(args.reps, 3)))]
    kept = {n: projectors[n].diagnostics().kept_fraction for n in names}

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in edit_params:
        p.requires_grad_(True)
    originals = [p.detach().clone() for p in edit_params]

    def restore():
        with torch.no_grad():
            for p, o in zip(edit_params, originals):
                p.copy_(o)

    plain = torch.optim.Adam(edit_params, lr=args.lr)
    projected = ProjectedAdam(edit_params, [projectors[n].project for n in names], mode="both", lr=args.lr)
    eigen = ProjectedAdam(edit_params, [projectors[n] for n in names], mode="eigenbasis", lr=args.lr)
    low = {n: projectors[n].in_dtype(torch.bfloat16) for n in names}  # gradient_projection_dtype "bfloat16"
    projected_bf16 = ProjectedAdam(edit_params, [projectors[n].project for n in names], mode="both", lr=args.lr,
                                   gradient_projections=[low[n].project for n in names])
    eigen_bf16 = ProjectedAdam(edit_params, [projectors[n] for n in names], mode="eigenbasis", lr=args.lr,
                               gradient_projections=[low[n] for n in names])
    unprojected = ProjectedAdam(edit_params, [None] * len(names), mode="none", lr=args.lr)
    complements = {n: complement_projection(projectors[n]) for n in names}
    prototype = ProjectedAdam(edit_params, [complements[n][0] for n in names], mode="both", lr=args.lr)

    def fwd_bwd():
        for p in edit_params:
            p.grad = None
        loss, _ = edit_loss(model, batch)
        loss.backward()

    def projections_only():
        for n, p in zip(names, edit_params):
            projectors[n].project(projectors[n].project(p.grad.float()))

    fns = {"fwd_bwd_edit_batch": fwd_bwd,
           "adam_step_plain": plain.step,
           "projected_adam_step_both": projected.step,
           "projected_adam_step_eigenbasis": eigen.step,
           "projected_adam_step_both_bf16_gradient": projected_bf16.step,
           "projected_adam_step_eigenbasis_bf16_gradient": eigen_bf16.step,
           "projected_adam_class_mode_none": unprojected.step,
           "projections_only_2x": projections_only,
           "prototype_complement_step_both": prototype.step}
    times = interleaved(fns, args.reps, args.warmup, device, between=restore, label="part 2")
    with torch.no_grad():
        errors = [float((projectors[n].project(p.grad.float()) - complements[n][0](p.grad.float())).norm()
                        / p.grad.float().norm().clamp_min(1e-30)) for n, p in zip(names, edit_params)]
    for p in edit_params:
        p.grad = None
        p.requires_grad_(False)
    restore()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["adam_step_plain"] + med["fwd_bwd_edit_batch"]
    paired_base = [a + b for a, b in zip(times["adam_step_plain"], times["fwd_bwd_edit_batch"])]

    def overheads(step: str) -> dict[str, float]:
        """(projected step - plain step) / (plain step + fwd+bwd): of the medians, and the median of paired reps."""
        return {"median": (med[step] - med["adam_step_plain"]) / base,
                "paired": statistics.median((p - a) / b for p, a, b in zip(times[step], times["adam_step_plain"],
                                                                            paired_base))}

    return {
        "edit_batch": len(examples), "padded_length": int(batch["input_ids"].shape[1]), "gamma": args.gamma,
        "kept_fraction": kept, "projector_build": summary(build_times),
        "timings": {k: summary(v) for k, v in times.items()},
        "step_overhead": (med["projected_adam_step_both"] - med["adam_step_plain"]) / base,
        "paired_step_overhead": statistics.median(
            (p - a) / b for p, a, b in zip(times["projected_adam_step_both"], times["adam_step_plain"], paired_base)),
        "eigenbasis_step_overhead": (med["projected_adam_step_eigenbasis"] - med["adam_step_plain"]) / base,
        "paired_eigenbasis_step_overhead": statistics.median(
            (p - a) / b for p, a, b in zip(times["projected_adam_step_eigenbasis"], times["adam_step_plain"],
                                           paired_base)),
        "bf16_gradient_step_overheads": {mode: overheads(f"projected_adam_step_{mode}_bf16_gradient")
                                         for mode in ("both", "eigenbasis")},
        "prototype_step_overhead": (med["prototype_complement_step_both"] - med["adam_step_plain"]) / base,
        "prototype_subspace_sizes": {n: {"rows_I": c[1], "cols_J": c[2]} for n, c in complements.items()},
        "prototype_max_rel_error": max(errors),
    }


# ----------------------------------------------------------------------------------------------------------------
# Part 3: big-shape random factors


def random_spd(n: int, rank: int, eps: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """X X^T / k + eps * diag(1 + u), X (n, k) standard normal, u uniform in [0, 1) (distinct small eigenvalues)."""
    x = torch.randn(n, rank, generator=generator, dtype=torch.float32).to(device)
    jitter = eps * (1 + torch.rand(n, generator=generator, dtype=torch.float32)).to(device)
    out = x @ x.T
    out.div_(rank)
    out.diagonal().add_(jitter)
    return out


def part_big(args, device) -> dict[str, Any]:
    from crispedit_easyedit.optim import ProjectedAdam
    from crispedit_easyedit.projector import KroneckerProjector, energy_mask, stable_eigh

    d_out, d_in = (int(v) for v in args.big_shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    logger.info("part 3: random SPD factors, S %dx%d and A %dx%d (rank %d + jitter)", d_out, d_out, d_in, d_in,
                args.big_rank)
    started = time.perf_counter()
    A = random_spd(d_in, min(args.big_rank, d_in), 1e-3, gen, device)
    S = random_spd(d_out, min(args.big_rank, d_out), 1e-3, gen, device)
    _sync(device)
    logger.info("factors built in %.1fs", time.perf_counter() - started)
    eig: dict[str, Any] = {}
    eigh_times = {"eigh_S_dout": [], "eigh_A_din": []}
    for rep in range(args.big_eigh_reps):
        eigh_times["eigh_S_dout"].append(timed(lambda: eig.update(S=stable_eigh(S)), device))
        logger.info("eigh of S (%d) %.2fs", d_out, eigh_times["eigh_S_dout"][-1])
        eigh_times["eigh_A_din"].append(timed(lambda: eig.update(A=stable_eigh(A)), device))
        logger.info("eigh of A (%d) %.2fs", d_in, eigh_times["eigh_A_din"][-1])
    del A, S
    mask_holder = {}
    mask_time = timed(lambda: mask_holder.update(m=energy_mask(eig["S"][0], eig["A"][0], args.gamma)), device)
    projector = KroneckerProjector(eig["A"][0], eig["A"][1], eig["S"][0], eig["S"][1], mask_holder["m"], args.gamma)
    del eig, mask_holder
    logger.info("energy mask %.2fs, kept fraction %.4f", mask_time, projector.diagnostics().kept_fraction)

    weight = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen).to(device) * 0.02)
    weight.grad = torch.randn(d_out, d_in, generator=gen).to(device) * 1e-3
    original = weight.detach().clone()

    def restore():
        with torch.no_grad():
            weight.copy_(original)

    complement, rows, cols = complement_projection(projector)
    logger.info("removed-direction support %d x %d", rows, cols)
    plain = torch.optim.Adam([weight], lr=args.lr)
    projected = ProjectedAdam([weight], [projector.project], mode="both", lr=args.lr)
    eigen = ProjectedAdam([weight], [projector], mode="eigenbasis", lr=args.lr)
    prototype = ProjectedAdam([weight], [complement], mode="both", lr=args.lr)
    low = projector.in_dtype(torch.bfloat16)
    eigen_bf16 = ProjectedAdam([weight], [projector], mode="eigenbasis", lr=args.lr, gradient_projections=[low])
    fns = {"big_adam_step_plain": plain.step, "big_projected_adam_step_both": projected.step,
           "big_projected_adam_step_eigenbasis": eigen.step,
           "big_projected_adam_step_eigenbasis_bf16_gradient": eigen_bf16.step,
           "big_prototype_complement_step_both": prototype.step}
    times = interleaved(fns, args.big_reps, args.big_warmup, device, between=restore, label="part 3")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": [d_out, d_in], "rank": args.big_rank, "kept_fraction": projector.diagnostics().kept_fraction,
        "prototype_subspace_sizes": {"rows_I": rows, "cols_J": cols},
        "eigh": {k: summary(v) for k, v in eigh_times.items()}, "energy_mask": round(mask_time, 4),
        "timings": {k: summary(v) for k, v in times.items()},
        "ratio_projected_vs_plain": med["big_projected_adam_step_both"] / med["big_adam_step_plain"],
        "ratio_eigenbasis_vs_plain": med["big_projected_adam_step_eigenbasis"] / med["big_adam_step_plain"],
        "ratio_eigenbasis_bf16_gradient_vs_plain": (med["big_projected_adam_step_eigenbasis_bf16_gradient"]
                                                    / med["big_adam_step_plain"]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    env["thread_env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def markdown(result: dict[str, Any]) -> str:
    rows = ["| part | measurement | median (s) | min (s) | max (s) | n |", "|---|---|---:|---:|---:|---:|"]

    def add(part, name, s):
        rows.append(f"| {part} | {name} | {s['median']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {s['n']} |")

    metrics = ["", "| metric | value | goal | met |", "|---|---:|---:|---|"]
    p1 = result.get("collection")
    if p1:
        label = f"1 ({p1['num_sequences']}x{p1['seq_len']} tok)"
        for name, s in p1["timings"].items():
            add(label, name, s)
        n_layers = len(result["config"]["layers"].split(","))
        for key, title in (("all", "all params"), ("edit", f"{n_layers} edit weights only")):
            value, paired = p1[f"ratio_vs_fwd_bwd_{key}"], p1[f"paired_ratio_vs_fwd_bwd_{key}"]
            metrics.append(f"| K-FAC collection / fwd+bwd ({title}) | {value:.2f}x (paired {paired:.2f}x)"
                           f" | <= 1.1x | {'yes' if value <= 1.1 else 'NO'} |")
    p2 = result.get("step")
    if p2:
        label = f"2 (batch {p2['edit_batch']}, len {p2['padded_length']})"
        add(label, f"projector build (eigh + mask, {len(p2['kept_fraction'])} layers)", p2["projector_build"])
        for name, s in p2["timings"].items():
            add(label, name, s)
        value = p2["step_overhead"]
        metrics.append(f"| projected step overhead (both) / (plain Adam + fwd+bwd) | {100 * value:.1f}% "
                       f"(paired {100 * p2['paired_step_overhead']:.1f}%) | <= 10% | "
                       f"{'yes' if value <= 0.10 else 'NO'} |")
        value = p2["eigenbasis_step_overhead"]
        metrics.append(f"| projected step overhead (eigenbasis) / (plain Adam + fwd+bwd) | {100 * value:.1f}% "
                       f"(paired {100 * p2['paired_eigenbasis_step_overhead']:.1f}%) | <= 10% | "
                       f"{'yes' if value <= 0.10 else 'NO'} |")
        for mode, value in p2.get("bf16_gradient_step_overheads", {}).items():
            metrics.append(f"| projected step overhead ({mode}, gradient_projection_dtype bfloat16) | "
                           f"{100 * value['median']:.1f}% (paired {100 * value['paired']:.1f}%) | <= 10% | "
                           f"{'yes' if value['median'] <= 0.10 else 'NO'} |")
        metrics.append(f"| same, prototype complement projection (not in package) | "
                       f"{100 * p2['prototype_step_overhead']:.1f}% | <= 10% | "
                       f"{'yes' if p2['prototype_step_overhead'] <= 0.10 else 'NO'} |")
        kept = ", ".join(f"{n.split('.')[2]}: {v:.3f}" for n, v in p2["kept_fraction"].items())
        sizes = ", ".join(f"{n.split('.')[2]}: {v['rows_I']}x{v['cols_J']}"
                          for n, v in p2["prototype_subspace_sizes"].items())
        metrics.append(f"| kept fraction per layer (gamma {p2['gamma']}) | {kept} | | |")
        metrics.append(f"| removed-direction support I x J per layer (prototype) | {sizes} | | |")
        metrics.append(f"| prototype max relative error vs project() | {p2['prototype_max_rel_error']:.1e} | | |")
    p3 = result.get("big")
    if p3:
        d_out, d_in = p3["shape"]
        label = f"3 ({d_out}x{d_in}, random)"
        for name, s in p3["eigh"].items():
            add(label, name.replace("dout", str(d_out)).replace("din", str(d_in)), s)
        for name, s in p3["timings"].items():
            add(label, name, s)
        metrics.append(f"| big projected step / plain Adam step ({d_out}x{d_in}) | "
                       f"{p3['ratio_projected_vs_plain']:.0f}x (both), {p3['ratio_eigenbasis_vs_plain']:.0f}x "
                       f"(eigenbasis), {p3.get('ratio_eigenbasis_bf16_gradient_vs_plain', float('nan')):.0f}x "
                       f"(eigenbasis, bf16 gradient) | | |")
        metrics.append(f"| big kept fraction (gamma {result['config']['gamma']}); removed-direction support I x J | "
                       f"{p3['kept_fraction']:.4f}; {p3['prototype_subspace_sizes']['rows_I']}x"
                       f"{p3['prototype_subspace_sizes']['cols_J']} | | |")
        metrics.append(f"| big energy mask (s) | {p3['energy_mask']:.2f} | | |")
    return "\n".join(rows + metrics)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct-offline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", default="14,15,16,17,18", help="comma-separated layer indices of down_proj")
    parser.add_argument("--corpus", default="wikipedia-offline")
    parser.add_argument("--num-sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--zsre", default=str(DEFAULT_ZSRE), help="ZsRE (MEND) json for the edit batch")
    parser.add_argument("--edit-batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--gamma", type=float, default=0.8, help="energy threshold of the projectors")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of parts 1 and 2")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-collection", action="store_true", help="skip parts 1 and 2 (the model)")
    parser.add_argument("--skip-big", action="store_true", help="skip part 3")
    parser.add_argument("--big-shape", default="4096x14336", help="d_out x d_in of part 3")
    parser.add_argument("--big-rank", type=int, default=1024, help="rank k of X in the random factors X X^T / k")
    parser.add_argument("--big-reps", type=int, default=3)
    parser.add_argument("--big-warmup", type=int, default=0,
                        help="untimed rounds of part 3 (one projected step takes minutes on a small CPU)")
    parser.add_argument("--big-eigh-reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="log a torch.profiler table of part 1")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSONL file to append to ('' = none)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    from crispedit_easyedit.bench.job import portable_path

    config = dict(vars(args), zsre=portable_path(args.zsre), output=portable_path(args.output) if args.output else "")
    result: dict[str, Any] = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
                              "config": config, "environment": environment(device)}
    names = [DOWN_PROJ.format(int(i)) for i in args.layers.split(",")]
    if not args.skip_collection:
        from crispedit_easyedit.bench.models import load_model_and_tokenizer

        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
        result["collection"], factors = part_collection(model, tok, args, device, names)
        result["step"] = part_step(model, tok, args, device, names, factors)
        del model, factors
    if not args.skip_big:
        result["big"] = part_big(args, device)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        result["environment"]["load_average_end"] = os.getloadavg()
    table = markdown(result)
    print(table)
    print(f"\nwall time {result['wall_seconds']:.0f}s; {result['environment']['cpu_count']} CPUs, device "
          f"{result['environment'].get('device_name', result['environment']['device'])}, torch "
          f"{result['environment']['torch']}, transformers {result['environment']['transformers']}")
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(result, default=str) + "\n")
        logger.info("appended the result to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
