"""CrispEdit hyperparameters: a validated dataclass in EasyEdit's hparams layout.

EasyEdit's ``BaseEditor`` and evaluators only *read attributes* of the hyperparameter object (``alg_name``,
``model_name``, ``device``, ``model_parallel``, ``batch_size``, ``max_length``, ``fp16``, ``use_chat_template``,
``evaluation_type``, ``api_key``), so this class does not subclass or import ``easyeditor``: it mimics EasyEdit's
``HyperParams`` API (``from_hparams``, ``from_json``, ``construct_float_from_scientific_notation``, ``to_dict``) and
adds what EasyEdit lacks: every field is typed, documented (``dataclasses.field(metadata={"help": ...})``) and
validated when the object is built, with errors that name the field, the bad value and what is allowed.

Loading rules:
    * ``from_hparams(path)`` appends ``.yaml`` when the path has no ``.yaml``/``.yml``/``.json`` suffix (as EasyEdit
      does), reads YAML with ``yaml.safe_load`` and turns scientific-notation strings such as ``"5e-4"`` (YAML 1.1
      reads those as strings) into numbers, for numeric fields only (a ``model_name`` of ``"1234"`` stays a string).
    * Unknown keys are rejected with a ``ValueError`` naming the key and the closest valid key.
    * The keys of the CrispEdit authors' published YAML files (zarifikram/CrispEdit, ``hparams/CrispEdit/*.yaml``)
      that this implementation does not use are accepted and ignored (``LEGACY_KEYS``); the authors' alg_name
      spelling ``"CRISPEDIT"`` is normalised to ``"CrispEdit"``.

Example:
    >>> hp = CrispEditHyperParams.from_hparams("hparams/CrispEdit/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> hp.torch_device(), hp.factor_dtype  # doctest: +SKIP
    (device(type='cpu'), torch.float32)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
import yaml

from .choices import (  # noqa: F401 - re-exported
    ADAM_SCALINGS, CONTEXT_NULL_SPACE_COMPOSITIONS, CURVATURE_AT, CURVATURE_FACTORS, EDIT_POSITIONS, FISHER_TYPES,
    GRADIENT_PROJECTION_DTYPES, MOM2_CHAT_FORMATS, PROJECTION_MODES,
)
from .templates import NAMED_FORMATS, check_format

logger = logging.getLogger(__name__)

ALG_NAME = "CrispEdit"
"""The only ``alg_name`` this class accepts (the key under which the method is registered in EasyEdit)."""

LEGACY_ALG_NAMES: tuple[str, ...] = ("CRISPEDIT",)
"""Spellings of ``alg_name`` used by the authors' loader, normalised to ``ALG_NAME``."""

LEGACY_KEYS: dict[str, str] = {
    "kl_factor": "FT-style KL regulariser of the authors' fork; CrispEdit protects capabilities by projection",
    "norm_constraint": "FT-style weight clamp of the authors' fork; CrispEdit protects capabilities by projection",
    "objective_optimization": "the edit loss is always the teacher-forced cross-entropy of the target tokens "
    "('target_new')",
    "layer_module_tmp": "module templates are not needed: statistics are hooked on rewrite_module_tmp's module",
    "mlp_module_tmp": "module templates are not needed: statistics are hooked on rewrite_module_tmp's module",
    "attn_module_tmp": "module templates are not needed: statistics are hooked on rewrite_module_tmp's module",
    "ln_f_module": "module templates are not needed: statistics are hooked on rewrite_module_tmp's module",
    "lm_head_module": "module templates are not needed: statistics are hooked on rewrite_module_tmp's module",
}
"""Keys of the authors' published YAML files (zarifikram/CrispEdit hparams/CrispEdit/{llama3-8b,mistral-7b,
qwen2.5-7b}.yaml) that this implementation accepts and ignores, with the reason."""

# Values of legacy keys that mean "off" / the behaviour we implement anyway; anything else is logged as a warning
# because the user asked for something that is ignored.
_LEGACY_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "kl_factor": (0, 0.0, None, False),
    "norm_constraint": (False, None, 0, 0.0),
    "objective_optimization": ("target_new", None),
}

