"""Per-layer device placement (issue 10): under ``device_map="auto"`` every per-layer object (K-FAC accumulators and
their position masks, factors read from a cache or an edit state, eigenbases, optimizer moments and master weights)
lives on its edited layer's device, inputs go to the embedding's device and labels to the LM head's. On the CPU the
placement is checked with the ``meta`` device standing in for a second device; a real split over two GPUs runs where
two CUDA devices exist."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crispedit_easyedit.curvature import FactorSet, KFACFactors, _FactorAccumulator, input_device, output_device
from crispedit_easyedit.optim import ProjectedAdam
from tests.test_state import NAMES, corpus, make_hparams  # noqa: F401 - corpus is a fixture
from tests.tiny_models import tiny_llama, tiny_tokenizer


def test_inputs_go_to_the_embedding_and_labels_to_the_head():
    model = tiny_llama()
    model.lm_head.to("meta")  # as if the head were on a second device
    assert input_device(model) == torch.device("cpu")
    assert output_device(model) == torch.device("meta")


def test_accumulators_are_created_on_their_layers_device():
    layer = nn.Linear(6, 4, device="meta")
    acc = _FactorAccumulator(layer, torch.float32)
    try:
        assert acc.A.device.type == acc.S.device.type == "meta"
        assert acc.A.shape == (6, 6) and acc.S.shape == (4, 4)
    finally:
        acc.remove()


def test_cached_factors_load_onto_each_layers_device(tmp_path):
    factors = FactorSet({n: KFACFactors(torch.eye(64), torch.eye(32), 10) for i, n in enumerate(NAMES)},
                        {})
    path = factors.save(tmp_path / "f.safetensors")
    loaded = FactorSet.load(path, devices={NAMES[0]: "cpu", NAMES[1]: "meta"})
    assert [loaded[n].A.device.type for n in NAMES] == ["cpu", "meta"]
    assert [loaded[n].S.device.type for n in NAMES] == ["cpu", "meta"]


def test_optimizer_state_lives_with_each_parameter():
    cpu = nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16))
    meta = nn.Parameter(torch.zeros(4, 5, dtype=torch.bfloat16, device="meta"))
    optimizer = ProjectedAdam([cpu, meta], [None, None], lr=1e-3)
    for state in (optimizer.exp_avg, optimizer.exp_avg_sq, optimizer.master):
        assert [t.device.type for t in state] == ["cpu", "meta"]
        assert all(t.dtype == torch.float32 for t in state)  # fp32 moments and master weights for bf16


def test_every_per_layer_tensor_of_an_edit_is_on_its_params_device(corpus):
    """On one device: the eigenbases, projector bases and masks of the state all sit where their weight is."""
    from crispedit_easyedit.editing import apply_crispedit
    from crispedit_easyedit.state import edit_state

    model, tok = tiny_llama(), tiny_tokenizer()
    report = apply_crispedit(model, tok, [{"prompt": "The capital of France is", "target_new": "Rome"}],
                             make_hparams(corpus, num_steps=3), progress=False)
    params = dict(model.named_parameters())
    for curvature in edit_state(model).curvatures.values():
        for name, basis in curvature.eigenbases.items():
            assert basis.basis_in.device == basis.eig_in.device == params[name].device
    for name, projector in report.projectors.items():
        for value in vars(projector).values():
            if isinstance(value, torch.Tensor):
                assert value.device == params[name].device, name


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_an_edit_on_a_model_split_over_two_gpus(corpus):
    from accelerate import dispatch_model

    from crispedit_easyedit.editing import apply_crispedit
    from crispedit_easyedit.state import edit_state

    model, tok = tiny_llama(), tiny_tokenizer()
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    model = dispatch_model(model, device_map=device_map)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in NAMES}
    report = apply_crispedit(model, tok, [{"prompt": "The capital of France is", "target_new": "Rome"}],
                             make_hparams(corpus, device="cuda", num_steps=5), progress=False)
    assert [params[n].device.index for n in NAMES] == [0, 1]
    for name in NAMES:
        assert not torch.equal(params[name], before[name])
        for value in vars(report.projectors[name]).values():
            if isinstance(value, torch.Tensor):
                assert value.device == params[name].device, name
    for curvature in edit_state(model).curvatures.values():
        for name in NAMES:
            assert curvature.factors[name].A.device == params[name].device
            assert curvature.eigenbases[name].basis_in.device == params[name].device
