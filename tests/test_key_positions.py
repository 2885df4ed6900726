"""Edit positions (issue 9): the subject's last token in every training format, the gradient through that position
only (against the outer-product formula of a linear layer's weight gradient), the weight change acting only there
("subject_last_only": its gradient is the loss's own, by finite differences, where "subject_last"'s is not), and bad
input named before any work."""

import copy

import pytest
import torch

from crispedit_easyedit.editing import (
    apply_crispedit, collate, edit_examples, edit_key_positions, edit_loss, edit_targets,
)
from crispedit_easyedit.hparams import CrispEditHyperParams
from crispedit_easyedit.key_positions import edit_only_at, gradient_only_at, subject_last_token
from tests.test_editing import corpus_factors, hparams
from tests.test_train_formats import chat_tok
from tests.tiny_models import tiny_llama, tiny_tokenizer

FACTS = [{"prompt": "The capital of France is", "target_new": "Berlin", "subject": "France"},
         {"prompt": "The river Nile flows through", "target_new": "Hamlet", "subject": "river Nile"},
         {"prompt": "Who wrote Hamlet? The author of Hamlet is", "target_new": "Paris", "subject": "Hamlet"}]


def test_subject_last_token_is_the_token_ending_the_last_occurrence():
    tok = tiny_tokenizer()
    text = "Who wrote Hamlet? The author of Hamlet is"
    index = subject_last_token(tok, text, "hamlet", add_special_tokens=True)  # case folded
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids[: index + 1]) == "Who wrote Hamlet? The author of Hamlet"
    with pytest.raises(ValueError, match="subject 'Paris' does not occur in the prompt"):
        subject_last_token(tok, text, "Paris", add_special_tokens=True)


@pytest.mark.parametrize("fmt", ["raw", "qa", "chat", "Question: {prompt}\nAnswer:"])
def test_key_position_in_every_format_and_after_the_left_cut(fmt):
    tok = chat_tok()
    for max_length in (128, 40):
        hp = hparams(train_formats=[fmt], edit_positions="subject_last", max_length=max_length)
        examples = edit_examples(tok, FACTS, hp)
        positions = edit_key_positions(tok, FACTS, hp, examples)
        for fact, (ids, _), position in zip(FACTS, examples, positions):
            assert tok.decode(ids[: position + 1]).endswith(fact["subject"]), (fmt, max_length)
            assert not tok.decode(ids[: position]).endswith(fact["subject"])
    assert edit_key_positions(tok, FACTS, hparams(), edit_examples(tok, FACTS, hparams())) is None


def test_a_cut_that_removes_the_subject_is_named():
    tok = tiny_tokenizer()
    target_tokens = len(tok(" Berlin", add_special_tokens=False)["input_ids"])
    hp = hparams(edit_positions="subject_last", max_length=target_tokens + 1)  # keeps " is" of the prompt
    with pytest.raises(ValueError, match="request 0: max_length cuts the subject 'France'"):
        edit_key_positions(tok, FACTS[:1], hp, edit_examples(tok, FACTS[:1], hp))


def test_the_gradient_reaches_the_weight_only_through_the_key_positions():
    """For a linear layer y = W x, the weight gradient with the key mask is sum_b delta[b, k_b] x[b, k_b]^T, with
    delta the gradient at the layer's output, which the mask does not change (one hooked layer)."""
    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(layers=[2], edit_positions="subject_last", max_length=64)
    target = edit_targets(model, hp)[0]
    module = model.get_submodule(target.name.rsplit(".", 1)[0])
    examples = edit_examples(tok, FACTS, hp)
    batch = collate(examples, 0, edit_key_positions(tok, FACTS, hp, examples))
    mask = batch.pop("key_mask")
    assert mask.sum(1).tolist() == [1, 1, 1]
    captured = {}

    def capture(mod, inputs, output):
        captured["x"] = inputs[0].detach()
        output.register_hook(lambda grad: captured.__setitem__("delta", grad.detach()))

    handle = module.register_forward_hook(capture)
    edit_loss(model, batch)[0].backward()
    handle.remove()
    full = target.param.grad.clone()
    target.param.grad = None
    with gradient_only_at([module], mask):
        edit_loss(model, batch)[0].backward()
    rows = torch.arange(3)
    keys = mask.float().argmax(1)
    expected = captured["delta"][rows, keys].T @ captured["x"][rows, keys]
    torch.testing.assert_close(target.param.grad, expected, rtol=1e-4, atol=1e-7)
    assert float((full - expected).norm()) > 0.5 * float(full.norm())  # the other positions carried most of it
    torch.testing.assert_close(full, torch.einsum("btd,bte->de", captured["delta"], captured["x"]),
                               rtol=1e-4, atol=1e-7)


