"""update_ / forecast_ inside torch.compile(fullgraph=True): no graph break, and the same
forecasts, slots and bookkeeping as eager (the fused update is one custom op,
``foca_kernels::lincomb_``, so the compiled graph runs exactly the eager kernel: bitwise).

Each step's coefficients are Python floats computed from the step sizes, so a new step
pattern is a recompile; on CPU a short sequence compiles in a few seconds. The recompile
limit is raised for the length of a test."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import foca_kernels as fk
from helpers import assert_close, ref_roles, smooth_features, times_of
from reference import make_ref

FULL = [True, True, False, False, True, False, True, False, False]
STEPS = [1.0, 0.5, 1.0, 0.75, 1.25, 1.0, 0.6, 0.9, 1.0]  # unequal: every step is a new h


def _fns(backend):
    def step_full(buf, x, h):
        fk.update_(buf, x, h, backend=backend)

    def step_skip(buf, out, h):
        fk.forecast_(buf, out, h, backend=backend)

    return step_full, step_skip


def _run(buf, xs, step_full, step_skip):
    outs = {}
    for i, is_full in enumerate(FULL):
        h = STEPS[i] if i else 1.0
        if is_full:
            step_full(buf, xs[i], h)
        else:
            out = torch.empty(buf.shape, dtype=buf.io_dtype, device=buf.device)
            step_skip(buf, out, h)
            outs[i] = out
    return outs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method,opts,dtype", [
    ("foca", {"anchor": "secant"}, torch.float32),
    ("foca", {"anchor": "bdf2"}, torch.bfloat16),
], ids=["foca-secant-fp32", "foca-bdf2-bf16"])
def test_compiled_sequence_matches_eager(method, opts, dtype, backend, device, gen):
    xs = [x.to(device, dtype) for x in smooth_features((4, 33), times_of(STEPS), gen)]
    eager_full, eager_skip = _fns(backend)
    comp_full = torch.compile(eager_full, fullgraph=True)
    comp_skip = torch.compile(eager_skip, fullgraph=True)

    b_eager = fk.allocate(xs[0], method, **opts)
    b_comp = fk.allocate(xs[0], method, **opts)
    o_eager = _run(b_eager, xs, eager_full, eager_skip)
    o_comp = _run(b_comp, xs, comp_full, comp_skip)

    assert o_eager.keys() == o_comp.keys()
    for i in o_eager:
        assert torch.equal(o_eager[i], o_comp[i]), f"step {i}: compiled forecast differs from eager"
    assert torch.equal(b_eager.slots, b_comp.slots)
    clock = ("t", "n_full", "n_skip", "n_steps")
    assert [getattr(b_comp, a) for a in clock] == [getattr(b_eager, a) for a in clock]
    assert type(b_comp.t) is float, "the clock must stay a Python float, not a symbolic value"
    assert b_comp._slot_of == b_eager._slot_of and b_comp._time_of == b_eager._time_of

    # and both against the float64 reference (fp32: tolerance; bf16 is covered in test_parity)
    if dtype == torch.float32:
        ref = make_ref(method, **opts)
        for i, is_full in enumerate(FULL):
            h = STEPS[i] if i else 1.0
            if is_full:
                ref.full(xs[i].double().cpu(), h)
            else:
                assert_close(o_comp[i], ref.forecast(h), torch.float32, name=f"step {i}")
        for role, exp in ref_roles(ref, b_comp.method).items():
            if exp is not None:
                assert_close(b_comp.role(role), exp, torch.float32, name=role)


def test_compiled_refusals_leave_state_unchanged(backend, device, gen):
    """Inside a compiled function a bad step size still raises with its message (Dynamo
    reports the exception it observed) and nothing is written; so does an out aliasing the
    state, which only the op itself can see while compiled (no data pointers at trace time)."""
    xs = [x.to(device, torch.float32) for x in smooth_features((2, 9), times_of(STEPS), gen)]
    _, eager_skip = _fns(backend)
    comp_skip = torch.compile(eager_skip, fullgraph=True)
    buf = fk.allocate(xs[0])
    fk.update_(buf, xs[0], backend=backend)
    fk.update_(buf, xs[1], 0.5, backend=backend)
    comp_skip(buf, torch.empty_like(xs[0]), 0.75)  # compiles once with a good step
    before = (buf.slots.clone(), buf.t, buf.n_steps, dict(buf._slot_of))

    for bad in (-1.0, float("nan")):
        with pytest.raises(Exception, match=r"step size h must be finite and > 0"):
            comp_skip(buf, torch.empty_like(xs[0]), bad)
    alias = buf.slots[0, : buf.numel].view(buf.shape)
    with pytest.raises(Exception, match=r"out aliases the state's own storage"):
        comp_skip(buf, alias, 0.5)
    assert torch.equal(buf.slots, before[0])
    assert (buf.t, buf.n_steps, buf._slot_of) == before[1:]
