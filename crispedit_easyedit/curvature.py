"""K-FAC curvature statistics for chosen weight matrices, collected with hooks in one pass over a corpus.

For a layer s = W a with W of shape (d_out, d_in), shared over the token positions of a sequence, the statistics are

    A = (1/N) sum_t a_t a_t^T        (d_in, d_in)     over the layer inputs a_t,
    S = (1/(N m)) sum_t sum_k g_tk g_tk^T  (d_out, d_out)  over the output gradients g_tk = d(-log p(y_k | x))/d s_t,

where t runs over the N *counted* token positions (those with a next-token label inside the attention mask,
minus any excluded sink positions), and y_k are the labels of the k-th of m backward passes:

* ``"mc"``: labels sampled from the model's own predictive distribution (one fresh sample per position and pass).
  In expectation over the samples, S (x) A is the K-FAC ("expand") approximation of the Gauss-Newton Hessian of
  the token-mean capability loss, which is what the paper's Bregman constraint needs. This is the default.
* ``"empirical"``: the true next tokens (m = 1): the empirical Fisher that the reference code uses.

The gradient g_tk is that of the *summed* token losses, so the product A (x) S approximates the GNH of the
token-mean loss, and ``1/2 tr(dW^T S dW A)`` predicts the increase of the mean per-token loss (in nats).

Vec convention: with vec stacking columns (column-major), G ~ A (x) S; PyTorch's row-major ``W.flatten()`` pairs
with S (x) A. For transformers' GPT-2 ``Conv1D``, whose weight is stored as (d_in, d_out), A and S are still
(d_in, d_in) and (d_out, d_out): callers transpose the weight (see :func:`weight_orientation`).

Caches are safetensors files with JSON metadata; see :class:`FactorSet`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checks import CurvatureError, TEMP_PREFIX, check_factor, remove_stale_temporaries, user_file_mode  # noqa: F401
from .choices import FISHER_TYPES

logger = logging.getLogger(__name__)

FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# 2: keys hold no machine path (tokenizer content hash, corpus key, weights hash)
# 3: "mc" labels drawn by inverse-CDF sampling (sample_labels), so a seed gives other labels than version 2's
CACHE_FORMAT_VERSION = 3
_META_KEY = "crispedit_easyedit"


class CacheError(ValueError):
    """Base class of cache errors."""


class CacheMismatchError(CacheError):
    """A cache file exists but was computed for something else; names the mismatching field."""

    def __init__(self, path: str | os.PathLike, field_name: str, expected: Any, found: Any):
        self.field_name, self.expected, self.found = field_name, expected, found
        super().__init__(
            f"curvature cache {path} does not match the request: field {field_name!r} is {found!r} in the file "
            f"but {expected!r} was asked for; delete the file or point cache_dir elsewhere to recompute")


class CacheCorruptError(CacheError):
    """A cache file cannot be read (truncated, not safetensors, or missing tensors)."""


# ----------------------------------------------------------------------------------------------------------------
# Layers


def resolve_module(model: nn.Module, param_name: str) -> nn.Module:
    """The module that owns ``param_name`` (e.g. "model.layers.3.mlp.down_proj.weight" -> the down_proj Linear).

    Raises:
        KeyError: the parameter does not exist (the message lists a few similar names).
        ValueError: the owner is neither ``nn.Linear`` nor transformers' ``Conv1D``, or the parameter is not its weight.
    """
    params = dict(model.named_parameters())
    if param_name not in params:
        import difflib

        close = difflib.get_close_matches(param_name, list(params), n=3)
        raise KeyError(f"the model has no parameter {param_name!r}; closest names: {close}")
    module_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf != "weight":
        raise ValueError(f"{param_name!r}: only weight matrices can be edited, not {leaf!r}")
    weight_orientation(module)  # validates the module type
    return module


def weight_orientation(module: nn.Module) -> bool:
    """True if the module stores its weight transposed, as (d_in, d_out) (GPT-2 ``Conv1D``); False for Linear."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    raise ValueError(f"unsupported layer type {type(module).__name__}: expected torch.nn.Linear or transformers Conv1D")


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D layer."""
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if weight_orientation(module) else (weight.shape[0], weight.shape[1])


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow: ``config.max_position_embeddings`` or
    ``config.n_positions`` (GPT-2), or None when the config names neither."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: nn.Module, length: int, what: str) -> None:
    """Raise ValueError naming ``what`` if sequences of ``length`` tokens exceed the model's positions.

    Checked before any work, because a model fed more positions than it has fails deep inside its embedding (an
    IndexError for GPT-2's learned positions) after minutes of collection or editing.
    """
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what} is {length}, but the model has only {limit} positions "
                         f"(config max_position_embeddings/n_positions); choose {what} <= {limit}")


# ----------------------------------------------------------------------------------------------------------------
# Factors


@dataclass
class KFACFactors:
    """K-FAC factors of one weight matrix.

    Attributes:
        A: (d_in, d_in) mean input-activation outer product.
        S: (d_out, d_out) mean output-gradient outer product.
        num_tokens: number of token positions the means are over (the merge weight).
    """

    A: torch.Tensor
    S: torch.Tensor
    num_tokens: int


def check_factors(layer: str, A: torch.Tensor, S: torch.Tensor | None, source: str = "") -> None:
    """Check both factors of one layer: square, finite, symmetric (positive semi-definiteness is checked on the
    spectrum, when they are eigendecomposed: :func:`crispedit_easyedit.projector.stable_eigh`).

    Raises:
        CurvatureError: naming the layer, the factor and what failed.
    """
    check_factor(A, layer, "A", source)
    if S is not None:
        check_factor(S, layer, "S", source)


@dataclass
class FactorSet:
    """K-FAC factors of several weight matrices, keyed by parameter path, with the metadata that identifies them.

    ``metadata`` holds JSON-serialisable values: model fingerprint, layers, shapes, corpus fingerprint, number of
    sequences and tokens, sequence length, fisher type, dtype, package version.
    """

    factors: dict[str, KFACFactors]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> KFACFactors:
        return self.factors[name]

    def merge(self, other: "FactorSet", weight: float = 1.0) -> "FactorSet":
        """Token-weighted streaming average: A = (n1 A1 + w n2 A2) / (n1 + w n2), likewise S, per layer.

        ``weight`` w = 1 is the plain token weighting (paper Algorithm 2); w > 1 lets ``other`` (e.g. the statistics
        of past edits) count as if it had w times its tokens. Both sets must cover the same layers with the same
        shapes. The result counts n1 + n2 tokens; its (constant-size) metadata records the weight and both counts.
        """
        if weight < 0:
            raise ValueError(f"merge weight must be >= 0, got {weight!r}")
        if set(self.factors) != set(other.factors):
            raise ValueError(f"cannot merge factor sets over different layers: {sorted(self.factors)} vs "
                             f"{sorted(other.factors)}")
        merged = {}
        for name, mine in self.factors.items():
            theirs = other.factors[name]
            if mine.A.shape != theirs.A.shape or mine.S.shape != theirs.S.shape:
                raise ValueError(f"cannot merge {name}: shapes {tuple(mine.S.shape)}x{tuple(mine.A.shape)} vs "
                                 f"{tuple(theirs.S.shape)}x{tuple(theirs.A.shape)}")
            n1, n2 = mine.num_tokens, theirs.num_tokens * weight
            if n1 + n2 == 0:
                raise ValueError(f"cannot merge {name}: both factor sets count zero tokens")
            w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
            merged[name] = KFACFactors(
                A=w1 * mine.A + w2 * theirs.A.to(mine.A.device, mine.A.dtype),
                S=w1 * mine.S + w2 * theirs.S.to(mine.S.device, mine.S.dtype),
                num_tokens=mine.num_tokens + theirs.num_tokens,
            )
        return FactorSet(merged, {"merge_weight": weight, "merged_num_tokens": [self.metadata.get("num_tokens"),
                                                                                 other.metadata.get("num_tokens")]})

    def to(self, device: torch.device | str) -> "FactorSet":
        """Move every factor to ``device`` (returns a new set)."""
        return FactorSet({n: KFACFactors(f.A.to(device), f.S.to(device), f.num_tokens) for n, f in self.factors.items()},
                         dict(self.metadata))

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file atomically (temp file in the same folder + rename). Returns the path."""
        tensors = {}
        layers = {}
        for name, f in self.factors.items():
            tensors[f"{name}::A"], tensors[f"{name}::S"] = f.A, f.S
            layers[name] = {"A_shape": list(f.A.shape), "S_shape": list(f.S.shape), "num_tokens": f.num_tokens}
        metadata = dict(self.metadata, layers=layers, package_version=__version__,
                        cache_format_version=CACHE_FORMAT_VERSION)
        return write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None,
             device: torch.device | str = "cpu",
             devices: Mapping[str, torch.device | str] | None = None) -> "FactorSet":
        """Read a cache written by :meth:`save`, checking its metadata against ``expected``.

        Args:
            path: the safetensors file.
            expected: metadata fields that must match exactly (e.g. the output of :func:`curvature_identity`);
                a field ``layer_shapes`` ({name: [d_out, d_in]}) is checked against the stored tensors.
            device: where to put the factors.
            devices: per layer, where to put its factors (each edited layer's device under ``device_map``);
                layers not named go to ``device``.

        Raises:
            FileNotFoundError: no such file.
            CacheCorruptError: the file is truncated, not safetensors, or lacks tensors its metadata names.
            CacheMismatchError: a metadata field or a tensor shape differs from ``expected``.
            CurvatureError: a stored factor is not finite or not symmetric (see :func:`check_factors`).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no curvature cache at {path}")
        tensors, metadata = read_safetensors(path, "curvature cache")
        expected = dict(expected or {})
        shapes = expected.pop("layer_shapes", None)
        for key, value in expected.items():
            found = metadata.get(key, "<missing>")
            if found != value:
                raise CacheMismatchError(path, key, value, found)
        factors = {}
        for name, info in metadata.get("layers", {}).items():
            try:
                A, S = tensors[f"{name}::A"], tensors[f"{name}::S"]
            except KeyError as exc:
                raise CacheCorruptError(f"curvature cache {path} lacks tensor {exc.args[0]!r}") from exc
            if list(A.shape) != info["A_shape"] or list(S.shape) != info["S_shape"]:
                raise CacheCorruptError(f"curvature cache {path}: tensors of {name} have shapes {list(S.shape)}, "
                                        f"{list(A.shape)} but the metadata says {info['S_shape']}, {info['A_shape']}")
            check_factors(name, A, S, source=str(path))
            where = (devices or {}).get(name, device)
            factors[name] = KFACFactors(A.to(where), S.to(where), int(info["num_tokens"]))
        if shapes is not None:
            for name, (d_out, d_in) in shapes.items():
                if name not in factors:
                    raise CacheMismatchError(path, "layers", sorted(shapes), sorted(factors))
                found = [factors[name].S.shape[0], factors[name].A.shape[0]]
                if found != [d_out, d_in]:
                    raise CacheMismatchError(path, f"shape of {name} (d_out, d_in)", [d_out, d_in], found)
        return cls(factors, metadata)


# ----------------------------------------------------------------------------------------------------------------
# safetensors files with JSON metadata (every file this package writes to load back)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any], meta_key: str = _META_KEY) -> Path:
    """Write ``tensors`` with JSON ``metadata`` (under ``meta_key``) atomically: a temporary file in the same folder,
    renamed into place. The file gets the user's normal permissions (0o666 & ~umask), not mkstemp's 0600, and
    temporary files that earlier, interrupted writes left in the folder (older than
    :data:`~crispedit_easyedit.checks.STALE_TEMP_SECONDS`) are removed first."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, TEMP_PREFIX + "*.safetensors")
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={meta_key: json.dumps(metadata, sort_keys=True, default=str)})
        os.chmod(tmp, user_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_safetensors(path: str | os.PathLike, what: str = "file",
                     meta_key: str = _META_KEY) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON metadata of a file written by :func:`write_safetensors` (on the CPU).

    Raises:
        FileNotFoundError: no such file.
        CacheCorruptError: the file is truncated, not safetensors, or has no metadata under ``meta_key``.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(meta_key)
            if raw is None:
                raise CacheCorruptError(f"{path} is a safetensors file without crispedit_easyedit metadata "
                                        f"({meta_key!r}): not a {what}")
            return {key: handle.get_tensor(key) for key in handle.keys()}, json.loads(raw)
    except CacheError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CacheCorruptError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc}); "
                                "delete it or write it again") from exc


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints and cache keys