def test_a_request_without_its_subject_fails_before_the_weights_change():
    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(edit_positions="subject_last", max_length=64)
    before = copy.deepcopy(model.state_dict())
    bad = FACTS[:2] + [dict(FACTS[2], subject="Denmark")]
    with pytest.raises(ValueError, match="request 2: subject 'Denmark' does not occur"):
        apply_crispedit(model, tok, bad, hp, factors=corpus_factors(model, hp, tok), progress=False)
    missing = [{k: v for k, v in FACTS[0].items() if k != "subject"}]
    with pytest.raises(ValueError, match="needs each request's 'subject'"):
        apply_crispedit(model, tok, missing, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_bad_edit_positions_are_named():
    with pytest.raises(ValueError, match="edit_positions must be one of 'all', 'subject_last', 'subject_last_only'"):
        CrispEditHyperParams(model_name="m", layers=[1], edit_positions="subject")


def _keyed_setup():
    """A float64 tiny model with one edited layer moved away from its starting weights, a keyed batch of FACTS."""
    tok, model = tiny_tokenizer(), tiny_llama().double()
    hp = hparams(layers=[2], edit_positions="subject_last_only", max_length=64)
    target = edit_targets(model, hp)[0]
    module = model.get_submodule(target.name.rsplit(".", 1)[0])
    start = target.param.detach().clone()
    with torch.no_grad():
        target.param.add_(0.5 * start.std() * torch.randn(start.shape, generator=torch.Generator().manual_seed(3),
                                                          dtype=start.dtype))
    examples = edit_examples(tok, FACTS, hp)
    batch = collate(examples, 0, edit_key_positions(tok, FACTS, hp, examples))
    mask = batch.pop("key_mask")
    return model, target, module, start, batch, mask


def test_the_changed_weights_act_only_at_the_key_positions():
    model, target, module, start, batch, mask = _keyed_setup()
    seen = {}

    def capture(mod, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), output.detach()

    with edit_only_at([module], mask, [(start, target.transposed)]):
        handle = module.register_forward_hook(capture)  # runs after edit_only_at's hook, sees its output
        edit_loss(model, batch)
        handle.remove()
    x, y = seen["x"], seen["y"]
    torch.testing.assert_close(y[mask], x[mask] @ target.param.detach().T)
    torch.testing.assert_close(y[~mask], x[~mask] @ start.T)
    change_elsewhere = x[~mask] @ (target.param.detach() - start).T  # what the change would do there
    assert float(change_elsewhere.norm()) > 0.3 * float(y[~mask].norm())


@pytest.mark.parametrize("positions, exact", [("subject_last_only", True), ("subject_last", False)])
def test_only_subject_last_only_trains_the_gradient_of_the_loss_it_computes(positions, exact):
    """Central finite differences of the loss along a random direction against the autograd gradient: equal when the
    change acts only at the keys; "subject_last" (the change acts everywhere, the gradient only at the keys) misses
    what the other positions contribute."""
    model, target, module, start, batch, mask = _keyed_setup()

    def keyed():
        if positions == "subject_last_only":
            return edit_only_at([module], mask, [(start, target.transposed)])
        return gradient_only_at([module], mask)

    def loss():  # edit_loss in float64 throughout (edit_loss's float32 softmax would blur the differences)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])

    target.param.requires_grad_(True)
    with keyed():
        loss().backward()
    grad = target.param.grad.detach().clone()
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(4), dtype=grad.dtype)
    eps = 1e-3
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            target.param.add_(sign * eps * direction)
            with keyed():
                losses.append(float(loss()))
            target.param.sub_(sign * eps * direction)
    numeric = (losses[0] - losses[1]) / (2 * eps)
    analytic = float((grad * direction).sum())
    error = abs(numeric - analytic) / abs(numeric)
    assert (error < 1e-2) if exact else (error > 0.5), (numeric, analytic, error)


def test_a_subject_last_only_edit_keys_every_step_on_the_weights_before_the_call(monkeypatch):
    """Through apply_crispedit: every optimiser step's forward runs under edit_only_at with the edited layers'
    weights as they were before the call (not the moving ones), and only the edit weights change."""
    import crispedit_easyedit.editing as editing

    tok, model = tiny_tokenizer(), tiny_llama()
    hp = hparams(edit_positions="subject_last_only", max_length=64, num_steps=3)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def recording(modules, mask, starting_weights):
        calls.append([weight.clone() for weight, _ in starting_weights])
        return edit_only_at(modules, mask, starting_weights)

    monkeypatch.setattr(editing, "edit_only_at", recording)
    report = apply_crispedit(model, tok, FACTS, hp, factors=corpus_factors(model, hp, tok), progress=False)
    assert len(calls) == report.steps == 3 * 2  # 3 epochs of 2 minibatches (3 edits, train_batch_size 2)
    names = [t.name for t in edit_targets(model, hp)]
    assert all(torch.equal(w, before[n]) for weights in calls for w, n in zip(weights, names, strict=True))
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items() if n not in names)
    assert all(not torch.equal(model.state_dict()[n], before[n]) for n in names)
