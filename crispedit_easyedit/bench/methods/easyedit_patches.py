"""Every change the ``easyedit-*`` baselines make to EasyEdit's GitHub main, or around its calls, in one place.

No EasyEdit file is edited and no EasyEdit code is copied. Each change is a named function below that logs at INFO
and returns a :class:`Patch` record; the adapters (``easyedit_main``) put every record of a call in the receipt's
``"patches"`` list, so a receipt says exactly what differed from running EasyEdit by hand. Context managers undo
their change when the call ends.

Checked against EasyEdit main commit 14cea82 (see the project's EasyEdit notes). The patches:

1. ``stub_multimodal_modules``: ``import easyeditor`` star-imports BLIP-2/LLaVA/Qwen2-VL modules that need timm,
   torchvision, OpenCV, av; without them (a CPU torch cannot load the registry's torchvision) those modules are
   replaced by stubs that raise when used. Only when the plain import failed inside one of them.
2. ``device_from_model``: ``hparams.device`` becomes the model's own device (e.g. ``"cpu"``); EasyEdit main turns an
   int into ``cuda:N`` and ``BaseEditor`` moves the model to ``hparams.device``.
3. ``name_for_sniffing``: the model is passed as ``ModelPair(model, tok, name)`` (``hparams.model_name``); EasyEdit
   picks behaviour by substrings of ``model_name.lower()`` (AlphaEdit's P/cache_c shapes need "llama" or "qwen",
   UltraEdit's label shift needs a known family), so the name starts with the family of ``config.model_type``
   (SmolLM2 is ``llama``).
4. ``padding_side_as_easyedit``: ``BaseEditor`` sets the tokenizer's padding side only for a *string* model name
   (right for ROME/MEMIT/AlphaEdit/... on llama/mistral/qwen names, left for the other methods on GPT-2/Llama/fast
   tokenizers); with a ModelPair it sets nothing, so this sets what it would have set, and restores it afterwards.
5. ``tied_lm_head``: MEMIT/AlphaEdit read ``{lm_head_module}.weight``; with tied embeddings (SmolLM2) ``lm_head.weight``
   is not a named parameter, so ``lm_head_module`` becomes the input-embedding module (``model.embed_tokens``).
6. ``one_call_per_chunk``: ``hparams.batch_size`` becomes the number of requests, so ``batch_edit`` makes one call of
   the method for the harness's chunk (for FT/LoRA it is also the optimiser minibatch).
7. ``keyed_stats_dir``: EasyEdit names statistics files by the last path part of ``model.config._name_or_path``
   only; ``hparams.stats_dir`` becomes a folder keyed by the model's weights, tokenizer, corpus and window sizes, so
   two models or corpora never share a file (``easyedit_stats``).
8. ``layer_stats_from_corpus``: while the statistics are computed, ``easyeditor.models.rome.layer_stats``'s
   ``load_dataset`` and ``TokenizedDataset`` are replaced so that the second moments are taken over exactly the token
   windows of CrispEdit's curvature corpus (``crispedit_easyedit.corpora.corpus_sequences``) instead of hub
   Wikipedia; restored afterwards.
9. ``fresh_cov_cache``: MEMIT's and AlphaEdit's in-process ``COV_CACHE`` is keyed by ``_name_or_path`` (two models
   with the same name would share it); it is cleared before each call and refilled from the keyed files.
10. ``fresh_context_templates``: MEMIT/AlphaEdit generate their context templates once per process with the first
    model they see; cleared at ``chunk_index == 0`` (a fresh run), kept across the chunks of one run.
11. ``alphaedit_projection``: AlphaEdit loads its null-space projection P once per process (module globals ``P``,
    ``P_loaded``) and otherwise writes ``./null_space_project.pt``; P is computed per model/layer set with
    AlphaEdit's own ``get_project``, stored as safetensors beside the statistics, and set as the module global
    (``P_loc`` points at that file).
12. ``alphaedit_cache_c``: AlphaEdit accumulates the keys of past edits in the module global ``cache_c``; it is
    reset (``cache_c_new = False``) at ``chunk_index == 0`` and kept across the chunks of one sequential run.
13. ``lora_type_lora``: EasyEdit's default ``lora_type: adalora`` fails under peft 0.18 (``total_step`` None); it
    becomes ``lora``.
14. ``lora_merge``: EasyEdit's LoRA returns a ``PeftModel``; the adapter is merged into the model's own weights
    (``merge_and_unload``) so the harness gets the same model object back, and ``peft_config`` is removed so the
    next chunk trains a fresh adapter on the merged weights.
15. ``restore_model_flags``: UltraEdit sets ``requires_grad`` False on every parameter and leaves ``.grad`` on its
    edit weights; LoRA turns on gradient checkpointing, input-grad hooks and ``use_cache=False``. All are put back.
16. ``ultraedit_full_precision``: UltraEdit's ``half: true`` would convert the shared model to float16 in place;
    it becomes ``false``.
17. ``ultraedit_batch_sizes``: UltraEdit asserts ``len(requests) >= batch_size`` and silently drops requests when
    ``batch_size_once`` does not divide ``batch_size``; ``batch_size`` becomes the number of requests and
    ``batch_size_once`` its largest divisor not above the configured value.
18. ``easyedit_log_handlers_once``: each ``BaseEditor`` adds a file and a stream handler to its logger (and writes
    ``./logs/run.log``); handlers added by a second editor are removed so messages are not repeated per chunk.
19. ``name_or_path_for_stats``: EasyEdit's statistics file is ``stats_dir / f"{last part of _name_or_path}/..."``;
    with an empty ``_name_or_path`` (a model built from a config) that string starts with "/" and the file lands at
    the filesystem root. During the call ``model.config._name_or_path`` is the sniffing name; restored after.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

PATCH_NAMES: tuple[str, ...] = (
    "stub_multimodal_modules", "device_from_model", "name_for_sniffing", "padding_side_as_easyedit",
    "tied_lm_head", "one_call_per_chunk", "keyed_stats_dir", "layer_stats_from_corpus", "fresh_cov_cache",
    "fresh_context_templates", "alphaedit_projection", "alphaedit_cache_c", "lora_type_lora", "lora_merge",
    "restore_model_flags", "ultraedit_full_precision", "ultraedit_batch_sizes", "easyedit_log_handlers_once",
    "name_or_path_for_stats",
)
"""The names of all patches, in the order of the module docstring."""

# BaseEditor's padding rule for string model names (EasyEdit main, editors/editor.py): methods that get RIGHT padding
# on llama/mistral/qwen names, and the families that trigger it.
RIGHT_PADDING_ALGS = ("ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE")
RIGHT_PADDING_FAMILIES = ("mistral", "llama", "qwen")

# config.model_type -> the substring EasyEdit sniffs in model_name.
SNIFF_FAMILIES: dict[str, str] = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
}


@dataclass(frozen=True)
class Patch:
    """One change made for a call: its name (one of :data:`PATCH_NAMES`) and what exactly it did."""

    name: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _record(name: str, detail: str) -> Patch:
    if name not in PATCH_NAMES:
        raise ValueError(f"unknown patch {name!r}; valid patches: {list(PATCH_NAMES)}")
    logger.info("EasyEdit patch %s: %s", name, detail)
    return Patch(name, detail)


def easyedit_module(name: str) -> Any:
    """An ``easyeditor`` submodule by its full dotted name (through ``sys.modules``: ``easyeditor/__init__``'s star
    imports shadow submodule attributes such as ``easyeditor.util``)."""
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------------------ import --
def stub_multimodal_modules(reason: str) -> list[str]:
    """Patch 1: import ``easyeditor`` with its multimodal modules stubbed (``compat.prepare_easyeditor``).

    Returns:
        The full names of the stubbed modules.
    """
    from ...easyedit import compat

    compat.prepare_easyeditor(neutralise_multimodal=True)
    stubbed = compat.stubbed_modules()
    _record("stub_multimodal_modules", f"plain import failed ({reason}); stubbed {stubbed}")
    return stubbed


def multimodal_stub_record(stubbed: list[str]) -> list[Patch]:
    """The receipt record of patch 1 for a call (empty when nothing was stubbed)."""
    if not stubbed:
        return []
    return [Patch("stub_multimodal_modules", f"easyeditor imported with multimodal modules stubbed: {stubbed}")]


# ---------------------------------------------------------------------------------------------------- hparams --
def model_device(model: torch.nn.Module) -> str:
    """The device of the model's first parameter, as a string (``"cpu"``, ``"cuda:0"``)."""
    return str(next(model.parameters()).device)


