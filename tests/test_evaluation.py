"""Tests of crispedit_easyedit.bench.evaluation (WILD generation, teacher forcing, capability metrics) and of
crispedit_easyedit.easyedit.evaluate (EasyEdit's own compute_edit_quality), on tiny models and a scripted bigram LM.

The bigram LM (``BigramLM``) predicts the next token from the last token only, through a (V, V) table of logits; an
all-zero row predicts token 0 (EOS of the tiny tokenizer). Setting ``table[a, b] = 1`` scripts "after a comes b", so
generation, stop rules and teacher-forced predictions have answers known in advance.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from crispedit_easyedit.bench import evaluation as ev
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

V = 512  # vocabulary of tiny_llama / tiny_gpt2 and tiny_tokenizer()
BV = 2048  # vocabulary of the bigram LM and its tokenizer (names such as " Paris" are single tokens there)


# ----------------------------------------------------------------------------------------------------------------
# A scripted bigram language model
# ----------------------------------------------------------------------------------------------------------------
class BigramConfig(PretrainedConfig):
    model_type = "crispedit_test_bigram"

    def __init__(self, vocab_size: int = BV, num_hidden_layers: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers


class BigramLM(PreTrainedModel, GenerationMixin):
    """logits[b, t] = table[input_ids[b, t]]; counts forward calls in ``calls``."""

    config_class = BigramConfig

    def __init__(self, config: BigramConfig) -> None:
        super().__init__(config)
        self.table = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))
        self.calls = 0
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        self.calls += 1
        return CausalLMOutputWithPast(logits=self.table[input_ids])


def bigram() -> BigramLM:
    return BigramLM(BigramConfig(eos_token_id=0, pad_token_id=0)).eval()


def script(model: BigramLM, ids: list[int]) -> None:
    """Make the model continue ids[0] with ids[1], ids[1] with ids[2], ... (no conflicting transitions)."""
    with torch.no_grad():
        for a, b in zip(ids, ids[1:]):
            row = model.table[a]
            assert row.abs().sum() == 0 or int(row.argmax()) == b, f"conflicting transition {a} -> {b}"
            row.zero_()
            row[b] = 1.0


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def btok() -> Any:
    """The tokenizer of the bigram LM (a 2048-token BPE)."""
    return tiny_tokenizer(BV)


def ids_of(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def last_id(tok: Any, text: str) -> int:
    return ids_of(tok, text)[-1]


# ----------------------------------------------------------------------------------------------------------------
# String metrics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The  Paris!", "paris"),
    ("An apple a day", "apple day"),
    ("Theater and anthem", "theater and anthem"),  # articles only as whole words
    ("Washington, D.C.", "washington dc"),
    ("  A  ", ""),
    ("Hello\tWorld\n", "hello world"),
    ("O'Neill's (1990)", "oneills 1990"),
])
def test_squad_normalize(text: str, expected: str) -> None:
    assert ev.squad_normalize(text) == expected


@pytest.mark.parametrize("pred, gold, em, cont", [
    ("Paris", "paris.", True, True),
    ("The capital is Paris", "Paris", False, True),
    ("Parisian food", "Paris", False, False),  # word boundary: no match inside a word
    ("New York City", "York", False, True),
    ("New York City", "York City", False, True),
    ("City of York", "York City", False, False),
    ("", "Paris", False, False),
    ("the", "a", True, False),  # both normalise to "": equal, but an empty gold never "contains"
    ("It is Berlin", ["Paris", "Berlin"], False, True),
    ("Berlin", ["Paris", "berlin"], True, True),
])
def test_exact_match_and_contains(pred: str, gold: Any, em: bool, cont: bool) -> None:
    assert ev.exact_match(pred, gold) is em
    assert ev.contains(pred, gold) is cont


def test_empty_gold_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ev.contains("Paris", [])


def test_truncate_answer() -> None:
    assert ev.truncate_answer(" Paris. Berlin") == "Paris"
    assert ev.truncate_answer("Paris\nBerlin. x") == "Paris"
    assert ev.truncate_answer("no stop here ") == "no stop here"
    assert ev.truncate_answer(".") == ""


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------
def chat_tok(tok: Any) -> Any:
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return t


def test_templates(tok: Any) -> None:
    q = "What is the capital of France? "
    assert ev.format_prompt(tok, q, "qa") == "Please answer the question:\n\nQ: What is the capital of France?\nA:"
    assert ev.format_prompt(tok, q, "none") == "What is the capital of France?"
    assert ev.format_prompt(chat_tok(tok), q, "chat") == "<|user|>What is the capital of France?\n<|assistant|>"
    with pytest.raises(ValueError, match="chat template"):
        ev.format_prompt(tok, q, "chat")
    with pytest.raises(ValueError, match="valid templates: qa, none, chat"):
        ev.format_prompt(tok, q, "QA")


def test_prompt_ids_never_end_in_a_space_token(tok: Any) -> None:
    for template in ("qa", "none"):
        ids = ev.prompt_token_ids(tok, "Who wrote Hamlet?  \n", template)
        assert ids == tok(ev.format_prompt(tok, "Who wrote Hamlet?", template))["input_ids"]
        assert not tok.decode(ids[-1:]).endswith((" ", "\n"))


# ----------------------------------------------------------------------------------------------------------------
# WILD generation
# ----------------------------------------------------------------------------------------------------------------
def test_generation_stops_at_period_newline_and_eos(btok: Any) -> None:
    tok, model = btok, bigram()
    paris, berlin, dot, nl = ids_of(tok, " Paris"), ids_of(tok, " Berlin"), ids_of(tok, "."), ids_of(tok, "\n")
    assert len(dot) == 1 and len(nl) == 1
    # "... is" -> " Paris" "." " London" EOS ; "... city" -> " Berlin" "\n" " Rome" ; "... at" -> " one" EOS
    script(model, [last_id(tok, "The capital of France is"), *paris, *dot, *ids_of(tok, " London"), 0])
    script(model, [last_id(tok, "A city"), *berlin, *nl, *ids_of(tok, " Rome")])
    script(model, [last_id(tok, "Water boils at"), *ids_of(tok, " one"), 0])
    questions = ["The capital of France is", "A city", "Water boils at", "Who wrote Hamlet?"]
    answers = ev.wild_generate(model, tok, questions, "none", batch_size=4, show_progress=False)
    assert answers == ["Paris", "Berlin", "one", ""]  # unscripted: EOS at once

    # generation really stops at the stop string (not only truncated afterwards): 1 prefill + len(paris) steps
    model.calls = 0
    assert ev.wild_generate(model, tok, questions[:1], "none", show_progress=False) == ["Paris"]
    assert model.calls == len(paris) + 1


def test_generation_respects_max_new_tokens(btok: Any) -> None:
    tok, model = btok, bigram()
    word = ids_of(tok, " Paris")
    assert len(word) == 1
    script(model, [last_id(tok, "Say"), word[0], word[0]])  # " Paris" -> " Paris" forever
    assert ev.wild_generate(model, tok, ["Say"], "none", max_new_tokens=3, show_progress=False) == [
        "Paris Paris Paris"]
    long = ev.wild_generate(model, tok, ["Say"], "none", show_progress=False)[0]
    assert long.split() == ["Paris"] * 40


def _manual_greedy(model: nn.Module, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            if nxt == 0:
                break
            out.append(nxt)
    return out[len(ids):]


QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "The river Nile flows through which country, and how long is the river in total?",
    "Water boils at",
    "Which language is spoken in the country whose capital is Berlin?",
]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_batched_left_padded_generation_equals_one_by_one(tok: Any, make: Any) -> None:
    model = make(seed=1)
    for template in ("qa", "none"):
        single = [ev.wild_generate(model, tok, [q], template, max_new_tokens=12, show_progress=False)[0]
                  for q in QUESTIONS]
        for bs in (2, 5):
            assert ev.wild_generate(model, tok, QUESTIONS, template, max_new_tokens=12, batch_size=bs,
                                    show_progress=False) == single
    # and generate() is plain greedy decoding: same tokens as an argmax loop over full forwards
    ids = [ev.prompt_token_ids(tok, q, "none") for q in QUESTIONS]
    raw = ev.generate_from_ids(model, tok, ids, max_new_tokens=8, stop_strings=(), batch_size=5,
                               show_progress=False)
    assert raw == [tok.decode(_manual_greedy(model, i, 8), skip_special_tokens=True).strip() for i in ids]
    assert any(raw)  # a random model does not end at once: the comparison is not vacuous


def _requests() -> list[dict[str, Any]]:
    return [
        {"prompt": "The capital of France is", "target_new": "Paris", "ground_truth": "Lyon",
         "rephrase_prompt": "The French capital city",
         "locality": {"neighborhood": {"prompt": "nq question: water boils at", "ground_truth": "one"}}},
        {"prompt": "A big city", "target_new": "Paris", "ground_truth": "Rome",
         "locality": {"neighborhood": {"prompt": "Who wrote Hamlet?", "ground_truth": "Shakespeare"}}},
    ]


def test_wild_scores_numbers(btok: Any, caplog: pytest.LogCaptureFixture) -> None:
    tok, model = btok, bigram()
    paris, berlin, dot = ids_of(tok, " Paris"), ids_of(tok, " Berlin"), ids_of(tok, ".")
    script(model, [last_id(tok, "The capital of France is"), *paris, *dot])  # reliability 1: "Paris"
    script(model, [last_id(tok, "A big city"), *berlin, *paris, *dot])  # rel 2 and the rephrase: "Berlin Paris"
    script(model, [last_id(tok, "water boils at"), *ids_of(tok, " one"), 0])  # locality 1: "one" (prefix removed)
    assert last_id(tok, "The French capital city") == last_id(tok, "A big city")
    with caplog.at_level(logging.WARNING, logger="crispedit_easyedit.bench.evaluation"):
        out = ev.wild_scores(model, tok, _requests(), show_progress=False)
    assert "no chat template" in caplog.text
    assert out["config"]["templates"] == ["qa", "none"] and out["n_requests"] == 2
    none = out["per_template"]["none"]
    assert none["answers"] == {"reliability": ["Paris", "Berlin Paris"], "generalization": ["Berlin Paris", None],
                               "locality": ["one", ""]}
    assert (none["reliability_em"], none["reliability_contains"]) == (0.5, 1.0)
    assert (none["generalization_em"], none["generalization_contains"], none["n_generalization"]) == (0.0, 1.0, 1)
    assert (none["locality_em"], none["locality_contains"], none["n_locality"]) == (0.5, 0.5, 2)
    qa = out["per_template"]["qa"]  # every qa prompt ends in "A:", which is not scripted: EOS at once
    assert qa["answers"]["reliability"] == ["", ""] and qa["reliability_contains"] == 0.0

    with pytest.raises(ValueError, match="chat template"):
        ev.wild_scores(model, tok, _requests(), templates=("chat",), show_progress=False)
    chat = ev.wild_scores(model, chat_tok(tok), _requests()[:1], include_locality=False, show_progress=False)
    assert chat["config"]["templates"] == ["qa", "none", "chat"] and "locality_em" not in chat["per_template"]["qa"]


def test_locality_unchanged() -> None:
    assert ev.locality_unchanged(["Paris", "Berlin", "x"], ["paris.", "Rome", "x"]) == pytest.approx(2 / 3)
    assert ev.locality_unchanged(["Paris"], ["paris."], normalize=False) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        ev.locality_unchanged(["a"], ["a", "b"])


# ----------------------------------------------------------------------------------------------------------------
# Teacher forcing
# ----------------------------------------------------------------------------------------------------------------
def test_prompt_target_ids_space_rule(tok: Any) -> None:
    p, t = ev.prompt_target_ids(tok, "The capital of France is", "Paris")
    assert p == tok("The capital of France is")["input_ids"] and t == ids_of(tok, " Paris")
    assert ev.prompt_target_ids(tok, "The capital of France is ", "Paris")[1] == ids_of(tok, "Paris")
    assert ev.prompt_target_ids(tok, "The capital of France is", " Paris")[1] == ids_of(tok, " Paris")
    with pytest.raises(ValueError, match="non-empty"):
        ev.prompt_target_ids(tok, "x", "")


def test_teacher_forced_accuracy_known_values(btok: Any) -> None:
    tok, model = btok, bigram()
    prompt, target = "Who is the author of Hamlet?", "William Shakespeare"
    p, t = ev.prompt_target_ids(tok, prompt, target)
    assert len(t) >= 3
    # predictions: after the prompt -> t[0] (right), t[0] -> t[1] (right), everything later -> EOS (wrong)
    script(model, [p[-1], t[0], t[1]])
    (pred, tgt), = ev.teacher_forced_predictions(model, tok, [prompt], [target])
    assert tgt == t and pred == [t[0], t[1]] + [0] * (len(t) - 2)
    acc = ev.teacher_forced_accuracy(model, tok, [prompt, "Unscripted prompt"], [target, "x"])
    assert acc[0] == pytest.approx(2 / len(t)) and acc[1] == 0.0
    assert ev.locality_token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 0], [4, 5]]) == pytest.approx((2 / 3 + 1) / 2)


def test_teacher_forced_scores(btok: Any) -> None:
    tok, model = btok, bigram()
    requests = copy.deepcopy(EE_REQUESTS)
    r0, r1 = requests
    p, t = ev.prompt_target_ids(tok, r0["prompt"], r0["target_new"])  # both prompts of r0 end in "?"
    script(model, [p[-1], t[0]])  # 1 target token of len(t) right after the prompt and after the rephrase
    _, t1 = ev.prompt_target_ids(tok, r1["prompt"], r1["target_new"])
    script(model, [last_id(tok, r1["prompt"]), *t1])  # " Paris" right
    lp, lt = ev.prompt_target_ids(tok, "The capital of Germany is", "Berlin")
    assert lp[-1] == last_id(tok, r1["prompt"])  # the locality prompt also ends in " is": predicts " Paris"
    pre = ev.teacher_forced_scores(model, tok, requests)
    assert pre["rewrite"] == [pytest.approx(1 / len(t)), 1.0]
    assert pre["rewrite_acc"] == pytest.approx((1 / len(t) + 1) / 2)
    assert pre["rephrase"] == [pytest.approx(1 / len(t)), None] and pre["n_rephrase"] == 1
    assert (pre["locality_truth_acc"], pre["n_locality"], pre["locality_acc"]) == (0.0, 2, None)
    assert ev.teacher_forced_scores(model, tok, requests, pre=pre)["locality_acc"] == 1.0
    edited = copy.deepcopy(model)
    script(edited, [last_id(tok, "Water boils at"), 7])  # first locality answer token changes
    n0 = len(pre["locality_predictions"][0])
    post = ev.teacher_forced_scores(edited, tok, requests, pre=pre)
    assert post["locality_acc"] == pytest.approx(((n0 - 1) / n0 + 1) / 2)


def test_teacher_forced_is_batch_independent(tok: Any) -> None:
    model = tiny_llama(seed=2)
    prompts = ["The capital of France is", "Who is the author of Hamlet? It is", "Nile"]
    targets = ["Paris", "William Shakespeare, an English playwright", "Egypt"]
    one = [ev.teacher_forced_predictions(model, tok, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert ev.teacher_forced_predictions(model, tok, prompts, targets, batch_size=3) == one


# ----------------------------------------------------------------------------------------------------------------
# Perplexity and KL
# ----------------------------------------------------------------------------------------------------------------
def _batches(tok: Any, texts: list[str], side: str) -> list[dict[str, torch.Tensor]]:
    seqs = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, seqs)) + 2  # extra pad columns on every row
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl], mask[r, sl] = torch.tensor(s), 1
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


TEXTS = ["The capital of France is Paris.", "Who wrote Hamlet? William Shakespeare wrote it.",
         "Water boils at one hundred degrees.", "The river Nile flows through Egypt"]


def test_perplexity_of_uniform_model_is_vocab_size(tok: Any) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    for side in ("left", "right"):
        assert ev.perplexity(model, _batches(tok, TEXTS, side), show_progress=False) == pytest.approx(V, rel=1e-5)


def test_perplexity_of_known_bigram_and_padding(btok: Any) -> None:
    tok = btok
    torch.manual_seed(0)
    model = bigram()
    with torch.no_grad():
        model.table.copy_(torch.randn(BV, BV))
    logp = torch.log_softmax(model.table.detach().double(), -1)
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    nll = [-float(logp[a, b]) for s in seqs for a, b in zip(s, s[1:])]
    expected = math.exp(sum(nll) / len(nll))
    for side in ("left", "right"):
        assert ev.perplexity(model, _batches(tok, TEXTS, side), show_progress=False) == pytest.approx(expected,
                                                                                                        rel=1e-5)
    with pytest.raises(ValueError, match="consecutive non-pad"):
        ev.perplexity(model, [{"input_ids": torch.ones(2, 3, dtype=torch.long),
                               "attention_mask": torch.tensor([[0, 0, 1], [0, 0, 1]])}], show_progress=False)


def test_perplexity_left_and_right_padding_agree_on_a_transformer(tok: Any) -> None:
    model = tiny_llama(seed=3)
    left = ev.perplexity(model, _batches(tok, TEXTS, "left"), show_progress=False)
    right = ev.perplexity(model, _batches(tok, TEXTS, "right"), show_progress=False)
    assert left == pytest.approx(right, rel=1e-4) and 50 < left < 5 * V


def test_kl_zero_for_same_model_and_positive_when_perturbed(tok: Any) -> None:
    model = tiny_llama(seed=4)
    batches = _batches(tok, TEXTS, "left")
    assert ev.mean_kl(model, model, batches, show_progress=False) == pytest.approx(0.0, abs=1e-7)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        w = perturbed.model.layers[2].mlp.down_proj.weight
        w.add_(0.5 * torch.randn_like(w))
    full = ev.mean_kl(model, perturbed, batches, show_progress=False)
    assert full > 1e-4
    # top-k storage: k = V is exact; a smaller k is a lower bound that is still positive
    assert ev.mean_kl(model, perturbed, batches, top_k=V, show_progress=False) == pytest.approx(full, rel=1e-4)
    k5 = ev.mean_kl(model, perturbed, batches, top_k=5, show_progress=False)
    assert 0 < k5 <= full + 1e-7
    # the reference can be a logits function, and stored once then compared after the reference is gone
    ref = ev.next_token_logprobs(lambda b: model(**b).logits, batches, show_progress=False)
    assert ref.counts == [int(b["attention_mask"].sum()) for b in batches]
    assert ev.kl_to_reference(perturbed, batches, ref, show_progress=False) == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="same batches"):
        ev.kl_to_reference(perturbed, batches[::-1], ref, show_progress=False)
    with pytest.raises(ValueError, match="holds 2"):
        ev.kl_to_reference(perturbed, batches[:1], ref, show_progress=False)


def _bigram_pair(seed: int) -> tuple[BigramLM, BigramLM]:
    """A random bigram LM and a perturbed copy of it (before and after an "edit")."""
    torch.manual_seed(seed)
    before, after = bigram(), bigram()
    with torch.no_grad():
        before.table.copy_(torch.randn(BV, BV))
        after.table.copy_(before.table + 0.3 * torch.randn(BV, BV))
    return before, after


def test_kl_of_known_bigrams(btok: Any) -> None:
    tok = btok
    before, after = _bigram_pair(seed=1)
    batches = _batches(tok, TEXTS, "right")
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=before.table.detach()[tokens].double()),
        torch.distributions.Categorical(logits=after.table.detach()[tokens].double())).mean()
    assert ev.mean_kl(before, after, batches, show_progress=False) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("max_positions", [1, 9, 10_000])
def test_heldout_scores_in_one_pass_equal_the_bigram_oracle_for_any_row_grouping(btok: Any, max_positions: int) -> None:
    """Perplexity, KL and the recorded reference from one pass, whatever the rows per forward: against the exact
    values of two known bigram tables; every forward carries at most ``max_positions`` positions (one row at
    least), which is what bounds the full-vocabulary temporaries."""
    tok = btok
    before, after = _bigram_pair(seed=2)
    batches = _batches(tok, TEXTS, "left")
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    logq = torch.log_softmax(after.table.detach().double(), -1)
    nll = [-float(logq[a, b]) for s in seqs for a, b in zip(s, s[1:])]
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=before.table.detach()[tokens].double()),
        torch.distributions.Categorical(logits=after.table.detach()[tokens].double())).mean()

    reference = ev.heldout_scores(before, batches, record_reference=True, max_positions=max_positions,
                                  show_progress=False).reference
    assert reference.counts == [int(b["attention_mask"].sum()) for b in batches]
    expected_ref = torch.log_softmax(before.table.detach()[tokens], -1)
    torch.testing.assert_close(torch.cat(reference.logprobs), expected_ref, rtol=1e-5, atol=1e-5)
    shapes = []
    hook = after.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                           with_kwargs=True)
    scores = ev.heldout_scores(after, batches, reference=reference, max_positions=max_positions,
                               show_progress=False)
    hook.remove()
    assert scores.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert scores.kl == pytest.approx(float(kl), rel=1e-4)
    width = batches[0]["input_ids"].shape[1]
    assert all(n * t <= max(max_positions, t) for n, t in shapes)
    assert len(shapes) == (len(TEXTS) if max_positions < 2 * width else len(batches))
    top = ev.heldout_scores(before, batches, record_reference=True, top_k=5, max_positions=max_positions,
                            show_progress=False).reference
    full_groups = ev.next_token_logprobs(before, batches, top_k=5, show_progress=False)
    for got, want in zip(top.indices + top.rest_logprob, full_groups.indices + full_groups.rest_logprob):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional)
# ----------------------------------------------------------------------------------------------------------------
def test_lm_eval_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match="pip install lm-eval"):
        ev.lm_eval_scores(tiny_llama(), tiny_tokenizer(), ["arc_challenge"])


# ----------------------------------------------------------------------------------------------------------------
# EasyEdit's own metrics (crispedit_easyedit.easyedit.evaluate)
# ----------------------------------------------------------------------------------------------------------------
def _easyedit_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("easyeditor") is None:
        return False, "easyeditor is not installed"
    from crispedit_easyedit.easyedit.compat import prepare_easyeditor

    try:
        prepare_easyeditor()
    except (ImportError, RuntimeError):
        try:  # e.g. GitHub main beside a torchvision that does not match the CPU torch: stub multimodal modules
            prepare_easyeditor(neutralise_multimodal=True)
        except (ImportError, RuntimeError) as exc:  # the compat shim cannot make it import: skip, naming why
            return False, f"easyeditor does not import here: {type(exc).__name__}: {exc}"
    return True, ""


EE_REQUESTS = [
    {"prompt": "Who is the author of Hamlet?", "target_new": "William Shakespeare", "ground_truth": "Dickens",
     "rephrase_prompt": "Who wrote Hamlet?",
     "locality": {"neighborhood": {"prompt": "Water boils at", "ground_truth": "one hundred degrees"}}},
    {"prompt": "The capital of France is", "target_new": "Paris", "ground_truth": "Lyon",
     "locality": {"neighborhood": {"prompt": "The capital of Germany is", "ground_truth": "Berlin"}}},
]


def test_easyedit_metrics_match_our_teacher_forcing(btok: Any) -> None:
    tok = btok
    ok, reason = _easyedit_importable()
    if not ok:
        pytest.skip(reason)
    from crispedit_easyedit.easyedit.evaluate import easyedit_metrics

    model = bigram()
    r0 = EE_REQUESTS[0]
    p, t = ev.prompt_target_ids(tok, r0["prompt"], r0["target_new"])
    assert p + t == tok(r0["prompt"] + " " + r0["target_new"])["input_ids"]  # EasyEdit joins text: same ids here
    script(model, [p[-1], t[0], t[1]])  # 2 target tokens right
    p1, t1 = ev.prompt_target_ids(tok, EE_REQUESTS[1]["prompt"], "Paris")
    script(model, [p1[-1], *t1])  # all right
    hparams = SimpleNamespace(max_length=40, device=0, alg_name="CrispEdit", model_name="tiny-bigram")

    pre = easyedit_metrics(model, tok, EE_REQUESTS, hparams, show_progress=False)
    ours = ev.teacher_forced_accuracy(model, tok, [r["prompt"] for r in EE_REQUESTS],
                                      [r["target_new"] for r in EE_REQUESTS])
    assert ours == [pytest.approx(2 / len(t)), 1.0]
    assert pre["rewrite_acc"] == pytest.approx(sum(ours) / 2)
    rephrase = ev.teacher_forced_accuracy(model, tok, [r0["rephrase_prompt"]], [r0["target_new"]])[0]
    assert (pre["rephrase_acc"], pre["n_rephrase"]) == (pytest.approx(rephrase), 1)
    assert pre["locality"] == {} and pre["n_requests"] == 2 and pre["generation"] in ("pypi", "github-main")
    assert "neighborhood_output" in pre["per_request"][0]["locality"]

    same = easyedit_metrics(model, tok, EE_REQUESTS, hparams, pre=pre, show_progress=False)
    assert same["locality"] == {"neighborhood": 1.0}
    # change the prediction after "Water boils at": the first locality answer position changes
    q = ev.prompt_target_ids(tok, "Water boils at", "one hundred degrees")
    edited = copy.deepcopy(model)
    script(edited, [q[0][-1], 7])
    post = easyedit_metrics(edited, tok, EE_REQUESTS, hparams, pre=pre, show_progress=False)
    loc_tokens = len(pre["per_request"][0]["locality"]["neighborhood_output"][0])
    assert post["locality"]["neighborhood"] == pytest.approx(((loc_tokens - 1) / loc_tokens + 1.0) / 2)
    with pytest.raises(ValueError, match="same requests"):
        easyedit_metrics(model, tok, EE_REQUESTS[:1], hparams, pre=pre, show_progress=False)
    with pytest.raises(KeyError, match="ground_truth"):
        easyedit_metrics(model, tok, [{"prompt": "a", "target_new": "b"}], hparams, show_progress=False)