DEVICE_CHOICES = "a non-negative CUDA index (int), 'cpu', 'cuda', 'cuda:N' or 'mps'"
MOM2_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
EVALUATION_TYPES: tuple[str | None, ...] = (None, "LLM-judge", "generate-text")
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _f(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002 - dataclass idiom
    """A dataclass field with a help text in its metadata."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(kw_only=True)
class CrispEditHyperParams:
    """Hyperparameters of CrispEdit (paper Algorithms 1 and 2) in EasyEdit's layout.

    Build it with ``from_hparams`` (YAML), ``from_json`` or ``from_dict``; direct keyword construction works too and is
    validated the same way. Assigning attributes afterwards (EasyEdit does ``hparams.batch_size = 1``) is allowed; call
    ``validate()`` to check the object again.
    """

    # --- EasyEdit's required keys -------------------------------------------------------------------------------
    alg_name: str = _f(ALG_NAME, "Method name EasyEdit looks up in ALG_DICT; must be 'CrispEdit' "
                                 "('CRISPEDIT' is accepted and normalised).")
    model_name: Any = _f(help="Model name or path (EasyEdit picks model classes by substring of it), or a "
                              "(model, tokenizer) pair as EasyEdit accepts.")
    device: int | str = _f(0, "Device: a CUDA index (EasyEdit's convention; falls back to CPU with a warning "
                              "when CUDA is unavailable), 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    model_parallel: bool = _f(False, "EasyEdit: load the model with device_map='auto' across GPUs.")
    layers: list[int] = _f(help="Indices of the transformer blocks whose weights are edited (non-empty).")
    rewrite_module_tmp: str = _f("model.layers.{}.mlp.down_proj.weight",
                                 "Parameter-name template of the edited weight; '{}' is replaced by the layer index.")
    # --- Editing (Algorithm 1) -----------------------------------------------------------------------------------
    num_steps: int = _f(25, "Number of epochs over the edit requests (paper: 25).")
    lr: float = _f(5e-4, "Adam learning rate (paper: 5e-4).")
    weight_decay: float = _f(0.0, "Adam weight decay (decoupled, AdamW-style).")
    adam_scaling: str = _f("elementwise", "Adam's second moment: 'elementwise' (Adam, one per weight entry) or "
                                          "'per_matrix' (one per edited matrix, so each step stays in the span of "
                                          "the projected gradients; crispedit_easyedit.optim).")
    batch_size: int = _f(1, "EasyEdit's meaning: edits per call of the apply function (batch_edit cuts the requests "
                            "into chunks of this size; GitHub main's edit() requires 1). Each call runs one "
                            "Algorithm 1 on its edits; see train_batch_size for the optimiser minibatch.")
    train_batch_size: int = _f(32, "Edits per optimiser step inside one call (the paper's minibatch: 32).")
    max_length: int = _f(128, "Maximum tokens of one prompt+target sequence (EasyEdit's evaluators read it too).")
    early_stop_loss: float = _f(0.01, "Stop editing once the mean edit loss of an epoch falls below this (paper: "
                                      "0.01); 0 disables early stopping.")
    seed: int = _f(0, "Random seed of Monte Carlo labels, data order and corpus sampling.")
    train_formats: list[str] = _f(help="Formats each edit is trained in (one example per edit and format; "
                                       "crispedit_easyedit.templates): 'raw' (the prompt as is), 'qa' (the "
                                       "paper's WILD QA context), 'chat' (the tokenizer's chat template, the "
                                       "target as the assistant turn plus end-of-turn) or a format string "
                                       "holding {prompt}. Default ['raw']. An edit's examples share its minibatch, so "
                                       "the steps per epoch do not grow with the formats.",
                                  default_factory=lambda: ["raw"])
    train_eos: bool = _f(False, "Learn the tokenizer's EOS after the target in the 'raw', 'qa' and format-string "
                                "formats, so that generation stops after the answer ('chat' always learns its "
                                "end-of-turn).")
    retain_weight: float = _f(0.0, "Weight of the retain loss (crispedit_easyedit.retain): the model's own greedy "
                                   "answers to retain_count questions from retain_source, asked in every train "
                                   "format, are trained alongside the edits so that answers to other questions "
                                   "stay as they were; 0 disables it.")
    retain_source: str = _f("factbook-chat", "Question pool of the retain loss: 'factbook-chat' (offline Factbook "
                                             "questions no probe or edit asks) or a .txt/.jsonl file, or several "
                                             "joined by '+'.")
    retain_count: int = _f(64, "Questions of the retain loss (each in every train format).")
    retain_answer_tokens: int = _f(24, "At most this many tokens of each retained answer (below max_length).")
    edit_positions: str = _f("all", "Where the edit loss reaches the edited weights (crispedit_easyedit."
                                    "key_positions): 'all' positions (fine-tuning), or 'subject_last', only the "
                                    "last token of each request's 'subject' in its prompt (ROME/MEMIT's key "
                                    "position), so that the edit is keyed on the subject rather than on the "
                                    "relation's words other subjects share; or 'subject_last_only', the same key "
                                    "with the weight change also acting only there during training (the other "
                                    "positions see the starting weights), so the gradient is that of the loss "
                                    "trained, as ROME/MEMIT optimise their value vector.")
    context_null_space_energy: float = _f(0.0, "Under a keyed edit_positions, the fraction of the energy of the "
                                               "edit examples' inputs at their other positions (template, system "
                                               "prompt, answer tokens) whose input directions the weight change may "
                                               "not act on (crispedit_easyedit.context_null_space, AlphaEdit's null "
                                               "space built from the edit prompts), so that the change acts at the "
                                               "subject key and the model deployed is the model trained; in [0, 1), "
                                               "0 disables it. Needs edit_positions 'subject_last' or "
                                               "'subject_last_only' and projection_mode 'gradient', 'update' or "
                                               "'both'.")
    context_null_space_rounds: int = _f(1, "Alternating projections per projection between the capability "
                                           "projection and the context null space (von Neumann): more rounds leave "
                                           "less of the change in the capability projection's removed directions; "
                                           "the change always ends in the context null space. Only with "
                                           "context_null_space_composition 'alternate'.")
    context_null_space_composition: str = _f("alternate", "How the capability projection and the context null "
                                                          "space are composed: 'alternate' (context_null_space_rounds "
                                                          "of each in turn) or 'exact' (the orthogonal projection "
                                                          "onto their intersection, "
                                                          "crispedit_easyedit.context_null_space.ExactIntersection).")
    context_prefixes: int = _f(0, "Number of context prefixes (crispedit_easyedit.context_prefixes): short texts "
                                  "the model writes at the call's start (seeded, ROME/MEMIT's context templates); "
                                  "every epoch adds one raw example per edit whose prompt follows a prefix drawn "
                                  "at random, so the edit holds after other text. 0 disables it.")
    context_prefix_tokens: int = _f(10, "Sampled tokens of each context prefix (after its start word).")
    # --- Curvature (capability statistics) -----------------------------------------------------------------------
    energy_threshold: float = _f(0.8, "gamma: fraction of the Kronecker eigenvalue energy whose directions are "
                                      "removed from the update, in (0, 1].")
    mom2_dataset: str = _f("wikipedia-offline", "Capability corpus spec the curvature statistics are collected on.")
    mom2_n_samples: int = _f(64, "Number of corpus sequences the curvature statistics are collected on (paper n).")
    mom2_chat_fraction: float = _f(0.0, "Share of the capability statistics' tokens taken from chat-formatted "
                                        "questions (crispedit_easyedit.chat_corpus), so that answers through the "
                                        "chat template are protected too; in [0, 1), 0 = Wikipedia only. Needs "
                                        "fisher_type 'mc' (and, with mom2_chat_format 'chat', a tokenizer with a "
                                        "chat template).")
    mom2_chat_source: str = _f("factbook-chat", "Question pool of mom2_chat_fraction: 'factbook-chat' (offline "
                                                "Factbook questions no probe or edit asks) or a .txt/.jsonl file, "
                                                "or several joined by '+'.")
    mom2_chat_format: str = _f("chat", "How mom2_chat_source's prompts are rendered: 'chat' (the chat template "
                                       "with the generation prompt) or 'raw' (plain completion prompts, e.g. "
                                       "CounterFact neighbourhood prompts of records neither edited nor evaluated: "
                                       "their outputs become protected curvature).")
    mom2_chat_answer_tokens: int = _f(0, "With mom2_chat_fraction > 0: when > 0, each chat question is followed "
                                         "by the model's own greedy answer (at most this many tokens) and only the "
                                         "answer's positions are counted; 0 counts the question's positions.")
    mom2_dtype: str = _f("float32", "dtype of K-FAC factors and their eigendecomposition: float32 or float64.")
    fisher_type: str = _f("mc", "'mc': labels sampled from the model (true Fisher / GNH, the paper's choice); "
                                "'empirical': the corpus' next tokens.")
    mc_samples: int = _f(1, "Monte Carlo label samples per token when fisher_type is 'mc'.")
    projection_mode: str = _f("both", "What is projected: 'gradient' (before Adam), 'update' (Adam's step), "
                                      "'both', 'eigenbasis' (Adam's moments on the masked gradient in the "
                                      "Kronecker eigenbasis: no leak, half the cost of 'both'), or 'none' (plain "
                                      "fine-tuning, for ablations).")
    gradient_projection_dtype: str = _f("auto", "Precision of the gradient's projection ('gradient', 'both') or "
                                                 "rotation ('eigenbasis'): 'basis' (the eigenbasis' dtype), "
                                                 "'bfloat16' (about 4x cheaper matmuls with native bf16; the step's "
                                                 "projection stays in the basis dtype, so 'both' and 'eigenbasis' "
                                                 "still leak nothing) or 'auto' (bfloat16 where the edit weights' "
                                                 "device multiplies it natively: AVX512-BF16/AMX CPUs, Ampere+ "
                                                 "GPUs; else 'basis').")
    curvature_factors: str = _f("kfac", "Which curvature builds the projector: 'kfac' (A (x) S, CrispEdit) or "
                                        "'activation' (A (x) I: the activation covariance alone, Adam-NSCL's "
                                        "input-side nullspace; removes the top-energy eigendirections of A).")
    curvature_seq_len: int = _f(256, "Tokens per corpus sequence for the curvature statistics.")
    curvature_batch_size: int = _f(8, "Corpus sequences per forward/backward pass when collecting statistics.")
    exclude_first_tokens: int = _f(0, "Leading positions of each corpus sequence left out of the statistics "
                                      "(attention-sink tokens); must be below curvature_seq_len.")
    cache_dir: str | None = _f("~/.cache/crispedit_easyedit", "Folder of the on-disk curvature cache "
                                                              "(safetensors + JSON); None disables the disk cache.")
    curvature_at: str = _f("base", "'base': the capability curvature and its eigenbases are computed once, at the "
                                   "weights of the first call (theta_0), and reused by every later call on the same "
                                   "model whatever happened to the edit weights; 'current': collected again on "
                                   "the current (possibly edited) weights at every call (cached by their hash).")
    # --- CrispEdit-Seq (Algorithm 2) -----------------------------------------------------------------------------
    chunk_size: int | None = _f(None, "CrispEdit-Seq: edits per chunk (paper: 100); None = one batch edit "
                                      "(Algorithm 1).")
    edit_stats_weight: float = _f(1.0, "CrispEdit-Seq: weight of the past edits' K-FAC statistics relative to "
                                       "the capability statistics when they are merged: A = (n_cap A_cap + w n_edit "
                                       "A_edit) / (n_cap + w n_edit), likewise S. 1.0 is the paper's token "
                                       "weighting.")
    edit_kfac_on_full_sequence: bool = _f(True, "CrispEdit-Seq: collect the statistics of past edits on the whole "
                                                "prompt+target sequence, not only target tokens (paper App. E).")
    # --- Attributes EasyEdit's BaseEditor / evaluators read (both generations) -----------------------------------
    fp16: bool = _f(False, "EasyEdit (GitHub main): load a model given by name in float16.")
    use_chat_template: bool = _f(False, "EasyEdit (GitHub main) evaluators: wrap prompts in the tokenizer's "
                                        "chat template.")
    evaluation_type: str | None = _f(None, "EasyEdit (GitHub main) evaluation: None (teacher-forced token "
                                           "accuracy), 'LLM-judge' (WILD) or 'generate-text'.")
    api_key: str | None = _f(None, "EasyEdit (GitHub main) LLM-judge API key (None: normalised exact match).",
                             repr=False)

    # ------------------------------------------------------------------------------------------------------------
    _INT_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "num_steps", "batch_size", "train_batch_size", "max_length", "mom2_n_samples", "mc_samples",
        "curvature_seq_len",
        "curvature_batch_size", "exclude_first_tokens", "seed", "chunk_size", "retain_count",
        "retain_answer_tokens", "mom2_chat_answer_tokens", "context_prefixes", "context_prefix_tokens",
        "context_null_space_rounds",
    })
    _FLOAT_FIELDS: ClassVar[frozenset[str]] = frozenset({"lr", "weight_decay", "energy_threshold",
                                                         "early_stop_loss", "edit_stats_weight",
                                                         "mom2_chat_fraction", "retain_weight",
                                                         "context_null_space_energy"})
    _BOOL_FIELDS: ClassVar[frozenset[str]] = frozenset({"model_parallel", "edit_kfac_on_full_sequence", "fp16",
                                                        "use_chat_template", "train_eos"})

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------- validation --
    def validate(self) -> None:
        """Coerce and check every field; raises ``ValueError`` naming the field, the value and what is allowed.

        Coercions: numeric strings (``"5e-4"``) in numeric fields become numbers, integral floats in integer fields
        become ints, ints in float fields become floats, digit strings for ``device`` become ints, ``"CRISPEDIT"``
        becomes ``"CrispEdit"``, a tuple of layers becomes a list.
        """
        self._check_alg_name()
        self._check_model_name()
        self._check_device()
        for name in sorted(self._BOOL_FIELDS):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self._check_layers()
        tmp = self.rewrite_module_tmp
        if not isinstance(tmp, str) or tmp.count("{}") != 1:
            raise ValueError(f"rewrite_module_tmp must be a string containing '{{}}' exactly once (the layer "
                             f"index), e.g. 'model.layers.{{}}.mlp.down_proj.weight'; got {tmp!r}")
        # Integers with lower bounds.
        for name, minimum in (("num_steps", 1), ("batch_size", 1), ("train_batch_size", 1), ("max_length", 2),
                              ("mom2_n_samples", 1),
                              ("mc_samples", 1), ("curvature_seq_len", 2), ("curvature_batch_size", 1),
                              ("exclude_first_tokens", 0), ("seed", None), ("retain_count", 1),
                              ("retain_answer_tokens", 1), ("mom2_chat_answer_tokens", 0), ("context_prefixes", 0),
                              ("context_null_space_rounds", 1),
                              ("context_prefix_tokens", 1)):
            setattr(self, name, _as_int(name, getattr(self, name), minimum))
        if self.retain_answer_tokens >= self.max_length:
            raise ValueError(f"retain_answer_tokens must be smaller than max_length ({self.max_length}) so that the "
                             f"question fits, got {self.retain_answer_tokens}")
        if self.context_prefix_tokens >= self.max_length:
            raise ValueError(f"context_prefix_tokens must be smaller than max_length ({self.max_length}) so that the "
                             f"prompt and target fit, got {self.context_prefix_tokens}")
        if self.chunk_size is not None:
            self.chunk_size = _as_int("chunk_size", self.chunk_size, 1, allowed="None or an integer >= 1")
        if self.exclude_first_tokens >= self.curvature_seq_len:
            raise ValueError(f"exclude_first_tokens must be smaller than curvature_seq_len "
                             f"({self.curvature_seq_len}) so that some positions remain, got "
                             f"{self.exclude_first_tokens}")
        # Floats with ranges.
        self.lr = _as_float("lr", self.lr, low=0.0, low_inclusive=False)
        self.weight_decay = _as_float("weight_decay", self.weight_decay, low=0.0)
        self.early_stop_loss = _as_float("early_stop_loss", self.early_stop_loss, low=0.0)
        self.edit_stats_weight = _as_float("edit_stats_weight", self.edit_stats_weight, low=0.0)
        self.energy_threshold = _as_float("energy_threshold", self.energy_threshold, low=0.0, low_inclusive=False,
                                          high=1.0)
        self.mom2_chat_fraction = _as_float("mom2_chat_fraction", self.mom2_chat_fraction, low=0.0)
        self.retain_weight = _as_float("retain_weight", self.retain_weight, low=0.0)
        self.context_null_space_energy = _as_float("context_null_space_energy", self.context_null_space_energy,
                                                   low=0.0)
        if self.context_null_space_energy >= 1.0:
            raise ValueError(f"context_null_space_energy must be in [0, 1) (a fraction of the context inputs' energy; "
                             f"0 disables it), got {self.context_null_space_energy!r}")
        if self.mom2_chat_fraction >= 1.0:
            raise ValueError(f"mom2_chat_fraction must be in [0, 1) (a share of the statistics' tokens; Wikipedia "
                             f"keeps the rest), got {self.mom2_chat_fraction!r}")
        # Choices and strings.
        _check_choice("mom2_dtype", self.mom2_dtype, tuple(MOM2_DTYPES))
        _check_choice("fisher_type", self.fisher_type, FISHER_TYPES)
        _check_choice("projection_mode", self.projection_mode, PROJECTION_MODES)
        _check_choice("adam_scaling", self.adam_scaling, ADAM_SCALINGS)
        _check_choice("curvature_factors", self.curvature_factors, CURVATURE_FACTORS)
        _check_choice("edit_positions", self.edit_positions, EDIT_POSITIONS)
        if self.context_null_space_energy > 0 and self.edit_positions == "all":
            raise ValueError(f"context_null_space_energy {self.context_null_space_energy!r} needs a keyed "
                             f"edit_positions, one of {[p for p in EDIT_POSITIONS if p != 'all']} (under 'all' every "
                             f"position is an edit position and there is no context to protect); got 'all'")
        if self.context_null_space_rounds != 1 and self.context_null_space_energy <= 0:
            raise ValueError(f"context_null_space_rounds {self.context_null_space_rounds!r} has no effect without "
                             f"context_null_space_energy > 0 (got {self.context_null_space_energy!r}); set both or "
                             f"leave the rounds at 1")
        _check_choice("context_null_space_composition", self.context_null_space_composition,
                      CONTEXT_NULL_SPACE_COMPOSITIONS)
        if self.context_null_space_composition != "alternate" and self.context_null_space_energy <= 0:
            raise ValueError(f"context_null_space_composition {self.context_null_space_composition!r} has no effect "
                             f"without context_null_space_energy > 0 (got {self.context_null_space_energy!r}); set "
                             f"both or leave it at 'alternate'")
        if self.context_null_space_rounds != 1 and self.context_null_space_composition != "alternate":
            raise ValueError(f"context_null_space_rounds {self.context_null_space_rounds!r} applies to "
                             f"context_null_space_composition 'alternate' only; 'exact' projects onto the "
                             f"intersection in one step (got {self.context_null_space_composition!r})")
        if self.context_null_space_energy > 0 and self.projection_mode not in ("gradient", "update", "both"):
            raise ValueError(f"context_null_space_energy {self.context_null_space_energy!r} needs projection_mode "
                             f"'gradient', 'update' or 'both' (it projects each step after the capability "
                             f"projection); got {self.projection_mode!r}")
        _check_choice("gradient_projection_dtype", self.gradient_projection_dtype, GRADIENT_PROJECTION_DTYPES)
        _check_choice("curvature_at", self.curvature_at, CURVATURE_AT)
        _check_choice("evaluation_type", self.evaluation_type, EVALUATION_TYPES)
        if self.mom2_chat_answer_tokens != 0 and self.mom2_chat_fraction <= 0:
            raise ValueError(f"mom2_chat_answer_tokens {self.mom2_chat_answer_tokens!r} has no effect without "
                             f"mom2_chat_fraction > 0 (got {self.mom2_chat_fraction!r}); set both or neither")
        if self.mom2_chat_answer_tokens >= self.curvature_seq_len:
            raise ValueError(f"mom2_chat_answer_tokens must be below curvature_seq_len ({self.curvature_seq_len}), "
                             f"got {self.mom2_chat_answer_tokens!r}")
        _check_choice("mom2_chat_format", self.mom2_chat_format, MOM2_CHAT_FORMATS)
        if self.mom2_chat_format != "chat" and self.mom2_chat_answer_tokens:
            raise ValueError(f"mom2_chat_answer_tokens {self.mom2_chat_answer_tokens!r} needs mom2_chat_format 'chat' "
                             f"(the answers are the model's chat answers), got {self.mom2_chat_format!r}")
        if self.mom2_chat_fraction > 0 and self.fisher_type != "mc":
            raise ValueError(f"mom2_chat_fraction {self.mom2_chat_fraction} needs fisher_type 'mc' (the model's own "
                             f"sampled answers are the chat questions' labels), got {self.fisher_type!r}")
        for name in ("mom2_chat_source", "retain_source"):  # question pools (chat_corpus.chat_questions)
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be 'factbook-chat' or a .txt/.jsonl file of questions, got {value!r}")
        if not isinstance(self.mom2_dataset, str) or not self.mom2_dataset.strip():
            raise ValueError(f"mom2_dataset must be a non-empty string (the capability corpus spec, e.g. "
                             f"'wikipedia-offline'), got {self.mom2_dataset!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ValueError(f"cache_dir must be a non-empty path string or None (no disk cache), "
                             f"got {self.cache_dir!r}")
        self._check_train_formats()
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError(f"api_key must be a string or None, got a {type(self.api_key).__name__}")

    def _check_train_formats(self) -> None:
        formats = self.train_formats
        if isinstance(formats, str):
            formats = [formats]
        if not isinstance(formats, (list, tuple)) or not formats:
            raise ValueError(f"train_formats must be a non-empty list of formats ({', '.join(NAMED_FORMATS)} or a "
                             f"format string holding {{prompt}}), got {self.train_formats!r}")
        for fmt in formats:
            check_format(fmt)
        if len(set(formats)) != len(formats):
            raise ValueError(f"train_formats lists a format twice: {list(formats)}")
        self.train_formats = list(formats)
        if self.use_chat_template and "chat" not in self.train_formats:
            logger.warning("use_chat_template is true (EasyEdit evaluates through the chat template) but "
                           "train_formats %s does not train in it: add 'chat' so training and evaluation agree",
                           self.train_formats)

    def _check_alg_name(self) -> None:
        if self.alg_name in LEGACY_ALG_NAMES:
            logger.info("alg_name %r (the CrispEdit authors' spelling) normalised to %r", self.alg_name, ALG_NAME)
            self.alg_name = ALG_NAME
        if self.alg_name != ALG_NAME:
            raise ValueError(f"alg_name must be {ALG_NAME!r} (or the legacy {LEGACY_ALG_NAMES[0]!r}), got "
                             f"{self.alg_name!r}: this file is not a CrispEdit hparams file")

    def _check_model_name(self) -> None:
        name = self.model_name
        if isinstance(name, str):
            if not name.strip():
                raise ValueError("model_name must be a non-empty model name or path, got ''")
        elif isinstance(name, (tuple, list)):
            if len(name) != 2:
                raise ValueError(f"model_name given as a sequence must be a (model, tokenizer) pair, got "
                                 f"{len(name)} items")
        else:
            raise ValueError(f"model_name must be a model name/path string or a (model, tokenizer) pair, got a "
                             f"{type(name).__name__}")

    def _check_device(self) -> None:
        device = self.device
        if isinstance(device, torch.device):
            device = self.device = str(device)
        if isinstance(device, bool):
            raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}")
        if isinstance(device, str) and device.strip().isdigit():
            device = self.device = int(device.strip())
        if isinstance(device, int):
            if device < 0:
                raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}")
            return
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}")

    def _check_layers(self) -> None:
        layers = self.layers
        if isinstance(layers, tuple):
            layers = list(layers)
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers must be a non-empty list of non-negative layer indices, e.g. [14, 15, 16]; "
                             f"got {self.layers!r}")
        out = []
        for item in layers:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ValueError(f"layers must contain non-negative integers only, got {item!r} in {self.layers!r}")
            if item in out:
                raise ValueError(f"layers must not repeat an index, got {item} twice in {self.layers!r}")
            out.append(item)
        self.layers = out

    # ------------------------------------------------------------------------------------------------- helpers --
    @property
    def factor_dtype(self) -> torch.dtype:
        """The torch dtype of K-FAC factors and eigenbases (``mom2_dtype``)."""
        return MOM2_DTYPES[self.mom2_dtype]

    def torch_device(self) -> torch.device:
        """The ``torch.device`` for ``device``.

        An integer index (EasyEdit's convention, and its default 0) maps to ``cuda:N``; when CUDA is not available it
        falls back to the CPU with a warning, so EasyEdit-style YAML files run on CPU-only machines. An explicit
        ``'cuda'``/``'cuda:N'``/``'mps'`` that is not available raises instead.

        Raises:
            ValueError: the device names an accelerator that is not available.
        """
        device = self.device
        if isinstance(device, int):
            if not torch.cuda.is_available():
                logger.warning("device=%d asks for cuda:%d but CUDA is not available; using the CPU", device, device)
                return torch.device("cpu")
            if device >= torch.cuda.device_count():
                raise ValueError(f"device={device} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                                 f"choose 0..{torch.cuda.device_count() - 1} or 'cpu'")
            return torch.device(f"cuda:{device}")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r} but CUDA is not available on this machine; use 'cpu'")
            index = int(device.split(":")[1]) if ":" in device else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device='mps' but MPS is not available on this machine; use 'cpu'")
        return torch.device(device)

    def edit_parameter_names(self) -> list[str]:
        """The parameter names of the edited weights, one per layer in ``layers`` order."""
        return [self.rewrite_module_tmp.format(layer) for layer in self.layers]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}`` for every field, in declaration order (for CLIs and docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    # ------------------------------------------------------------------------------------------- serialisation --
    def to_dict(self, redact_secrets: bool = False) -> dict[str, Any]:
        """All fields as a plain dict (``from_dict(to_dict())`` round-trips).

        Args:
            redact_secrets: replace a set ``api_key`` by ``"***"`` (for logs and result files).
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layers"] = list(self.layers)
        if redact_secrets and out.get("api_key"):
            out["api_key"] = "***"
        return out

    @classmethod
    def construct_float_from_scientific_notation(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Turn numeric strings (``"5e-4"``) of this class' numeric fields into floats, in place (EasyEdit's API).

        YAML 1.1 (PyYAML) reads ``5e-4`` as a string. Unlike EasyEdit's version, strings of non-numeric fields (e.g.
        a ``model_name`` of ``"1234"``) are left alone.
        """
        for key in cls._INT_FIELDS | cls._FLOAT_FIELDS:
            value = config.get(key)
            if isinstance(value, str):
                try:
                    config[key] = float(value)
                except ValueError:
                    pass  # left for validate() to reject with a message naming the field
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CrispEditHyperParams:
        """Build from a mapping; legacy keys of the authors' YAML are dropped (logged), unknown keys rejected.

        Raises:
            ValueError: an unknown key (the message names the closest valid key), a missing required key, or an
                invalid value.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"hparams config must be a mapping of field names to values, got a "
                             f"{type(config).__name__}")
        config = dict(config)
        valid = [f.name for f in fields(cls)]
        for key in [k for k in config if k in LEGACY_KEYS]:
            value = config.pop(key)
            if key in _LEGACY_NEUTRAL and not any(value == v and type(value) is type(v)
                                                  for v in _LEGACY_NEUTRAL[key]):
                logger.warning("ignoring legacy hparams key %s=%r: %s", key, value, LEGACY_KEYS[key])
            else:
                logger.info("ignoring legacy hparams key %s=%r (CrispEdit authors' YAML): %s", key, value,
                            LEGACY_KEYS[key])
        unknown = [k for k in config if k not in valid]
        if unknown:
            key = unknown[0]
            close = suggest_key(str(key), valid)
            hint = f"did you mean {close!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ValueError(f"unknown CrispEdit hparams key {key!r}: {hint}")
        missing = [f.name for f in fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in config]
        if missing:
            raise ValueError(f"CrispEdit hparams miss required key(s): {', '.join(missing)}")
        cls.construct_float_from_scientific_notation(config)
        return cls(**config)

    @classmethod
    def from_json(cls, fpath: str | Path) -> CrispEditHyperParams:
        """Build from a JSON file (EasyEdit's ``HyperParams.from_json``).

        Raises:
            FileNotFoundError: the file does not exist.
        """
        path = Path(fpath).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CrispEdit hparams JSON file not found: {str(path)!r}")
        with path.open("r", encoding="utf-8") as stream:
            return cls.from_dict(json.load(stream))

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> CrispEditHyperParams:
        """Build from an EasyEdit-style YAML file; ``.yaml`` is appended when the path has no YAML/JSON suffix.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the path is a folder, the file is not UTF-8, repeats a key, is empty or not a mapping, or
                holds invalid values.
        """
        path_str = str(hparams_name_or_path)
        if not path_str.endswith((".yaml", ".yml", ".json")):
            path_str += ".yaml"
        path = Path(path_str).expanduser()
        if path.suffix == ".json":
            return cls.from_json(path)
        if path.is_dir():
            raise ValueError(f"CrispEdit hparams path {str(path)!r} is a folder; give a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"CrispEdit hparams file not found: {str(path)!r}")
        try:
            with path.open("r", encoding="utf-8") as stream:
                config = yaml.load(stream, Loader=UniqueKeySafeLoader)  # noqa: S506 - a SafeLoader subclass
        except UnicodeDecodeError as exc:
            raise ValueError(f"CrispEdit hparams file {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                             f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
        except yaml.YAMLError as exc:  # a repeated key or a syntax error: one line naming the file
            raise ValueError(f"CrispEdit hparams file {str(path)!r} is not valid YAML: "
                             f"{' '.join(str(exc).split())}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"CrispEdit hparams file {str(path)!r} must hold a YAML mapping, got "
                             f"{type(config).__name__}")
        return cls.from_dict(config)


class UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a mapping repeating a key (plain YAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1}); each key "
                    "may appear once", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


KEY_ALIASES: dict[str, str] = {
    "gamma": "energy_threshold", "energy": "energy_threshold", "threshold": "energy_threshold",
    "n": "mom2_n_samples", "num_samples": "mom2_n_samples", "n_samples": "mom2_n_samples",
    "mom2_samples": "mom2_n_samples", "samples": "mom2_n_samples",
    "chunk": "chunk_size", "chunks": "chunk_size", "seq_chunk_size": "chunk_size",
    "lr_rate": "lr", "learning_rate": "lr", "step_size": "lr",
    "epochs": "num_steps", "num_epochs": "num_steps", "steps": "num_steps", "n_steps": "num_steps",
    "minibatch_size": "train_batch_size", "mini_batch_size": "train_batch_size",
    "layer": "layers", "layer_ids": "layers", "edit_layers": "layers",
    "corpus": "mom2_dataset", "dataset": "mom2_dataset", "stats_dataset": "mom2_dataset",
    "seq_len": "curvature_seq_len", "sequence_length": "curvature_seq_len",
    "fisher": "fisher_type", "mode": "projection_mode", "projection": "projection_mode",
    "dtype": "mom2_dtype", "factor_dtype": "mom2_dtype", "cache": "cache_dir", "model": "model_name",
    "max_len": "max_length", "wd": "weight_decay", "module": "rewrite_module_tmp",
}
"""Names users type for a field (the paper's symbols, other libraries' names) -> the field; used for suggestions
only, never accepted silently."""


def suggest_key(key: str, valid: list[str]) -> str | None:
    """The field an unknown key most likely means: an alias (:data:`KEY_ALIASES`, also misspelled), else a close
    spelling of a field; None when nothing is close (no far-fetched guesses such as ``gama`` -> ``alg_name``)."""
    lowered = key.strip().lower().replace("-", "_")
    if lowered in valid:
        return lowered
    if lowered in KEY_ALIASES:
        return KEY_ALIASES[lowered]
    candidates = {name: name for name in valid}
    candidates.update(KEY_ALIASES)
    close = difflib.get_close_matches(lowered, list(candidates), n=1, cutoff=0.75)
    return candidates[close[0]] if close else None


def _from_numeric_string(name: str, value: Any, allowed: str) -> Any:
    """A string such as "5e-4" (YAML reads it as text) as a float; any other value unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be {allowed}, got {value!r}") from None


def _as_int(name: str, value: Any, minimum: int | None, allowed: str | None = None) -> int:
    """``value`` as an int (integral floats and numeric strings accepted), at least ``minimum``."""
    allowed = allowed or ("an integer" if minimum is None else f"an integer >= {minimum}")
    original = value
    value = _from_numeric_string(name, value, allowed)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {allowed}, got {original!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {original!r}")
    return value


def _as_float(name: str, value: Any, low: float | None = None, low_inclusive: bool = True,
              high: float | None = None) -> float:
    """``value`` as a finite float (ints and numeric strings accepted) within the given bounds."""
    lo = "" if low is None else (f">= {low:g}" if low_inclusive else f"> {low:g}")
    hi = "" if high is None else f"<= {high:g}"
    allowed = "a number" + (" " if lo or hi else "") + " and ".join(p for p in (lo, hi) if p)
    original = value
    value = _from_numeric_string(name, value, allowed)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {original!r}")
    value = float(value)
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {allowed}, got {original!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be {allowed}, got {original!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