def device_from_model(hparams: Any, model: torch.nn.Module) -> Patch:
    """Patch 2: ``hparams.device`` = the model's device."""
    old, new = getattr(hparams, "device", None), model_device(model)
    hparams.device = new
    return _record("device_from_model", f"hparams.device {old!r} -> {new!r} (the model's device)")


def sniff_name(model: torch.nn.Module) -> str:
    """``"{family}-{name}"``: the family EasyEdit sniffs for ``config.model_type``, then the model's portable name.

    Raises:
        ValueError: a model type EasyEdit's baselines are not wired for here (names the valid types).
    """
    from ...curvature import portable_model_name

    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in SNIFF_FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported by the easyedit-* baselines; valid model "
                         f"types: {sorted(SNIFF_FAMILIES)}")
    family = SNIFF_FAMILIES[model_type]
    base = portable_model_name(str(getattr(config, "_name_or_path", "") or "")) or type(model).__name__
    base = base.replace("/", "_")
    return base if base.lower().startswith(family) else f"{family}-{base}"


def name_for_sniffing(model: torch.nn.Module, tok: Any) -> tuple[Any, Patch]:
    """Patch 3: the ``ModelPair`` to pass as ``hparams.model_name``, named for EasyEdit's family sniffing."""
    from ...easyedit.compat import ModelPair

    name = sniff_name(model)
    pair = ModelPair(model, tok, name=name)
    return pair, _record("name_for_sniffing", f"model_name = ModelPair(name={name!r}) (the model object itself)")


