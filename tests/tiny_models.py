"""Tiny models and a locally trained tokenizer for tests (no hub access).

``tiny_tokenizer()`` trains a byte-level BPE tokenizer on real ZsRE/CounterFact text from ../shared/data (or a
built-in fallback text), so tokenisation behaves like a real GPT-2/Llama-3 style BPE (leading-space tokens).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_FALLBACK_TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees. "
    "Who is the author of Hamlet? William Shakespeare wrote Hamlet. The river Nile flows through Egypt. "
)


TOKENIZER_TEXT = Path(__file__).resolve().parent / "fixtures" / "tiny_tokenizer_text.jsonl"
"""The tiny tokenizer's training sentences: prompt, targets and rephrase of CounterFact records 0-399 and ZsRE
``zsre_train.json`` records 0-399 (one JSON string per line), kept in the repository so that the tokenizer, and every
test built on it, is the same with or without ``../shared/data``."""


def training_text() -> list[str]:
    """Real benchmark sentences to train the tiny tokenizer on (:data:`TOKENIZER_TEXT`)."""
    return [_FALLBACK_TEXT] + [json.loads(line) for line in TOKENIZER_TEXT.read_text(encoding="utf-8").splitlines()]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process; eos = pad = "<|endoftext|>", no BOS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(training_text(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def tiny_llama(seed: int = 0, vocab_size: int = 512, layers: int = 4, dtype=torch.float32) -> LlamaForCausalLM:
    """A random 4-layer Llama (hidden 32, MLP 64) in eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def tiny_gpt2(seed: int = 0, vocab_size: int = 512, layers: int = 3) -> GPT2LMHeadModel:
    """A random 3-layer GPT-2 (n_embd 32, Conv1D MLP weights stored transposed) in eval mode."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                     eos_token_id=0, bos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    return model
