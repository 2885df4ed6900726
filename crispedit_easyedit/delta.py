"""Save only the tensors an edit changed (safetensors + JSON metadata) and apply them back onto the base model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import __version__
from .curvature import CacheCorruptError, model_fingerprint, read_safetensors, write_safetensors

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
        base_fingerprint: the *base* (unedited) model's fingerprint, ``curvature.model_fingerprint(base, names)``
            (``names`` hashed completely), checked by :func:`apply_changed_tensors`. Without it the file cannot be
            checked against its base (applying it logs a WARNING).
        config: the edit configuration, stored as JSON for provenance.
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"the model has no parameters {missing}")
    tensors = {n: params[n].detach().cpu().contiguous() for n in names}
    metadata = {"package_version": __version__, "base_model": dict(base_fingerprint or {}),
                "config": dict(config or {}), "shapes": {n: list(t.shape) for n, t in tensors.items()},
                "dtypes": {n: str(t.dtype) for n, t in tensors.items()}}
    path = write_safetensors(path, tensors, metadata, meta_key=_META_KEY)
    logger.info("saved %d changed tensors to %s", len(tensors), path)
    return path


def read_changed_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a changed-tensors file without a model (cheap: only the edited tensors): every tensor is
    read, so a truncated file is found here, before any evaluation.

    Returns:
        ({parameter path: tensor on the CPU}, the stored metadata).

    Raises:
        FileNotFoundError: no such file (or a folder).
        ValueError: not readable as safetensors (truncated, foreign), not a changed-tensors file of this package,
            or its tensors disagree with its own metadata.
    """
    path = Path(path).expanduser()
    try:
        tensors, metadata = read_safetensors(path, "changed-tensors file", meta_key=_META_KEY)
    except CacheCorruptError as exc:
        raise ValueError(str(exc)) from exc
    for name, tensor in tensors.items():
        shape, dtype = metadata.get("shapes", {}).get(name), metadata.get("dtypes", {}).get(name)
        if shape is not None and list(tensor.shape) != list(shape) or dtype is not None and str(tensor.dtype) != dtype:
            raise ValueError(f"{path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype} but the file's "
                             f"metadata says {shape} {dtype}; the file is damaged")
    return tensors, metadata


def apply_changed_tensors(model: nn.Module, path: str | os.PathLike,
                          expected_base: Mapping[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Copy the stored tensors into ``model`` (bit-exact) after checking that ``model`` is their base; returns the
    stored metadata.

    Checks, before anything is copied: every stored parameter exists with the same shape and dtype, and the
    model's weights fingerprint (``curvature.model_fingerprint(model, names)``, the stored names hashed completely)
    equals the base fingerprint recorded when the edit was saved. A file without a recorded fingerprint is applied
    with a WARNING.

    Args:
        model: the base model (unedited).
        path: a file written by :func:`save_changed_tensors` (``crispedit edit --save delta``).
        expected_base: if given, its ``weights_sha256`` (or, without one, its ``name``) must equal the recorded one.
        force: apply even though the fingerprint or a dtype differs (tensors are then converted to the model's
            dtype); a WARNING names both. Names and shapes must match in every case.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a delta of this package or is damaged, names a parameter the model lacks, a
            shape differs, or (without ``force``) a dtype or the base fingerprint differs; each names both values.
    """
    path = Path(path).expanduser()
    tensors, metadata = read_changed_tensors(path)
    return apply_read_tensors(model, tensors, metadata, path, expected_base=expected_base, force=force)


def apply_read_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                       path: str | os.PathLike, expected_base: Mapping[str, Any] | None = None,
                       force: bool = False) -> dict[str, Any]:
    """:func:`apply_changed_tensors` on the output of :func:`read_changed_tensors` (``path`` only names the file in
    messages), so a caller that read the file early to check it does not read it again."""
    params = dict(model.named_parameters())
    problems = []
    for name, tensor in tensors.items():
        if name not in params:
            raise ValueError(f"{path} changes parameter {name!r}, which the model does not have")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
        if params[name].dtype != tensor.dtype:
            problems.append(f"{name} is {tensor.dtype} in the file but {params[name].dtype} in the model "
                            "(load the model in the dtype it was edited in, e.g. --dtype)")
    recorded = metadata.get("base_model") or {}
    if recorded.get("weights_sha256") and not problems:  # the hash includes dtypes: compare only when they agree
        found = model_fingerprint(model, list(tensors))["weights_sha256"]
        if found != recorded["weights_sha256"]:
            problems.append(f"the model's weights fingerprint is {found[:16]}..., but the edit was made on a base "
                            f"with fingerprint {recorded['weights_sha256'][:16]}... (base model "
                            f"{recorded.get('name', '?')!r}): this is a different model, or it is already edited")
    elif not recorded.get("weights_sha256"):
        logger.warning("%s records no base-model fingerprint: cannot check that the model is its base", path)
    if expected_base is not None:
        key = "weights_sha256" if expected_base.get("weights_sha256") else "name"
        if recorded.get(key) != expected_base.get(key):
            problems.append(f"{path} was made for base model {key} {recorded.get(key)!r}, not "
                            f"{expected_base.get(key)!r}")
    if problems:
        message = f"{path} does not fit this model: " + "; ".join(problems)
        if not force:
            raise ValueError(message + " (pass force=True, or --force-apply on the command line, to apply anyway)")
        logger.warning("%s; applying anyway (force)", message)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    logger.info("applied %d changed tensors from %s", len(tensors), path)
    return metadata