def easyedit_padding_side(alg_name: str, name: str) -> str:
    """The padding side ``BaseEditor`` would set for a string model name ``name`` and method ``alg_name``."""
    lowered = name.lower()
    if alg_name in RIGHT_PADDING_ALGS and any(f in lowered for f in RIGHT_PADDING_FAMILIES):
        return "right"
    if alg_name in RIGHT_PADDING_ALGS:
        return "unchanged"
    return "left"


@contextlib.contextmanager
def padding_side_as_easyedit(tok: Any, alg_name: str, name: str, out: list[Patch]) -> Iterator[None]:
    """Patch 4: set ``tok.padding_side`` as ``BaseEditor`` would for a string name, restore it on exit."""
    side = easyedit_padding_side(alg_name, name)
    old = getattr(tok, "padding_side", None)
    if side != "unchanged":
        tok.padding_side = side
    out.append(_record("padding_side_as_easyedit",
                       f"tokenizer padding_side {old!r} -> {tok.padding_side!r} for {alg_name} (restored after)"))
    try:
        yield
    finally:
        if old is not None:
            tok.padding_side = old


@contextlib.contextmanager
def name_or_path_for_stats(model: torch.nn.Module, name: str, out: list[Patch]) -> Iterator[None]:
    """Patch 19: an empty ``model.config._name_or_path`` becomes ``name`` inside the block (restored on exit)."""
    config = model.config
    old = getattr(config, "_name_or_path", "")
    if old:
        yield
        return
    config._name_or_path = name
    out.append(_record("name_or_path_for_stats", f"empty config._name_or_path -> {name!r} during the call "
                                                  "(EasyEdit would write statistics at the filesystem root)"))
    try:
        yield
    finally:
        config._name_or_path = old


def tied_lm_head(hparams: Any, model: torch.nn.Module) -> Patch | None:
    """Patch 5: ``lm_head_module`` -> the input-embedding module when the output head is tied and not a parameter.

    Returns:
        The record, or None when ``{lm_head_module}.weight`` is a named parameter already.

    Raises:
        ValueError: the head is neither a named parameter nor tied to the input embeddings.
    """
    current = getattr(hparams, "lm_head_module", None)
    params = dict(model.named_parameters())
    if current is None or f"{current}.weight" in params:
        return None
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        raise ValueError(f"lm_head_module {current!r}: {current}.weight is not a parameter of the model and the "
                         f"output head is not tied to the input embeddings; set lm_head_module to one of "
                         f"{sorted(n[: -len('.weight')] for n in params if n.endswith('embed_tokens.weight'))}")
    name = next(n for n, m in model.named_modules() if m is in_emb)
    hparams.lm_head_module = name
    return _record("tied_lm_head", f"lm_head_module {current!r} -> {name!r} (tied embeddings)")


def one_call_per_chunk(hparams: Any, n_requests: int) -> Patch:
    """Patch 6: ``hparams.batch_size`` = ``n_requests`` (one method call per harness chunk)."""
    old = getattr(hparams, "batch_size", None)
    hparams.batch_size = n_requests
    return _record("one_call_per_chunk", f"batch_size {old!r} -> {n_requests} (one EasyEdit call for the chunk)")


def lora_type_lora(hparams: Any) -> Patch | None:
    """Patch 13: ``lora_type: adalora`` -> ``lora`` (None when it is ``lora`` already)."""
    if getattr(hparams, "lora_type", "lora") == "lora":
        return None
    old = hparams.lora_type
    hparams.lora_type = "lora"
    return _record("lora_type_lora", f"lora_type {old!r} -> 'lora' (adalora fails under peft 0.18)")


