"""Greedy decoding with a KV cache and rows that leave the batch (crispedit_easyedit.generation) against an oracle
of full forwards without cache or padding, and against ``model.generate``."""

import pytest
import torch
from transformers import GenerationConfig

from crispedit_easyedit.generation import greedy_decode, left_pad
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

QUESTIONS = ["What is the capital of Spain?", "Who wrote Faust?", "Where is the river Rhine?",
             "What does a baker make?", "Which planet is red?", "Who painted the Mona Lisa?",
             "The river Nile flows through which country, and how long is the river in total?"]


def argmax_continuation(model, ids, steps, stop_ids):
    """Oracle: one full forward per new token, no cache, no padding."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token in stop_ids:
                break
    return new


class ForwardLog:
    """Records the batch size and the number of new positions of every forward call of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_decode_equals_the_unbatched_argmax_and_stops_after_the_stop_id(make):
    tok, model = tiny_tokenizer(), make(seed=1)
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 3  # the batches are left-padded
    free = [argmax_continuation(model, p, 6, ()) for p in prompts]
    stop = free[0][2]  # a token the first answer produces at its third step
    for batch_size in (1, 3, 7):
        ours = greedy_decode(model, prompts, 6, [stop], pad_id=0, batch_size=batch_size)
        for p, f, o in zip(prompts, free, ours):
            assert o == argmax_continuation(model, p, 6, (stop,)) and o == f[: len(o)]
        assert ours[0][-1] == stop


def test_greedy_decode_equals_model_generate():
    tok, model = tiny_tokenizer(), tiny_llama(seed=2)
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    input_ids, mask = left_pad(prompts, pad_id=0)
    stop = 0  # the tiny model's EOS, which generate() stops at (and pads with afterwards)
    config = GenerationConfig(max_new_tokens=9, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=stop)
    generated = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    expected = []
    for row in generated[:, input_ids.shape[1]:].tolist():
        expected.append(row[: row.index(stop) + 1] if stop in row else row)
    assert any(stop in row for row in expected) and any(len(row) == 9 for row in expected)  # both ends are tested
    assert greedy_decode(model, prompts, 9, stop_ids=[stop], batch_size=4) == expected


def test_a_finished_row_leaves_the_batch_and_the_cache():
    """Each forward after the prefill carries one new token per unfinished row only: the rows whose answer is done
    (stop id, or ``is_finished``) are not computed again."""
    tok, model = tiny_tokenizer(), tiny_llama(seed=1)
    prompts = [tok(q)["input_ids"] for q in QUESTIONS[:4]]
    free = [argmax_continuation(model, p, 8, ()) for p in prompts]
    longest = max(range(4), key=lambda i: len(prompts[i]))
    assert all(free[i][:2] != free[longest][:2] for i in range(4) if i != longest)  # the rows are told apart
    # every row but the longest prompt's finishes after 2 tokens; that one runs the full 8
    log = ForwardLog(model)
    ours = greedy_decode(model, prompts, 8, batch_size=4,
                         is_finished=lambda new: len(new) >= 2 and new != free[longest][: len(new)])
    log.handle.remove()
    assert ours[longest] == free[longest]
    assert all(ours[i] == free[i][:2] for i in range(4) if i != longest)
    width = max(len(p) for p in prompts)
    assert log.shapes[0] == (4, width)  # the prefill
    assert log.shapes[1:] == [(4, 1)] + [(1, 1)] * 6  # after step 2 only one row remains


def test_left_pad_and_bad_input():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        greedy_decode(model, [[1, 2]], 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        greedy_decode(model, [[1, 2]], 3, batch_size=0)
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_decode(model, [[1, 2], []], 3)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_shared_prefix_is_computed_once_and_answers_stay_the_oracles(make):
    """Prompts that share their leading tokens (as a chat template's system prompt): one batch-1 forward over the
    prefix, then the left-padded suffixes; the answers equal the oracle's for every batch size."""
    tok, model = tiny_tokenizer(), make(seed=3)
    head = tok("Please answer the question below, in one line.\nQ:")["input_ids"]
    prompts = [head + tok(" " + q)["input_ids"] for q in QUESTIONS]
    expected = [argmax_continuation(model, p, 7, ()) for p in prompts]
    log = ForwardLog(model)
    assert greedy_decode(model, prompts, 7, batch_size=len(prompts)) == expected
    log.handle.remove()
    width = max(len(p) for p in prompts)
    assert log.shapes[0] == (1, len(head)) and log.shapes[1] == (len(prompts), width - len(head))
    assert greedy_decode(model, prompts, 7, batch_size=3) == expected
    # a batch whose prompts share fewer than MIN_SHARED_PREFIX tokens, or a single prompt, is run whole
    log = ForwardLog(model)
    greedy_decode(model, prompts[:1], 2)
    log.handle.remove()
    assert log.shapes[0] == (1, len(prompts[0]))
