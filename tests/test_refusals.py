"""Every refused call, of every kind, leaves the state bit-identical to an undisturbed twin.

Each scenario builds two states with the same history, makes one bad call on the first and
none on the second, then compares them (slots bit for bit, counters, clock, role maps) and
checks that the next good forecast is the same from both. Run for every method on both
backends. Scenarios a method cannot reach (reuse has no step-dependent coefficient) are
left out of its list, not skipped.
"""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.methods import RawHistory
from helpers import METHOD_IDS, METHODS

SHAPE = (3, 5, 4)
FP32_OVERFLOW = 1e39  # above float32's largest finite value (3.4e38)


def _x(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def one_full(method, opts, backend):
    """One computed step at t = 0."""
    buf = fk.allocate(_x(0), method, **opts)
    fk.update_(buf, _x(0), backend=backend)
    return buf


def ready(method, opts, backend):
    """full, full, skip: every role defined, at t = 0, 0.5, 1.25."""
    buf = one_full(method, opts, backend)
    fk.update_(buf, _x(1), 0.5, backend=backend)
    fk.forecast(buf, 0.75, backend=backend)
    return buf


def in_inference(method, opts, backend):
    """A state allocated and fed under torch.inference_mode (its slots are inference tensors)."""
    with torch.inference_mode():
        return ready(method, opts, backend)


def _out(**kw):
    return torch.empty(SHAPE, **kw)


def _inference_out():
    with torch.inference_mode():
        return torch.empty(SHAPE)


def _strided_grad_out():
    return torch.zeros(SHAPE[::-1], requires_grad=True).permute(2, 1, 0)


STEP_DEPENDENT = [i for i, (m, _) in enumerate(METHODS) if m != "reuse"]
ALL = list(range(len(METHODS)))
# closed forms (methods/history.py) store a full step's value as it is: the step size enters
# only the next forecast's coefficients, so a full step over a tiny gap is accepted and that
# forecast is refused instead
CLOSED = [i for i, (m, o) in enumerate(METHODS) if m != "reuse" and isinstance(fk.make_method(m, **o), RawHistory)]
FULL_STEP_DEPENDENT = [i for i in STEP_DEPENDENT if i not in CLOSED]


def tiny_gap(method, opts, backend):
    """Two computed steps 1e-39 apart (accepted by a closed form)."""
    buf = one_full(method, opts, backend)
    fk.update_(buf, _x(1), 1e-39, backend=backend)
    return buf

# name, history, bad call, exception, message, methods (indices into METHODS)
SCENARIOS = [
    ("out requires grad", ready, lambda b, be: fk.forecast_(b, _out(requires_grad=True), backend=be),
     ValueError, r"out requires grad", ALL),
    ("strided out requires grad", ready, lambda b, be: fk.forecast_(b, _strided_grad_out(), backend=be),
     ValueError, r"out requires grad", ALL),
    ("out is an inference tensor", ready, lambda b, be: fk.forecast_(b, _inference_out(), backend=be),
     RuntimeError, r"out is an inference tensor", ALL),
    ("inference state, update", in_inference, lambda b, be: fk.update_(b, _x(5), backend=be),
     RuntimeError, r"state was allocated under torch.inference_mode", ALL),
    ("inference state, forecast", in_inference, lambda b, be: fk.forecast(b, backend=be),
     RuntimeError, r"state was allocated under torch.inference_mode", ALL),
    ("tiny step, update", ready, lambda b, be: fk.update_(b, _x(5), 1e-17, backend=be),
     ValueError, r"step size h=1e-17 is too small", ALL),
    ("tiny step, forecast", ready, lambda b, be: fk.forecast(b, 1e-17, backend=be),
     ValueError, r"step size h=1e-17 is too small", ALL),
    ("gap overflows", one_full, lambda b, be: fk.update_(b, _x(5), 1e-39, backend=be),
     ValueError, r"h=1e-39 .*coefficient", FULL_STEP_DEPENDENT),
    ("denormal step", one_full, lambda b, be: fk.update_(b, _x(5), 5e-324, backend=be),
     ValueError, r"h=5e-324 .*coefficient", FULL_STEP_DEPENDENT),
    ("gap overflows, closed form", tiny_gap, lambda b, be: fk.forecast(b, 1.0, backend=be),
     ValueError, r"coefficient", CLOSED),
    ("huge step", ready, lambda b, be: fk.forecast(b, FP32_OVERFLOW, backend=be),
     ValueError, r"h=1e\+39 .*coefficient", STEP_DEPENDENT),
    ("astronomic step", ready, lambda b, be: fk.forecast(b, 1e200, backend=be),  # h**2 overflows float64
     ValueError, r"h=1e\+200 gives a forecast coefficient", STEP_DEPENDENT),
    # coefficients that fit float32, but a step 1e10 / 1.25 times the history's span (> 2**20)
    ("step far beyond the history, forecast", ready, lambda b, be: fk.forecast(b, 1e10, backend=be),
     ValueError, r"h=10000000000\.0 is .* times the span of the state's history .*or call reset\(\)", ALL),
    ("step far beyond the history, update", ready, lambda b, be: fk.update_(b, _x(5), 1e10, backend=be),
     ValueError, r"h=10000000000\.0 is .* times the span of the state's history", FULL_STEP_DEPENDENT),
    ("non-finite feature, check_finite", ready,
     lambda b, be: fk.update_(b, _x(5).index_fill_(0, torch.tensor([1]), float("nan")), backend=be, check_finite=True),
     ValueError, r"feature has 20 non-finite", ALL),
    ("unknown backend", ready, lambda b, be: fk.forecast(b, backend="nope"),
     ValueError, r"backend must be one of", ALL),
    ("bad shape", ready, lambda b, be: fk.update_(b, torch.zeros(60), backend=be),
     ValueError, r"feature has shape", ALL),
    ("aliasing out", ready, lambda b, be: fk.forecast_(b, b.slots[0, :60].view(SHAPE), backend=be),
     ValueError, r"out aliases", ALL),
    ("expanded out", ready, lambda b, be: fk.forecast_(b, torch.empty(1).expand(SHAPE), backend=be),
     ValueError, r"overlapping elements", ALL),
    ("bad step", ready, lambda b, be: fk.forecast(b, -1.0, backend=be), ValueError, r"finite and > 0", ALL),
]
CASES = [
    pytest.param(s, mi, id=f"{s[0]}-{METHOD_IDS[mi]}") for s in SCENARIOS for mi in s[5]
]


def assert_twins(a, b):
    assert torch.equal(a.slots, b.slots), "a refused call modified the state's slots"
    for k in ("n_full", "n_skip", "n_steps", "t", "_slot_of", "_time_of", "_memo"):
        assert getattr(a, k) == getattr(b, k), f"a refused call changed {k}"
    assert not a.slots.requires_grad and a.slots.grad_fn is None


@pytest.mark.parametrize("scenario,mi", CASES)
def test_refused_call_leaves_state_as_twin(scenario, mi, backend):
    name, history, bad, exc, match, _ = scenario
    method, opts = METHODS[mi]
    buf, twin = history(method, opts, backend), history(method, opts, backend)
    assert_twins(buf, twin)
    with pytest.raises(exc, match=match):
        bad(buf, backend)
    assert_twins(buf, twin)
    if history is in_inference:
        return  # nothing may be done with these states outside inference_mode
    if not buf.ready:
        fk.update_(buf, _x(6), 0.25, backend=backend)
        fk.update_(twin, _x(6), 0.25, backend=backend)
    if history is tiny_gap:  # the tiny gap must leave the stored history before forecasts work again
        for k in range(buf.method.n_slots):
            fk.update_(buf, _x(7 + k), 0.25, backend=backend)
            fk.update_(twin, _x(7 + k), 0.25, backend=backend)
    assert torch.equal(fk.forecast(buf, 0.5, backend=backend), fk.forecast(twin, 0.5, backend=backend))
    assert_twins(buf, twin)


def test_a_huge_step_is_refused_and_the_state_keeps_working():
    """forecast_(st, out, h=1e30) once moved the clock so far that every later call on the old
    scale was refused until reset(); it is refused itself now, and the state goes on as its twin."""
    x = _x(0)
    st, twin = fk.allocate(x, "foca"), fk.allocate(x, "foca")
    for b in (st, twin):
        fk.update_(b, x)
        fk.update_(b, _x(1))
    with pytest.raises(ValueError, match=r"h=1e\+30 is 1e\+30 times the span of the state's history \(1\.0\)"):
        fk.forecast_(st, torch.empty(SHAPE), h=1e30)
    assert_twins(st, twin)
    for b in (st, twin):
        fk.forecast(b, 1.0)
        fk.update_(b, _x(2), 1.0)
    assert torch.equal(fk.forecast(st, 1.0), fk.forecast(twin, 1.0))
    assert_twins(st, twin)
