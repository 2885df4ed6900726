"""The memory plan against what CrispEdit allocates at a small scale, and the documented Llama-3 figures."""

from __future__ import annotations

import torch

from crispedit_easyedit.memory import layer_memory, memory_plan
from crispedit_easyedit.optim import ProjectedAdam
from crispedit_easyedit.projector import Eigenbasis, KroneckerProjector


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_the_plan_equals_the_tensors_crispedit_keeps_for_a_layer():
    d_out, d_in = 48, 80
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(d_in, 3 * d_in, generator=g), torch.randn(d_out, 3 * d_out, generator=g)
    A, S = x @ x.T / d_in, y @ y.T / d_out
    basis = Eigenbasis.from_factors(A, S, torch.float32, layer="L")
    projector = KroneckerProjector.from_eigenbasis(basis, 0.8)
    weight = torch.nn.Parameter(torch.randn(d_out, d_in).to(torch.bfloat16))
    optimizer = ProjectedAdam([weight], [projector.project], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    plan = layer_memory(d_out, d_in, torch.bfloat16, torch.float32)
    assert plan["factors"] == _bytes(A, S)
    assert plan["eigenbases"] == _bytes(basis.eig_in, basis.basis_in, basis.eig_out, basis.basis_out)
    assert plan["mask"] == _bytes(projector.mask)
    assert plan["optimizer"] == _bytes(*optimizer.exp_avg, *optimizer.exp_avg_sq, *optimizer.master)
    assert plan["gradient"] == _bytes(weight.grad)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocated(TorchDispatchMode):
        """Bytes of every tensor an op returns during a projection (an upper bound of the live transients)."""

        def __init__(self):
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not t._is_view():
                    self.total += t.numel() * t.element_size()
            return out

    grad = torch.randn(d_out, d_in)
    with Allocated() as seen:
        projector.project(grad)
    assert seen.total <= plan["transient"] + grad.numel() * 4  # the temporaries and the result
    assert plan["transient"] >= 2 * 4 * d_out * d_in


def test_llama3_figures_in_the_readme():
    gib = 2**30
    l8 = memory_plan({f"model.layers.{i}.mlp.down_proj.weight": (4096, 14336) for i in range(19, 24)})
    one = l8["model.layers.19.mlp.down_proj.weight"]
    assert round(one["resident"] / gib, 2) == 2.48 and round(one["transient"] / gib, 2) == 3.06
    assert round(l8["total"]["resident"] / gib, 2) == 12.38 and round(l8["total"]["peak"] / gib, 2) == 15.45
    l70 = memory_plan({f"model.layers.{i}.mlp.down_proj.weight": (8192, 28672) for i in range(5)})
    assert round(l70["total"]["resident"] / gib, 2) == 49.53 and round(l70["total"]["peak"] / gib, 2) == 61.78
