"""CUDA-graph mode of the grouped skipped step (StateGroup.cuda_graph): replays give exactly
the eager grouped results, across windows of unequal steps. GPU only; without one, the mode
refuses clearly."""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.group import pack_states_


def _states(device, dtype, n=5, method="foca"):
    shapes = [(2, 17, 24)] * (n - 1) + [(3, 5)]
    return [fk.allocate(torch.empty(s, dtype=dtype, device=device), method) for s in shapes], shapes


def test_cuda_graph_refuses_cpu_states():
    states, shapes = _states("cpu", torch.float32)
    for st, s in zip(states, shapes):
        for _ in range(3):
            fk.update_(st, torch.randn(s), 1.0)
    graphed = fk.StateGroup(states, [torch.empty(s) for s in shapes]).cuda_graph()
    before = [st.slots.clone() for st in states]
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors"):
        graphed(1.0)
    assert all(torch.equal(a, st.slots) for a, st in zip(before, states))
    assert all(st.n_skip == 0 for st in states)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_equal_eager(method, dtype):
    a, shapes = _states("cuda", dtype, method=method)
    b, _ = _states("cuda", dtype, method=method)
    outs_a, outs_b = pack_states_(a), pack_states_(b)
    eager, graphed = fk.StateGroup(a, outs_a), fk.StateGroup(b, outs_b).cuda_graph()
    g = torch.Generator(device="cuda").manual_seed(0)
    for window, hs in enumerate([(1.0, 0.5, 0.7), (0.9, 1.3), (1.1, 0.6, 0.8, 1.2)]):
        for _ in range(3 if window == 0 else 1):
            for x, y, s in zip(a, b, shapes):
                f = torch.randn(s, generator=g, device="cuda").to(dtype)
                fk.update_(x, f, 1.0)
                fk.update_(y, f, 1.0)
        for h in hs:
            eager.forecast_(h)
            graphed(h)
            for p, q in zip(outs_a, outs_b):
                assert torch.equal(p, q)
    assert graphed.replays > 0
