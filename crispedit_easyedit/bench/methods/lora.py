"""``lora``: LoRA (peft) on the modules CrispEdit edits, trained with CrispEdit's loop and merged into the weights.

The adapters sit on the same modules (``rewrite_module_tmp`` with ``layers``, by default the MLP ``down_proj`` of
the CrispEdit file's layers) and are trained by :func:`crispedit_easyedit.editing.finetune_projected` without a
projector: the same tokenisation, teacher-forced target-token loss, shuffled minibatches, Adam(W) and early stop
as CrispEdit and ``ft``, only the trainable parameters differ (the LoRA factors B (d_out, r) and A (r, d_in)).
At the end the adapters are merged (``W + alpha / r * B A``) and removed, so the evaluation sees a plain model of
the original class. In a sequential run every chunk trains and merges a fresh adapter on the current weights.

Settings (:class:`LoRAHyperParams`) come from an EasyEdit-layout YAML, ``config["hparams"]`` (default
``hparams/LoRA-peft/SmolLM2-135M-Instruct.yaml``), with ``config["overrides"]``; the harness's ``seed`` wins
unless the overrides set one. The receipt holds ``method``, ``settings``, ``seconds`` (``edit``, ``total``),
``n_requests``, ``chunk_index``, the epochs, steps and losses, the number of trainable parameters and the norm of
each merged weight change.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from ...editing import EditTarget, finetune_projected
from ...hparams import suggest_key
from .base import MethodOutcome, register_method, resolve_path

logger = logging.getLogger(__name__)

DEFAULT_HPARAMS = "hparams/LoRA-peft/SmolLM2-135M-Instruct.yaml"


@dataclass(kw_only=True)
class LoRAHyperParams:
    """LoRA settings; every field is validated when the object is built."""

    alg_name: str = "LoRA-peft"
    model_name: str | None = None
    device: int | str = "cpu"
    layers: list[int] = field(default_factory=list)
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 5e-3
    weight_decay: float = 0.0
    num_steps: int = 25
    train_batch_size: int = 16
    max_length: int = 128
    early_stop_loss: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)) or not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
            raise ValueError(f"layers must be a non-empty list of non-negative layer indices, got {self.layers!r}")
        self.layers = list(self.layers)
        if not isinstance(self.rewrite_module_tmp, str) or self.rewrite_module_tmp.count("{}") != 1:
            raise ValueError(f"rewrite_module_tmp must contain '{{}}' once, got {self.rewrite_module_tmp!r}")
        self.rewrite_module_tmp = self.rewrite_module_tmp.removesuffix(".weight")  # CrispEdit's parameter form
        for name in ("rank", "num_steps", "train_batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, low in (("lr", 0.0), ("alpha", 0.0)):
            value = float(getattr(self, name))
            if not value > low:
                raise ValueError(f"{name} must be a number > {low:g}, got {getattr(self, name)!r}")
            setattr(self, name, value)
        for name in ("weight_decay", "early_stop_loss", "dropout"):
            value = float(getattr(self, name))
            if value < 0 or (name == "dropout" and value >= 1):
                raise ValueError(f"{name} must be >= 0{' and < 1' if name == 'dropout' else ''}, "
                                 f"got {getattr(self, name)!r}")
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LoRAHyperParams":
        """Build from a mapping; an unknown key is a ValueError naming the closest valid key (or all of them)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                close = suggest_key(str(key), valid)
                hint = f"did you mean {close!r}?" if close in valid else f"valid keys: {', '.join(valid)}"
                raise ValueError(f"unknown LoRA hparams key {key!r}: {hint}")
        values = {k: (float(v) if isinstance(v, str) and k in ("lr", "weight_decay", "early_stop_loss") else v)
                  for k, v in values.items()}  # YAML 1.1 reads 5e-3 as a string
        return cls(**values)

    def module_names(self) -> list[str]:
        """The adapted modules, one per layer in ``layers`` order."""
        return [self.rewrite_module_tmp.format(i) for i in self.layers]


def lora_hparams(config: Mapping[str, Any]) -> LoRAHyperParams:
    """The YAML ``config["hparams"]`` (default :data:`DEFAULT_HPARAMS`) with ``config["overrides"]`` and the seed."""
    path = resolve_path(config.get("hparams") or DEFAULT_HPARAMS)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA hparams file {path} does not exist")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"LoRA hparams file {path} must hold a YAML mapping, got {type(values).__name__}")
    values.update(config.get("overrides") or {})
    if config.get("seed") is not None and "seed" not in (config.get("overrides") or {}):
        values["seed"] = int(config["seed"])
    return LoRAHyperParams.from_dict(values)


@register_method("lora")
def lora(model: torch.nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]],
         config: Mapping[str, Any]) -> MethodOutcome:
    """Train a LoRA adapter on the edit requests, merge it into the weights and return the plain model."""
    from peft import LoraConfig, get_peft_model

    hp = lora_hparams(config)
    names = hp.module_names()
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"LoRA target module {missing[0]!r} is not in the model (layers {hp.layers}, "
                       f"rewrite_module_tmp {hp.rewrite_module_tmp!r})")
    originals = {n: modules[n].weight.detach().clone() for n in names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    started = time.perf_counter()
    torch.manual_seed(hp.seed)  # the adapter's initialisation
    adapted = get_peft_model(model, LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout,
                                               target_modules=names, bias="none"))
    try:
        # peft injects the adapters into ``model`` itself, so the shared loop trains it through the plain forward
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        targets = [EditTarget(n, p, False) for n, p in params]
        epochs, steps, history = finetune_projected(model, tok, list(requests), hp, targets, None,
                                                    progress=bool(config.get("progress", False)))
        merged = adapted.merge_and_unload()
    except BaseException:
        merged = adapted.unload()  # the base weights untouched
        raise
    finally:
        for name, param in merged.named_parameters():
            param.requires_grad_(flags.get(name, False))
            param.grad = None
    seconds = time.perf_counter() - started
    merged_modules = dict(merged.named_modules())
    delta_norms = {n: float((merged_modules[n].weight.detach() - originals[n]).float().norm()) for n in names}
    receipt = {
        "method": "lora",
        "settings": dataclasses.asdict(hp),
        "seconds": {"edit": round(seconds, 3), "total": round(seconds, 3)},
        "n_requests": len(requests),
        "chunk_index": int(config.get("chunk_index", 0)),
        "epochs": epochs, "steps": steps, "final_loss": history[-1], "loss_history": history,
        "trainable_parameters": sum(p.numel() for _, p in params),
        "delta_norms": delta_norms,
    }
    logger.info("LoRA r=%d on %d modules: %d epochs, %d steps, final loss %.4f", hp.rank, len(names), epochs, steps,
                history[-1])
    return MethodOutcome(model=merged, receipt=receipt)