def ultraedit_full_precision(hparams: Any) -> Patch | None:
    """Patch 16: ``half`` -> False (UltraEdit would call ``model.half()`` on the shared model)."""
    if not getattr(hparams, "half", False):
        return None
    hparams.half = False
    return _record("ultraedit_full_precision", "half True -> False (the model keeps its dtype)")


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def ultraedit_batch_sizes(hparams: Any, n_requests: int) -> Patch:
    """Patch 17: ``batch_size`` = ``n_requests``, ``batch_size_once`` = its largest divisor <= the configured one."""
    old = (hparams.batch_size, hparams.batch_size_once)
    hparams.batch_size = n_requests
    hparams.batch_size_once = largest_divisor_at_most(n_requests, int(hparams.batch_size_once))
    return _record("ultraedit_batch_sizes", f"(batch_size, batch_size_once) {old} -> "
                                            f"{(hparams.batch_size, hparams.batch_size_once)} (no request dropped)")


# ----------------------------------------------------------------------------------------------- statistics --
def keyed_stats_dir(hparams: Any, folder: str, key: str) -> Patch:
    """Patch 7: ``hparams.stats_dir`` = ``folder`` (keyed by ``key``)."""
    old = getattr(hparams, "stats_dir", None)
    hparams.stats_dir = folder
    return _record("keyed_stats_dir", f"stats_dir {old!r} -> keyed folder {key} (model weights, tokenizer, corpus, "
                                      "window sizes)")


LAYER_STATS_MODULE = "easyeditor.models.rome.layer_stats"