def _tensor_bytes(tensor: torch.Tensor, max_values: int | None = None) -> bytes:
    flat = tensor.detach().reshape(-1)
    if max_values is not None and flat.numel() > max_values:
        flat = flat[:: flat.numel() // max_values][:max_values]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, full_params: Iterable[str] = (), sample_values: int = 4096) -> dict[str, Any]:
    """Identify a model's weights cheaply: name, revision, and a sha256 over every parameter.

    Parameters named in ``full_params`` are hashed completely; every other parameter contributes its name, shape,
    dtype and a strided sample of ``sample_values`` values, so any edit that changes many values is detected.
    ``name`` is the model id, or only the last component of a local folder's path (no machine path is recorded);
    it is informative and not part of curvature cache keys.
    """
    config = getattr(model, "config", None)
    digest = hashlib.sha256()
    full = set(full_params)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(_tensor_bytes(param, None if name in full else sample_values))
    return {
        "name": portable_model_name(str(getattr(config, "_name_or_path", "") or type(model).__name__)),
        "revision": getattr(config, "_commit_hash", None),
        "weights_sha256": digest.hexdigest(),
    }


def portable_model_name(name: str) -> str:
    """A model id as given (``org/model``), or the last path component when ``name`` is a local path."""
    if os.path.isabs(name) or name.startswith(("~", ".")) or os.path.exists(name):
        return Path(name.rstrip("/\\")).name or name
    return name


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of a tokenizer's *content*: its vocabulary, merges, normalisation and special tokens (no path).

    Fast tokenizers hash their ``tokenizers`` JSON (without the transient padding/truncation settings); slow ones
    their vocabulary. Two copies of one tokenizer in different folders, or under different names, agree.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("padding", None)
        content.pop("truncation", None)
    else:
        content = sorted(tok.get_vocab().items())
    extra = {"class": type(tok).__name__.removesuffix("Fast"),
             "special": {k: str(v) for k, v in sorted((getattr(tok, "special_tokens_map", None) or {}).items())},
             "bos": getattr(tok, "bos_token_id", None), "eos": getattr(tok, "eos_token_id", None)}
    payload = json.dumps([content, extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def curvature_identity(model_fp: Mapping[str, Any], param_names: list[str], layer_shapes: Mapping[str, tuple],
                       corpus_fp: str, num_sequences: int, seq_len: int, fisher_type: str, mc_samples: int,
                       dtype: str, exclude_first_tokens: int, seed: int) -> dict[str, Any]:
    """Everything that determines a curvature statistic, as JSON-able metadata (the cache key is its hash)."""
    return {
        "model": dict(model_fp),
        "param_names": list(param_names),
        "layer_shapes": {n: list(s) for n, s in layer_shapes.items()},
        "corpus": corpus_fp,
        "num_sequences": int(num_sequences),
        "seq_len": int(seq_len),
        "fisher_type": fisher_type,
        "mc_samples": int(mc_samples) if fisher_type == "mc" else 1,
        "dtype": dtype,
        "exclude_first_tokens": int(exclude_first_tokens),
        "seed": int(seed) if fisher_type == "mc" else None,
        "cache_format_version": CACHE_FORMAT_VERSION,
    }


def identity_key(identity: Mapping[str, Any]) -> str:
    """A 24-hex-digit sha256 of a curvature identity (its JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def cache_path_for(cache_dir: str | os.PathLike, identity: Mapping[str, Any]) -> Path:
    """``{cache_dir}/kfac-<identity_key(identity)>.safetensors``."""
    return Path(cache_dir).expanduser() / f"kfac-{identity_key(identity)}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, and always without one (the process that writes caches)."""
    return distributed_world()[0] == 0


def shard_batches(batches: list, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share of ``batches``: every ``world``-th batch from index ``rank`` (all of them without a process
    group). Together the shards cover every batch exactly once."""
    if rank is None or world is None:
        rank, world = distributed_world()
    return list(batches)[rank::world]


def _embedding_device(model: nn.Module, getter: str) -> torch.device:
    """The device of ``model.<getter>().weight``; the first parameter's when the model has no such embedding (or,
    like a custom ``PreTrainedModel`` without it, raises NotImplementedError)."""
    try:
        embeddings = getattr(model, getter)() if hasattr(model, getter) else None
    except NotImplementedError:
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (the first device under ``device_map="auto"``)."""
    return _embedding_device(model, "get_input_embeddings")


def output_device(model: nn.Module) -> torch.device:
    """Where the logits come out: the output embedding's (LM head's) device (the last one under ``device_map``)."""
    return _embedding_device(model, "get_output_embeddings")


def _all_reduce_sums(tensors: list[torch.Tensor], counts: list[int], device: torch.device) -> list[int]:
    """Sum ``tensors`` in place and ``counts`` across the ranks of the default process group (no-op without one).

    Counts travel as one float64 tensor on ``device`` (exact up to 2**53); the factor sums keep their dtype.
    """
    import torch.distributed as dist

    if distributed_world()[1] == 1:
        return counts
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    totals = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return [int(v) for v in totals.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Collection


def loss_positions(attention_mask: torch.Tensor, exclude_first_tokens: int = 0) -> torch.Tensor:
    """Positions whose next-token prediction is counted: inside the mask with a next token inside the mask.

    Works for left and right padding. The first ``exclude_first_tokens`` real tokens of each sequence (attention
    sinks) are left out.

    Args:
        attention_mask: (batch, T) 0/1.

    Returns:
        (batch, T) bool; the last column is always False.
    """
    mask = attention_mask.bool()
    counted = torch.zeros_like(mask)
    counted[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if exclude_first_tokens > 0:
        rank = mask.long().cumsum(dim=1)  # 1 for the first real token
        counted &= rank > exclude_first_tokens
    return counted


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, T) position ids that start at 0 on the first real token, whatever the padding side."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def _accepts_position_ids(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments for a causal LM forward with padding-correct position ids."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return kwargs


class _FactorAccumulator:
    """Forward/backward hooks on one layer that sum a a^T and g g^T over counted positions in fp32/fp64."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module = module
        self.dtype = dtype
        self.transposed = weight_orientation(module)
        d_out, d_in = layer_shape(module)
        device = module.weight.device
        self.A = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.S = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        self.positions: torch.Tensor | None = None  # (batch, T) bool, set per batch
        self.handles = [module.register_forward_pre_hook(self._pre_hook), module.register_forward_hook(self._hook)]

    @staticmethod
    def _pre_hook(module, args):
        # Make the layer input a leaf that requires grad, so the backward pass stops here and needs no weight grads.
        (inp, *rest) = args
        if not inp.requires_grad:
            inp = inp.detach().requires_grad_(True)
        return (inp, *rest)

    def _hook(self, module, args, output):
        pos = self.positions
        a = args[0].detach()[pos].to(self.dtype)  # (n, d_in)
        self.A.addmm_(a.T, a)
        if output.requires_grad:
            output.register_hook(self._grad_hook)

    def _grad_hook(self, grad):
        g = grad.detach()[self.positions].to(self.dtype)  # (n, d_out)
        self.S.addmm_(g.T, g)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sample_labels(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One label per row of a categorical distribution, by inverse-CDF sampling.

    Draws u ~ U[0, total) per row and returns the first index whose cumulative probability exceeds u, so a
    zero-probability entry is never drawn. One uniform variate per row (``torch.multinomial`` draws one per
    vocabulary entry on CPU, about 12 % of a collection).

    Args:
        probs: (..., vocab) non-negative probabilities (rows need not sum exactly to 1).
        generator: Random generator on ``probs``' device.

    Returns:
        (...,) long labels in [0, vocab).
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def label_loss_grad(probs: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed token losses -log p(label) with respect to the logits, at the counted positions.

    d(-log softmax(z)_y)/dz = softmax(z) - onehot(y); positions that are not counted get zero. Injecting it with
    ``logits.backward(grad)`` needs no boolean indexing of the logits and no log-softmax graph.

    Args:
        probs: (batch, T, vocab) softmax of the logits.
        labels: (batch, T) long labels (any value where not counted).
        counted: (batch, T) bool positions whose loss counts.

    Returns:
        (batch, T, vocab) gradient, in ``probs``' dtype.
    """
    weight = counted.to(probs.dtype).unsqueeze(-1)  # (batch, T, 1)
    grad = probs * weight
    return grad.scatter_add_(-1, labels.unsqueeze(-1), -weight)


def collect_kfac_factors(
    model: nn.Module,
    param_names: list[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    fisher_type: str = "mc",
    mc_samples: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    exclude_first_tokens: int = 0,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> FactorSet:
    """Collect K-FAC factors of the named weight matrices in one pass over ``batches`` (see the module docstring).

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, T, vocab).
        param_names: weight paths, e.g. ["model.layers.14.mlp.down_proj.weight"] (Linear or Conv1D weights).
        batches: dicts with ``input_ids`` (batch, T) and optionally ``attention_mask`` (batch, T) and
            ``loss_mask`` (batch, T) bool restricting the counted positions further.
        fisher_type: "mc" (sampled labels; the GNH, default) or "empirical" (true next tokens).
        mc_samples: backward passes with fresh sampled labels per batch ("mc" only).
        dtype: accumulation dtype, torch.float32 or torch.float64, whatever the model dtype.
        seed: seed of the label sampler ("mc").
        exclude_first_tokens: leave the first k real tokens of every sequence out (attention sinks).
        progress: show a tqdm bar with tokens/s.
        metadata: extra metadata to store with the factors.

    Returns:
        A FactorSet with A and S normalised by the number of counted tokens (S also by ``mc_samples``).

    Under ``torch.distributed`` (an initialised default process group) each rank passes its own shard of the
    batches (:func:`shard_batches`); the factor sums and the token and sequence counts are all-reduced, so every rank
    returns the factors of all shards together (equal to one process over every batch, up to float summation order;
    with ``"mc"`` the sampled labels differ, so only in expectation). The label sampler of rank r is seeded with
    ``seed + r``. Every rank must call this function, also one with no batches.

    The model's requires_grad flags, training mode and weights are as before afterwards, also when this raises.

    Raises:
        ValueError: no token positions were counted (on any rank).
        CurvatureError: a factor is not finite or not symmetric (e.g. the model holds NaN weights).
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if dtype not in FACTOR_DTYPES.values():
        raise ValueError(f"factor dtype must be one of {list(FACTOR_DTYPES)}, got {dtype}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    passes = mc_samples if fisher_type == "mc" else 1
    modules = {name: resolve_module(model, name) for name in param_names}
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    accumulators = {}
    num_tokens = 0
    num_sequences = 0
    device, out_device = input_device(model), output_device(model)  # differ under device_map="auto"
    rank, _ = distributed_world()
    generator = torch.Generator(device=out_device).manual_seed(seed + rank) if fisher_type == "mc" else None
    started = time.perf_counter()
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        accumulators = {name: _FactorAccumulator(module, dtype) for name, module in modules.items()}
        bar = tqdm(batches, desc="K-FAC statistics", unit="batch", disable=not progress)
        for batch in bar:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            counted = loss_positions(attention_mask, exclude_first_tokens)
            if batch.get("loss_mask") is not None:
                counted &= batch["loss_mask"].to(device).bool()
            n = int(counted.sum())
            if n == 0:
                continue
            for acc in accumulators.values():  # each layer's mask on its own device, moved once per batch
                acc.positions = counted.to(acc.A.device)
            with torch.enable_grad():
                logits = model(**model_inputs(model, input_ids, attention_mask)).logits  # (batch, T, vocab)
                counted_out = counted.to(logits.device)
                probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
                if fisher_type == "empirical":
                    labels = torch.zeros_like(counted_out, dtype=torch.long)
                    labels[:, :-1] = input_ids[:, 1:].to(logits.device)
                for k in range(passes):
                    if fisher_type == "mc":
                        labels = sample_labels(probs, generator)
                    logits.backward(label_loss_grad(probs, labels, counted_out).to(logits.dtype),
                                    retain_graph=k < passes - 1)
                del logits, probs
            num_tokens += n
            num_sequences += int(input_ids.shape[0])
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tokens=num_tokens, tok_per_s=f"{num_tokens / elapsed:.0f}")
    finally:
        for acc in accumulators.values():
            acc.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    sums = [t for acc in accumulators.values() for t in (acc.A, acc.S)]
    num_tokens, num_sequences = _all_reduce_sums(sums, [num_tokens, num_sequences], device)
    if num_tokens == 0:
        raise ValueError("no token positions were counted: every batch was empty or fully masked")
    factors = {
        name: KFACFactors(A=acc.A / num_tokens, S=acc.S / (num_tokens * passes), num_tokens=num_tokens)
        for name, acc in accumulators.items()
    }
    for name, f in factors.items():
        check_factors(name, f.A, f.S, source="collected")
    meta = {"num_tokens": num_tokens, "num_sequences": num_sequences, "fisher_type": fisher_type,
            "mc_samples": passes, "dtype": str(dtype).replace("torch.", ""),
            "exclude_first_tokens": exclude_first_tokens, "seconds": round(time.perf_counter() - started, 3)}
    meta.update(metadata or {})
    logger.info("K-FAC statistics of %d layers over %d tokens (%s) in %.1fs", len(factors), num_tokens,
                fisher_type, meta["seconds"])
    return FactorSet(factors, meta)
