"""The per-model edit state: the capability curvature and its eigenbases, computed once at the base weights, and
the statistics of past edits that let CrispEdit-Seq (Algorithm 2) span calls.

EasyEdit calls the apply function once per chunk of ``batch_size`` edits and, between calls, either restores the
edit weights (GitHub main's default, PyPI with ``keep_original_weight=True``) or keeps them (main's
``sequential_edit=True``, PyPI's default). The state attached to a model (held weakly, so it dies with the model)
tells these apart by hashing the weights at the start of every call:

* **first call** on a model (or on other edit layers): the current weights are the base weights theta_0.
* ``"base"``: the weights equal theta_0 (EasyEdit restored them): a fresh Algorithm 1; past-edit statistics are
  dropped.
* ``"continue"``: the weights equal what the last call left: CrispEdit-Seq continues; the K-FAC statistics of all
  past edits are merged into the protected curvature. Each chunk's statistics are collected on its prompt+target
  sequences with the weights that chunk left: between the chunks of a call at once, and for a call's last chunk at
  the start of the next call that continues the sequence (so calls whose weights EasyEdit restores pay nothing).
* ``"foreign"``: anything else (someone else changed the weights): a WARNING, and the documented policy is to
  continue as in ``"continue"`` (the past edits' statistics are kept, the capability curvature stays theta_0's);
  :func:`reset_edit_state` forgets everything and makes the current weights the new theta_0.

The capability curvature is looked up, in this order, in the state (per curvature settings), in the on-disk cache
(``cache_dir``: K-FAC factors and, separately, their eigendecompositions as safetensors; the mask is derived per
gamma), and only then collected, which is allowed only while the weights are theta_0 (``curvature_at: base``, the
default) or at every call on the current weights (``curvature_at: current``).

Eigendecompositions of the protected curvature (capability merged with past edits) are refreshed once at least
``chunk_size`` edits (1 when ``chunk_size`` is None) have been added since the last refresh, so one chunk of a
sequence is edited with the statistics of every earlier chunk, as in Algorithm 2, however EasyEdit cuts the calls.
Memory stays O(d_in^2 + d_out^2) per layer however many edits accumulate: past edits are one running token-weighted
mean per layer.

The state can be saved and loaded (:func:`save_edit_state`, :func:`load_edit_state`: safetensors + JSON, no edit
text) so a sequence resumes in a new process.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import __version__
from .checks import CurvatureError, cache_lock, ensure_writable_dir
from .curvature import (
    FACTOR_DTYPES, CacheCorruptError, CacheMismatchError, FactorSet, KFACFactors, cache_path_for, check_factors,
    check_positions, collect_kfac_factors, curvature_identity, distributed_world, identity_key, is_main_process,
    model_fingerprint, read_safetensors, shard_batches, tokenizer_fingerprint, write_safetensors,
)
from .projector import Eigenbasis

logger = logging.getLogger(__name__)

STATE_FORMAT = "crispedit-edit-state"
STATE_FORMAT_VERSION = 1
EIGEN_FORMAT_VERSION = 1
WEIGHT_STATUSES = ("first", "base", "continue", "foreign")

_STATES: "weakref.WeakKeyDictionary[nn.Module, EditState]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------------------------
# Capability curvature: factors and eigenbases, once per model and settings


@dataclass
class CapabilityCurvature:
    """Capability K-FAC factors of the edit weights at theta_0, and their Kronecker eigenbases.

    Attributes:
        identity: everything that determines the factors (the cache key is its hash; no machine path in it).
        factors: the FactorSet (each layer on its edit weight's device).
        eigenbases: {parameter path: Eigenbasis} (on each edit weight's device, in ``mom2_dtype``).
        source: where the factors came from in *this* call: "collected", "disk cache" or "in process".
        eigen_source: likewise for the eigenbases: "computed", "disk cache" or "in process".
        on_disk: whether the factors are in the disk cache (so a saved edit state need not hold them).
    """

    identity: dict[str, Any]
    factors: FactorSet
    eigenbases: dict[str, Eigenbasis]
    source: str
    eigen_source: str
    on_disk: bool = False

    @property
    def key(self) -> str:
        return identity_key(self.identity)


def capability_identity(model_fp: Mapping[str, Any], tok, hparams, targets) -> dict[str, Any]:
    """The curvature identity for ``hparams`` on a model with fingerprint ``model_fp`` (portable: weights hash,
    corpus key and tokenizer *content* hash; no model name or path)."""
    from .corpora import corpus_key

    names = [t.name for t in targets]
    corpus = (f"{corpus_key(hparams.mom2_dataset, 'stats')}|tokenizer={tokenizer_fingerprint(tok)}"
              f"|vocab={len(tok)}")
    chat_fraction = getattr(hparams, "mom2_chat_fraction", 0.0)
    if chat_fraction > 0:  # only then: the keys of Wikipedia-only caches stay as they were
        from .chat_corpus import chat_corpus_key

        corpus += (f"|chat={chat_corpus_key(hparams.mom2_chat_source)}|chat_fraction={chat_fraction!r}"
                   f"|chat_template={hashlib.sha256(str(tok.chat_template).encode()).hexdigest()[:16]}")
        answer_tokens = getattr(hparams, "mom2_chat_answer_tokens", 0)
        if answer_tokens:  # only then: earlier chat caches keep their keys
            corpus += f"|chat_answer_tokens={answer_tokens}"
        chat_format = getattr(hparams, "mom2_chat_format", "chat")
        if chat_format != "chat":  # only then: earlier chat caches keep their keys
            corpus += f"|chat_format={chat_format}"
    weights = {"weights_sha256": model_fp["weights_sha256"], "revision": model_fp.get("revision")}
    return curvature_identity(weights, names, {t.name: t.shape for t in targets}, corpus, hparams.mom2_n_samples,
                              hparams.curvature_seq_len, hparams.fisher_type, hparams.mc_samples, hparams.mom2_dtype,
                              hparams.exclude_first_tokens, hparams.seed)


def _collect_capability(model, tok, hparams, targets, progress: bool) -> FactorSet:
    from .corpora import corpus_sequences

    logger.info("collecting capability curvature (%s, %d sequences x %d tokens, fisher %s)", hparams.mom2_dataset,
                hparams.mom2_n_samples, hparams.curvature_seq_len, hparams.fisher_type)
    packed = corpus_sequences(hparams.mom2_dataset, tok, hparams.curvature_seq_len, hparams.mom2_n_samples)
    size = hparams.curvature_batch_size
    batches = [{key: value[i : i + size] for key, value in packed.items()}
               for i in range(0, packed["input_ids"].shape[0], size)]
    batches += _chat_batches(model, tok, hparams, int(packed["attention_mask"].sum()))
    return collect_kfac_factors(  # under torch.distributed each rank collects its shard; the sums are all-reduced
        model, [t.name for t in targets], shard_batches(batches), fisher_type=hparams.fisher_type,
        mc_samples=hparams.mc_samples, dtype=FACTOR_DTYPES[hparams.mom2_dtype], seed=hparams.seed,
        exclude_first_tokens=hparams.exclude_first_tokens, progress=progress)


def _chat_batches(model, tok, hparams, wiki_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Batches of chat-formatted questions holding ``mom2_chat_fraction`` of all statistics tokens (none at 0);
    with ``mom2_chat_answer_tokens`` > 0, the questions with the model's greedy answers, counted on the answers."""
    fraction = getattr(hparams, "mom2_chat_fraction", 0.0)
    if fraction <= 0:
        return []
    from .chat_corpus import chat_answer_sequences, chat_sequences

    n_tokens = max(1, round(wiki_tokens * fraction / (1.0 - fraction)))
    answer_tokens = getattr(hparams, "mom2_chat_answer_tokens", 0)
    chat_format = getattr(hparams, "mom2_chat_format", "chat")
    if answer_tokens:
        packed = chat_answer_sequences(model, tok, hparams.mom2_chat_source, n_tokens, answer_tokens,
                                       seed=hparams.seed, max_length=hparams.curvature_seq_len)
        counted = int(packed["loss_mask"].sum())
    else:
        packed = chat_sequences(hparams.mom2_chat_source, tok, n_tokens, seed=hparams.seed,
                                max_length=hparams.curvature_seq_len, render=chat_format)
        counted = int(packed["attention_mask"].sum())
    logger.info("%s capability prompts: %d (%d counted tokens, %.0f%% of the statistics' tokens; %s%s)",
                chat_format, packed["input_ids"].shape[0], counted, 100 * fraction,
                hparams.mom2_chat_source,
                f", the model's answers of at most {answer_tokens} tokens" if answer_tokens else "")
    size = max(hparams.curvature_batch_size, 16)
    return [{key: value[i : i + size] for key, value in packed.items()}
            for i in range(0, packed["input_ids"].shape[0], size)]


def eigen_cache_path(cache_dir: str | os.PathLike, identity: Mapping[str, Any], dtype: str) -> Path:
    """``{cache_dir}/eig-<key>.safetensors``: the eigendecompositions of the factors with this identity."""
    key = hashlib.sha256(f"{identity_key(identity)}|{dtype}|{EIGEN_FORMAT_VERSION}".encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / f"eig-{key}.safetensors"


def save_eigenbases(path: str | os.PathLike, eigenbases: Mapping[str, Eigenbasis], metadata: Mapping[str, Any]) -> Path:
    """Write eigenvalues and eigenvectors of every layer to a safetensors file, atomically."""
    tensors = {}
    for name, basis in eigenbases.items():
        tensors[f"{name}::eig_in"], tensors[f"{name}::basis_in"] = basis.eig_in, basis.basis_in
        if basis.eig_out is not None:
            tensors[f"{name}::eig_out"], tensors[f"{name}::basis_out"] = basis.eig_out, basis.basis_out
    meta = dict(metadata, layers={n: b.out_features for n, b in eigenbases.items()}, package_version=__version__)
    return write_safetensors(path, tensors, meta)


def load_eigenbases(path: str | os.PathLike, expected: Mapping[str, Any],
                    devices: Mapping[str, torch.device]) -> dict[str, Eigenbasis]:
    """Read :func:`save_eigenbases` output, checking ``expected`` metadata; raises CacheMismatchError/CorruptError."""
    tensors, meta = read_safetensors(path, "eigenbasis cache")
    for key, value in expected.items():
        if meta.get(key, "<missing>") != value:
            raise CacheMismatchError(path, key, value, meta.get(key, "<missing>"))
    out = {}
    for name, device in devices.items():
        try:
            eig_out = tensors.get(f"{name}::eig_out")
            out[name] = Eigenbasis(tensors[f"{name}::eig_in"].to(device), tensors[f"{name}::basis_in"].to(device),
                                   None if eig_out is None else eig_out.to(device),
                                   None if eig_out is None else tensors[f"{name}::basis_out"].to(device),
                                   int(meta["layers"][name]))
        except KeyError as exc:
            raise CacheCorruptError(f"eigenbasis cache {path} lacks {exc.args[0]!r}") from exc
        for part in ("eig_in", "basis_in", "eig_out", "basis_out"):
            value = getattr(out[name], part)
            if value is not None and not (bool(torch.isfinite(value).all()) and
                                          (not part.startswith("eig") or bool((value >= 0).all()))):
                raise CurvatureError(f"eigenbasis cache {path}: {part} of {name} is not finite"
                                     + (" and non-negative" if part.startswith("eig") else "")
                                     + "; delete the file to recompute it")
    return out


def layer_devices(targets) -> dict[str, torch.device]:
    """{parameter path: device} of the edit weights (every per-layer tensor lives on its weight's device)."""
    return {t.name: t.param.device for t in targets}


def _eigenbases_for(factors: FactorSet, devices: Mapping[str, torch.device],
                    dtype: torch.dtype) -> dict[str, Eigenbasis]:
    """Eigendecompose every layer's factors on that layer's device (``devices``: {parameter path: device})."""
    return {name: Eigenbasis.from_factors(factors[name].A.to(device), factors[name].S.to(device), dtype, layer=name)
            for name, device in devices.items()}


# ----------------------------------------------------------------------------------------------------------------
# The per-model state


@dataclass
class UnrecordedChunk:
    """The last edited chunk of a call, whose K-FAC statistics are collected when the next call continues the
    sequence (in memory only; never saved)."""

    requests: list[dict[str, Any]]
    hparams: Any
    seed: int


@dataclass
class ProtectedBasis:
    """Eigenbases of the capability factors merged with the past edits' statistics, as of the last refresh."""

    capability_key: str
    weight: float
    edits: FactorSet
    eigenbases: dict[str, Eigenbasis] | None = None  # built lazily (after a load)


class EditState:
    """What CrispEdit keeps about one model between calls (see the module docstring).

    Attributes:
        param_names: the edit weights this state is about.
        base_fingerprint: the model fingerprint at theta_0 (``weights_sha256`` hashes the edit weights completely).
        last_digest: the weights hash the last successful call left behind (None before the first call).
        curvatures: {identity key: CapabilityCurvature} computed or loaded in this process.
        past_edits: token-weighted mean K-FAC statistics of every past edit chunk of the current sequence, or None.
        protected: the protected eigenbases as of the last refresh, or None.
        num_edits, num_chunks: edits and chunks in the current sequence; pending_edits: edits since the refresh.
        last_capability: the identity of the capability curvature the last call used.
        unrecorded: the last call's last chunk, whose statistics the next continuing call collects (or None).
    """

    def __init__(self, param_names: Sequence[str], base_fingerprint: Mapping[str, Any]):
        self.param_names = list(param_names)
        self.base_fingerprint = dict(base_fingerprint)
        self.last_digest: str | None = None
        self.curvatures: dict[str, CapabilityCurvature] = {}
        self._identities: dict[tuple, dict[str, Any]] = {}
        self.past_edits: FactorSet | None = None
        self.protected: ProtectedBasis | None = None
        self.num_edits = 0
        self.num_chunks = 0
        self.pending_edits = 0
        self.last_capability: dict[str, Any] | None = None
        self.unrecorded: UnrecordedChunk | None = None

    @property
    def base_digest(self) -> str:
        return self.base_fingerprint["weights_sha256"]

    # ---- transactions: a failed call leaves the state as it was -------------------------------------------------
    _SEQUENCE_FIELDS = ("last_digest", "past_edits", "protected", "num_edits", "num_chunks", "pending_edits",
                        "last_capability", "unrecorded")

    def checkpoint(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SEQUENCE_FIELDS}

    def rollback(self, checkpoint: Mapping[str, Any]) -> None:
        for name, value in checkpoint.items():
            setattr(self, name, value)

    def start_sequence(self) -> None:
        """Forget the past edits (a fresh Algorithm 1 from theta_0)."""
        self.past_edits, self.protected, self.unrecorded = None, None, None
        self.num_edits = self.num_chunks = self.pending_edits = 0

    def classify(self, digest: str) -> str:
        """``"base"``, ``"continue"`` or ``"foreign"`` for weights with hash ``digest`` (see the module docstring)."""
        if digest == self.base_digest:
            return "base"
        if digest == self.last_digest:
            return "continue"
        return "foreign"

    # ---- capability curvature -----------------------------------------------------------------------------------
    def capability(self, model: nn.Module, tok, hparams, targets, current_fp: Mapping[str, Any],
                   progress: bool = True) -> CapabilityCurvature:
        """The capability curvature for ``hparams``: from this state, the disk cache, or collected (see module doc).

        Raises:
            ValueError: the curvature must be collected at theta_0 but the edit weights no longer hold theta_0.
        """
        at_base = hparams.curvature_at == "base"
        model_fp = self.base_fingerprint if at_base else current_fp
        settings = (model_fp["weights_sha256"], id(tok), len(tok), tuple(t.name for t in targets),
                    hparams.mom2_dataset, hparams.mom2_n_samples, hparams.curvature_seq_len, hparams.fisher_type,
                    hparams.mc_samples, hparams.mom2_dtype, hparams.exclude_first_tokens, hparams.seed)
        if settings not in self._identities:  # hashing a local corpus and the tokenizer once per process
            self._identities[settings] = capability_identity(model_fp, tok, hparams, targets)
        identity = self._identities[settings]
        key = identity_key(identity)
        if key in self.curvatures:
            found = self.curvatures[key]
            return CapabilityCurvature(found.identity, found.factors, found.eigenbases, "in process", "in process",
                                       found.on_disk)
        path = cache_path_for(hparams.cache_dir, identity) if hparams.cache_dir else None
        lock = contextlib.nullcontext()
        if path is not None and not path.exists():
            if is_main_process():  # fail before the collection, not after it
                ensure_writable_dir(path.parent, "cache_dir")
            if distributed_world()[1] == 1:
                # another process making the same cache: wait for it and read its file instead of collecting again
                # (not under torch.distributed, where every rank must join the collection)
                lock = cache_lock(path, what=f"the capability curvature cache {path.name}")
        with lock:
            if path is not None and path.exists():
                logger.info("loading capability curvature from %s", path)
                factors, source = FactorSet.load(path, expected=identity,  # each layer on its device
                                                 devices=layer_devices(targets)), "disk cache"
            else:
                if current_fp["weights_sha256"] != model_fp["weights_sha256"]:
                    raise ValueError(
                        "the capability curvature for these settings is neither in this process nor in the disk "
                        "cache, and the edit weights no longer hold the base weights it must be collected at "
                        "(curvature_at: base). Use the curvature settings of the earlier calls, restore the base "
                        "weights, set curvature_at: current, or call reset_edit_state(model) to make the current "
                        "weights the base.")
                check_positions(model, hparams.curvature_seq_len, "curvature_seq_len")
                factors, source = _collect_capability(model, tok, hparams, targets, progress), "collected"
                factors.metadata.update(identity)
            # the eigendecomposition checks the factors are PSD: only factors that pass are cached
            eigenbases, eigen_source = self._capability_eigenbases(factors, identity, hparams, targets)
            if source == "collected" and path is not None and is_main_process():
                factors.save(path)
                logger.info("cached capability curvature at %s", path)
        curvature = CapabilityCurvature(identity, factors, eigenbases, source, eigen_source, path is not None)
        if not at_base:  # keep one curvature of edited weights, not one per call (memory stays bounded)
            self.curvatures = {k: c for k, c in self.curvatures.items()
                               if c.identity["model"]["weights_sha256"] == self.base_digest}
        self.curvatures[key] = curvature
        return curvature

    @staticmethod
    def _capability_eigenbases(factors: FactorSet, identity, hparams, targets) -> tuple[dict[str, Eigenbasis], str]:
        dtype = FACTOR_DTYPES[hparams.mom2_dtype]
        path = eigen_cache_path(hparams.cache_dir, identity, hparams.mom2_dtype) if hparams.cache_dir else None
        expected = {"factors_key": identity_key(identity), "dtype": hparams.mom2_dtype}
        if path is not None and path.exists():
            logger.info("loading capability eigenbases from %s", path)
            return load_eigenbases(path, expected, layer_devices(targets)), "disk cache"
        if path is not None and is_main_process():  # fail before the eigendecomposition, not after it
            ensure_writable_dir(path.parent, "cache_dir")
        eigenbases = _eigenbases_for(factors, layer_devices(targets), dtype)
        if path is not None and is_main_process():
            save_eigenbases(path, eigenbases, expected)
            logger.info("cached capability eigenbases at %s", path)
        return eigenbases, "computed"

    # ---- past edits (CrispEdit-Seq) -----------------------------------------------------------------------------
    def add_statistics(self, statistics: FactorSet, num_edits: int) -> None:
        """Merge the K-FAC statistics of ``num_edits`` past edits into the running token-weighted mean."""
        self.past_edits = statistics if self.past_edits is None else self.past_edits.merge(statistics)
        self.pending_edits += num_edits

    def record_unrecorded(self, model: nn.Module, tok, targets) -> bool:
        """Collect the statistics of the previous call's last chunk on the current weights (see ``unrecorded``).

        They are collected lazily, at the start of the next call that continues the sequence (the weights are then
        those the chunk left), so that calls whose weights EasyEdit restores pay nothing for them.

        Returns:
            whether statistics were collected.
        """
        from .editing import edit_statistics

        pending, self.unrecorded = self.unrecorded, None
        if pending is None:
            return False
        statistics = edit_statistics(model, tok, pending.requests, pending.hparams, targets, seed=pending.seed)
        self.add_statistics(statistics, len(pending.requests))
        return True

    def protected_eigenbases(self, curvature: CapabilityCurvature, hparams, targets) -> tuple[dict[str, Eigenbasis],
                                                                                            bool]:
        """Eigenbases to project with: the capability's alone, or of the capability merged with past edits.

        The merged eigenbases are recomputed when ``chunk_size`` (or, without it, 1) edits were added since the last
        refresh (the start of the sequence counts as one), or when the capability curvature or
        ``edit_stats_weight`` changed.

        Returns:
            ({parameter path: Eigenbasis}, whether an eigendecomposition was done now).
        """
        if self.past_edits is None:
            return curvature.eigenbases, False
        weight = float(hparams.edit_stats_weight)
        protected = self.protected
        due = self.pending_edits >= (hparams.chunk_size or 1) or (
            protected is not None and (protected.capability_key != curvature.key or protected.weight != weight))
        if not due and protected is None:  # fewer than chunk_size edits since the start of the sequence
            return curvature.eigenbases, False
        if due:
            protected = ProtectedBasis(curvature.key, weight, self.past_edits)
            self.pending_edits = 0
        fresh = protected.eigenbases is None
        if fresh:
            merged = curvature.factors.merge(protected.edits, weight=weight)
            protected.eigenbases = _eigenbases_for(merged, layer_devices(targets), FACTOR_DTYPES[hparams.mom2_dtype])
        self.protected = protected
        return protected.eigenbases, fresh


def edit_state(model: nn.Module) -> EditState | None:
    """The state CrispEdit keeps for ``model``, or None before its first edit."""
    return _STATES.get(model)


def reset_edit_state(model: nn.Module) -> None:
    """Forget everything about ``model``: its next edit takes the current weights as theta_0."""
    _STATES.pop(model, None)


def attach_state(model: nn.Module, param_names: Sequence[str]) -> tuple[EditState, str, dict[str, Any]]:
    """The model's state for these edit weights and how its current weights relate to it.

    Returns:
        (state, status in WEIGHT_STATUSES, the current model fingerprint).
    """
    fingerprint = model_fingerprint(model, param_names)
    state = _STATES.get(model)
    if state is not None and state.param_names != list(param_names):
        logger.info("edit weights changed from %s to %s: a new edit state with the current weights as theta_0",
                    state.param_names, list(param_names))
        state = None
    if state is None:
        state = EditState(param_names, fingerprint)
        _STATES[model] = state
        return state, "first", fingerprint
    status = state.classify(fingerprint["weights_sha256"])
    if status == "foreign":
        logger.warning(
            "the edit weights are neither the base weights nor what the last CrispEdit call left (someone else "
            "changed them). Continuing the sequence: the statistics of the %d past edits stay protected and the "
            "capability curvature stays that of the base weights. Call crispedit_easyedit.reset_edit_state(model) "
            "to take the current weights as the new base instead.", state.num_edits)
    return state, status, fingerprint


def capability_curvature(model: nn.Module, tok, hparams, progress: bool = True) -> CapabilityCurvature:
    """The capability curvature CrispEdit uses for ``model`` and ``hparams`` (attaching the state if needed)."""
    from .editing import edit_targets

    targets = edit_targets(model, hparams)
    state, _, fingerprint = attach_state(model, [t.name for t in targets])
    return state.capability(model, tok, hparams, targets, fingerprint, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_edit_state(model: nn.Module, tok, path: str | os.PathLike, include_capability: bool | None = None) -> Path:
    """Save ``model``'s edit state (safetensors + JSON metadata; no edit text) so a sequence can resume elsewhere.

    The statistics of the last edited chunk are collected first if they are still pending (this needs the weights
    that chunk left and the tokenizer).

    Args:
        tok: the model's tokenizer.
        include_capability: also store the capability factors; None (default) stores them only when they were not
            read from or written to a disk cache (``cache_dir`` None), because the loader finds them there by key.

    Raises:
        ValueError: the model has no edit state yet.
    """
    state = _STATES.get(model)
    if state is None or state.last_capability is None:
        raise ValueError("this model has no CrispEdit edit state to save: edit it first")
    if state.unrecorded is not None:
        if model_fingerprint(model, state.param_names)["weights_sha256"] != state.last_digest:
            raise ValueError("the statistics of the last edited chunk are still to be collected, and that needs the "
                             "weights the last call left; save the state before changing or restoring the weights")
        from .editing import edit_targets

        state.record_unrecorded(model, tok, edit_targets(model, state.unrecorded.hparams))
    curvature = state.curvatures.get(identity_key(state.last_capability))
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, factors: FactorSet | None) -> dict[str, int] | None:
        if factors is None:
            return None
        for name, f in factors.factors.items():
            tensors[f"{prefix}::{name}::A"], tensors[f"{prefix}::{name}::S"] = f.A, f.S
        return {name: f.num_tokens for name, f in factors.factors.items()}

    if include_capability is None:
        include_capability = curvature is not None and not curvature.on_disk
    meta = {
        "format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "package_version": __version__,
        "param_names": state.param_names, "base_fingerprint": state.base_fingerprint,
        "last_digest": state.last_digest, "num_edits": state.num_edits, "num_chunks": state.num_chunks,
        "pending_edits": state.pending_edits, "capability_identity": state.last_capability,
        "past_edits_tokens": put("past", state.past_edits),
        "protected": None if state.protected is None else {
            "capability_key": state.protected.capability_key, "weight": state.protected.weight,
            "tokens": put("protected", state.protected.edits)},
        "capability_tokens": put("capability", curvature.factors) if include_capability and curvature else None,
    }
    saved = write_safetensors(path, tensors, meta)
    logger.info("saved the edit state (%d edits in %d chunks) to %s", state.num_edits, state.num_chunks, saved)
    return saved


def load_edit_state(model: nn.Module, path: str | os.PathLike) -> EditState:
    """Attach a state written by :func:`save_edit_state` to ``model``, whose weights must be the ones it left.

    Raises:
        ValueError: the file is not an edit state, names weights the model lacks, or the model's weights are not
            the weights the saved sequence left behind (nor its base weights).
    """
    tensors, meta = read_safetensors(path, "edit state")
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a CrispEdit edit state (format {meta.get('format')!r})")
    if meta.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{path} has edit-state format {meta.get('format_version')!r}; this version reads "
                         f"{STATE_FORMAT_VERSION}")
    names = list(meta["param_names"])
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the edit state {path} is about weights this model lacks: {missing}")
    digest = model_fingerprint(model, names)["weights_sha256"]
    if digest not in (meta["last_digest"], meta["base_fingerprint"]["weights_sha256"]):
        raise ValueError(f"the model's weights are neither those the saved sequence left behind "
                         f"({meta['last_digest'][:12]}...) nor its base weights "
                         f"({meta['base_fingerprint']['weights_sha256'][:12]}...), but {digest[:12]}...: apply the "
                         "saved edits first (or load the state into the model it was saved from)")

    def get(prefix: str, tokens: Mapping[str, int] | None) -> FactorSet | None:
        if tokens is None:
            return None
        try:
            factors = FactorSet({n: KFACFactors(tensors[f"{prefix}::{n}::A"].to(params[n].device),  # layer's device
                                                tensors[f"{prefix}::{n}::S"].to(params[n].device), int(tokens[n]))
                                 for n in names}, {})
        except KeyError as exc:
            raise CacheCorruptError(f"edit state {path} lacks {exc.args[0]!r}") from exc
        for n, f in factors.factors.items():
            check_factors(n, f.A, f.S, source=f"edit state {path}, {prefix}")
        return factors

    state = EditState(names, meta["base_fingerprint"])
    state.last_digest = meta["last_digest"]
    state.num_edits, state.num_chunks = int(meta["num_edits"]), int(meta["num_chunks"])
    state.pending_edits = int(meta["pending_edits"])
    state.last_capability = meta["capability_identity"]
    state.past_edits = get("past", meta["past_edits_tokens"])
    if meta["protected"] is not None:
        state.protected = ProtectedBasis(meta["protected"]["capability_key"], float(meta["protected"]["weight"]),
                                         get("protected", meta["protected"]["tokens"]))
    capability = get("capability", meta["capability_tokens"])
    if capability is not None:
        capability.metadata.update(meta["capability_identity"])
        state.curvatures[identity_key(meta["capability_identity"])] = _loaded_curvature(meta, capability, model)
    _STATES[model] = state
    logger.info("loaded an edit state (%d edits in %d chunks) from %s", state.num_edits, state.num_chunks, path)
    return state


def _loaded_curvature(meta: Mapping[str, Any], factors: FactorSet, model: nn.Module) -> CapabilityCurvature:
    identity = copy.deepcopy(dict(meta["capability_identity"]))
    params = dict(model.named_parameters())
    devices = {name: params[name].device for name in factors.factors}
    eigenbases = _eigenbases_for(factors, devices, FACTOR_DTYPES[identity["dtype"]])
    return CapabilityCurvature(identity, factors, eigenbases, "edit state file", "computed")
