"""Save only the tensors an edit changed (safetensors + JSON metadata) and apply them back onto the base model."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import __version__

logger = logging.getLogger(__name__)

_META_KEY = "crispedit_easyedit_delta"


def save_changed_tensors(model: nn.Module, names: list[str], path: str | os.PathLike,
                         base_fingerprint: Mapping[str, Any] | None = None,
                         config: Mapping[str, Any] | None = None) -> Path:
    """Write the current values of the parameters ``names`` (the edited weights), atomically.

    Args:
        model: the edited model.
        names: parameter paths to store.
        path: the .safetensors file to write.
        base_fingerprint: the base model's fingerprint (see curvature.model_fingerprint), checked on apply.
        config: the edit configuration, stored as JSON for provenance.
    """
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"the model has no parameters {missing}")
    tensors = {n: params[n].detach().cpu().contiguous() for n in names}
    metadata = {"package_version": __version__, "base_model": dict(base_fingerprint or {}),
                "config": dict(config or {}), "shapes": {n: list(t.shape) for n, t in tensors.items()},
                "dtypes": {n: str(t.dtype) for n, t in tensors.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(metadata, sort_keys=True, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("saved %d changed tensors to %s", len(tensors), path)
    return path


def apply_changed_tensors(model: nn.Module, path: str | os.PathLike,
                          expected_base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Copy the stored tensors into ``model`` (bit-exact); returns the stored metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a delta of this package, names a parameter the model lacks, a shape or dtype
            differs, or ``expected_base`` is given and differs from the recorded base-model name.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no changed-tensors file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own types for truncated or foreign files
        raise ValueError(f"{path} cannot be read as a safetensors file ({type(exc).__name__}: {exc})") from exc
    if raw is None:
        raise ValueError(f"{path} is not a crispedit_easyedit changed-tensors file (no metadata)")
    metadata = json.loads(raw)
    if expected_base is not None:
        recorded = metadata.get("base_model", {}).get("name")
        if recorded != expected_base.get("name"):
            raise ValueError(f"{path} was made for base model {recorded!r}, not {expected_base.get('name')!r}")
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise ValueError(f"{path} changes parameter {name!r}, which the model does not have")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    logger.info("applied %d changed tensors from %s", len(tensors), path)
    return metadata
