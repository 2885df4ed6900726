"""Which dtype projects the gradient (``hparams.gradient_projection_dtype``), resolved for the edit weights' device.

The step's projection (modes "update", "both") or unrotation (mode "eigenbasis") always runs in the eigenbasis'
dtype, so a lower-precision *gradient* projection adds no leak out of the kept subspace; it only perturbs the
direction Adam follows (``tests/test_optim.py`` bounds both). bf16 matrix products are cheaper only where the
hardware multiplies bf16 natively, which is what "auto" checks.
"""

from __future__ import annotations

import torch

from .choices import GRADIENT_PROJECTION_DTYPES

GRADIENT_DTYPES: dict[str, torch.dtype | None] = {"basis": None, "bfloat16": torch.bfloat16}
"""The fixed choices of ``hparams.gradient_projection_dtype`` -> dtype (None: the eigenbasis' own); "auto" is
resolved by :func:`gradient_projection_dtype`."""


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with native bf16 (Ampere or newer), or a
    CPU with AVX512-BF16 or AMX tiles. Elsewhere bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def gradient_projection_dtype(choice: str, device: torch.device | str) -> torch.dtype | None:
    """``hparams.gradient_projection_dtype`` -> the dtype that projects the gradient on ``device``.

    Args:
        choice: "basis" (None: the eigenbasis' own dtype), "bfloat16", or "auto" (bfloat16 where
            :func:`native_bf16` holds for ``device``, else the basis dtype).
        device: the device of the edit weights and their eigenbases.

    Raises:
        ValueError: ``choice`` is none of them (the message names the valid ones).
    """
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if choice not in GRADIENT_DTYPES:
        raise ValueError(f"gradient_projection_dtype must be one of "
                         f"{', '.join(repr(c) for c in GRADIENT_PROJECTION_DTYPES)}; got {choice!r}")
    return GRADIENT_DTYPES[choice]
