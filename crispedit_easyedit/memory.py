"""How much memory CrispEdit needs per edited layer, before running it (issue 10).

``memory_plan`` adds up, per layer of shape (d_out, d_in): the K-FAC factors A (d_in, d_in) and S (d_out, d_out) in
``factor_dtype``; their eigenbases (the same sizes plus the eigenvalues); the bool energy mask (d_out, d_in); the
optimizer state (two fp32 Adam moments, plus an fp32 master copy when the weights are bf16/fp16) and the weight's
gradient; and the peak transient, the largest of: the ``eigh`` of the larger factor, the energy mask's working set
and the two (d_out, d_in) temporaries of one projection (:func:`crispedit_easyedit.projector.projector_memory_bytes`).
Everything resident lives on the layer's own device (see the README on ``device_map``); transients do not overlap
across layers, so a device's peak is its layers' resident sum plus the largest transient among them.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .projector import projector_memory_bytes


def _item(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def layer_memory(d_out: int, d_in: int, param_dtype: torch.dtype = torch.bfloat16,
                 factor_dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes for one edited (d_out, d_in) weight: ``factors``, ``eigenbases``, ``mask``, ``optimizer`` (moments and
    master weights), ``gradient``, ``resident`` (their sum) and ``transient`` (the largest passing peak)."""
    f = _item(factor_dtype)
    projector = projector_memory_bytes(d_out, d_in, factor_dtype)
    plan = {
        "factors": f * (d_in * d_in + d_out * d_out),
        "eigenbases": projector["resident"] - d_out * d_in,  # the projector's resident bytes less its mask
        "mask": d_out * d_in,
        "optimizer": 4 * d_out * d_in * (2 + (param_dtype != torch.float32)),
        "gradient": _item(param_dtype) * d_out * d_in,
        "transient": max(projector["eigh_peak"], projector["mask_peak"], projector["project_transient"]),
    }
    plan["resident"] = sum(plan[k] for k in ("factors", "eigenbases", "mask", "optimizer", "gradient"))
    return plan


def memory_plan(layers: Mapping[str, tuple[int, int]], param_dtype: torch.dtype = torch.bfloat16,
                factor_dtype: torch.dtype = torch.float32) -> dict[str, dict[str, int]]:
    """Per-layer plans (see :func:`layer_memory`) and ``total``: the resident parts summed, ``transient`` the largest
    one, ``peak`` = resident + transient (all layers on one device).

    Args:
        layers: {parameter path: (d_out, d_in)}, e.g. ``{f"model.layers.{i}.mlp.down_proj.weight": (4096, 14336)}``.
        param_dtype: the model weights' dtype (fp32 master weights are kept for bf16/fp16).
        factor_dtype: ``mom2_dtype`` (float32 or float64).
    """
    plans = {name: layer_memory(d_out, d_in, param_dtype, factor_dtype) for name, (d_out, d_in) in layers.items()}
    total = {key: sum(p[key] for p in plans.values()) for key in next(iter(plans.values()))}
    total["transient"] = max(p["transient"] for p in plans.values())
    total["peak"] = total["resident"] + total["transient"]
    return dict(plans, total=total)