@contextlib.contextmanager
def layer_stats_from_corpus(windows: Callable[[], torch.utils.data.Dataset], description: str,
                            out: list[Patch]) -> Iterator[dict[str, int]]:
    """Patch 8: inside the block, ``layer_stats`` reads ``windows()`` instead of a hub dataset.

    ``load_dataset(name, config)`` returns ``{"train": <windows>}`` (``name``/``config`` are recorded) and
    ``TokenizedDataset(ds, tokenizer, maxlen)`` returns the windows themselves (each item ``input_ids``,
    ``position_ids``, ``attention_mask``: LongTensor (seq_len,)). ``windows`` is called at most once, when EasyEdit
    first needs data (a missing cache file).

    Yields:
        A counter ``{"datasets_built": n}`` of how often EasyEdit asked for the corpus.

    Raises:
        ValueError: (from the replaced ``TokenizedDataset``) windows longer than EasyEdit's ``maxlen``.
    """
    module = easyedit_module(LAYER_STATS_MODULE)
    originals = {"load_dataset": module.load_dataset, "TokenizedDataset": module.TokenizedDataset}
    counter = {"datasets_built": 0}
    cache: dict[str, Any] = {}

    def corpus() -> torch.utils.data.Dataset:
        if "ds" not in cache:
            cache["ds"] = windows()
        return cache["ds"]

    def load_dataset(name: str, config: str | None = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        counter["datasets_built"] += 1
        logger.info("EasyEdit layer_stats asked for %s/%s: serving %s", name, config, description)
        return {"train": corpus()}

    def tokenized_dataset(text_dataset: Any, tokenizer: Any = None, maxlen: int | None = None,
                          field: str = "text") -> torch.utils.data.Dataset:
        ds = corpus()
        seq_len = int(ds[0]["input_ids"].shape[0])
        if maxlen is not None and seq_len > maxlen:
            raise ValueError(f"corpus windows of {seq_len} tokens exceed EasyEdit's maxlen {maxlen}; "
                             f"use a corpus seq_len <= {maxlen}")
        return ds

    module.load_dataset = load_dataset
    module.TokenizedDataset = tokenized_dataset
    out.append(_record("layer_stats_from_corpus", f"layer_stats reads {description} (restored after)"))
    try:
        yield counter
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def fresh_cov_cache(module_name: str) -> Patch:
    """Patch 9: clear ``COV_CACHE`` of ``module_name`` (MEMIT's or AlphaEdit's main module)."""
    module = easyedit_module(module_name)
    n = len(module.COV_CACHE)
    module.COV_CACHE.clear()
    return _record("fresh_cov_cache", f"{module_name}.COV_CACHE cleared ({n} entries; refilled from keyed files)")


def fresh_context_templates(module_name: str) -> Patch:
    """Patch 10: ``CONTEXT_TEMPLATES_CACHE = None`` in ``module_name`` (regenerated with this model)."""
    module = easyedit_module(module_name)
    module.CONTEXT_TEMPLATES_CACHE = None
    return _record("fresh_context_templates", f"{module_name}.CONTEXT_TEMPLATES_CACHE reset (chunk_index 0)")


ALPHAEDIT_MODULE = "easyeditor.models.alphaedit.AlphaEdit_main"


def alphaedit_projection(hparams: Any, projection: torch.Tensor, path: str, kept: Mapping[int, int]) -> Patch:
    """Patch 11: AlphaEdit's globals ``P`` = ``projection`` (n_layers, d, d), ``P_loaded`` = True, ``P_loc`` = path."""
    module = easyedit_module(ALPHAEDIT_MODULE)
    module.P = projection
    module.P_loaded = True
    hparams.P_loc = path
    from ..job import portable_path  # the receipt goes into result files: no machine path

    return _record("alphaedit_projection", f"P set from {portable_path(path)} (computed with AlphaEdit's get_project; null-space "
                                           f"dims kept per layer {dict(kept)})")


def alphaedit_cache_c(reset: bool) -> Patch:
    """Patch 12: reset AlphaEdit's ``cache_c`` (``cache_c_new = False``) or keep it (a later chunk of one run)."""
    module = easyedit_module(ALPHAEDIT_MODULE)
    if reset:
        module.cache_c_new = False
        return _record("alphaedit_cache_c", "cache_c reset (chunk_index 0: a fresh run)")
    return _record("alphaedit_cache_c", "cache_c kept (a later chunk of the same sequential run)")


# --------------------------------------------------------------------------------------------------- the call --
def lora_merge(edited: Any, model: torch.nn.Module) -> tuple[torch.nn.Module, Patch | None]:
    """Patch 14: merge a ``PeftModel`` into ``model``'s weights; returns the plain model (the same object)."""
    if not hasattr(edited, "merge_and_unload"):
        return edited, None
    merged = edited.merge_and_unload()
    if merged is not model:
        raise RuntimeError("merging EasyEdit's LoRA adapter did not give back the harness's model object")
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model, _record("lora_merge", "PeftModel merged into the model's weights (merge_and_unload); "
                                        "peft_config removed")


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on (transformers renamed the property in 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


@contextlib.contextmanager
def restore_model_flags(model: torch.nn.Module, out: list[Patch]) -> Iterator[None]:
    """Patch 15: put back ``requires_grad``, ``.grad``, train/eval mode, ``use_cache``, gradient checkpointing and
    input-grad hooks as they were before the block; records what had changed."""
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    had_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    checkpointing = _checkpointing(model)
    had_hook = getattr(model, "_require_grads_hook", None) is not None
    try:
        yield
    finally:
        changed = []
        params = dict(model.named_parameters())
        flipped = [n for n, p in params.items() if n in requires and p.requires_grad != requires[n]]
        for name in flipped:
            params[name].requires_grad_(requires[name])
        if flipped:
            changed.append(f"requires_grad of {len(flipped)} parameters")
        grads = [n for n, p in params.items() if p.grad is not None and n not in had_grad]
        for name in grads:
            params[name].grad = None
        if grads:
            changed.append(f".grad of {len(grads)} parameters")
        if model.training != training:
            model.train(training)
            changed.append("train/eval mode")
        if config is not None and getattr(config, "use_cache", None) != use_cache:
            config.use_cache = use_cache
            changed.append("config.use_cache")
        if _checkpointing(model) and not checkpointing:
            model.gradient_checkpointing_disable()
            changed.append("gradient checkpointing")
        if (not had_hook and getattr(model, "_require_grads_hook", None) is not None
                and hasattr(model, "disable_input_require_grads")):
            model.disable_input_require_grads()
            changed.append("input-grad hook")
        if changed:
            out.append(_record("restore_model_flags", "restored " + ", ".join(changed)))


def easyedit_log_handlers_once(editor_logger: logging.Logger, before: list[logging.Handler]) -> Patch | None:
    """Patch 18: drop the handlers a second ``BaseEditor`` added to ``editor_logger`` (``before``: its handlers
    before the editor was built)."""
    if not before:
        return None
    added = [h for h in editor_logger.handlers if h not in before]
    for handler in added:
        editor_logger.removeHandler(handler)
        handler.close()
    if not added:
        return None
    return _record("easyedit_log_handlers_once", f"removed {len(added)} repeated handlers of {editor_logger.name}")


def editor_logger() -> logging.Logger:
    """The logger ``BaseEditor`` adds its handlers to (``easyeditor.editors.editor.LOG``)."""
    return easyedit_module("easyeditor.editors.editor").LOG


def loaded(name: str) -> bool:
    """Whether the module ``name`` is imported."""
    return name in sys.modules
