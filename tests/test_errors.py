"""Bad input: every refused call names the problem and leaves the state exactly as it was
(slots bit for bit, counters, clock, role -> slot and role -> time maps). Inputs the API
accepts although they are unusual (non-contiguous tensors, tensor / numpy step sizes) must
give exactly the result of the plain input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import foca_kernels as fk
from foca_kernels.ops import lincomb_

SHAPE = (3, 5, 4)


def snapshot(buf):
    return {
        "slots": buf.slots.clone(),
        "n_full": buf.n_full,
        "n_skip": buf.n_skip,
        "n_steps": buf.n_steps,
        "t": buf.t,
        "slot_of": dict(buf._slot_of),
        "time_of": dict(buf._time_of),
        "ptr": buf.slots.data_ptr(),
    }


def assert_unchanged(buf, snap):
    now = snapshot(buf)
    assert torch.equal(now.pop("slots"), snap["slots"]), "a refused call modified the state's slots"
    for k, v in now.items():
        assert v == snap[k], f"a refused call changed {k}: {snap[k]!r} -> {v!r}"


def ready_state(device, method="foca", backend="torch", dtype=torch.float32, **opts):
    """A state with history: full, full, skip (FoCa's F and F_full then sit in different slots)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g).to(device, dtype)
    buf = fk.allocate(x, method, **opts)
    fk.update_(buf, x, backend=backend)
    fk.update_(buf, x * 0.5 + 1, 0.5, backend=backend)
    fk.forecast(buf, 0.75, backend=backend)
    return buf


def feature_like(buf, **kw):
    x = torch.randn(buf.shape, generator=torch.Generator().manual_seed(2))
    return x.to(**{"dtype": buf.io_dtype, "device": buf.device, **kw})


def out_like(buf, **kw):
    return torch.empty(buf.shape, **{"dtype": buf.io_dtype, "device": buf.device, **kw})


# ---- shape / dtype / device ------------------------------------------------------------
BAD_TENSORS = [
    ("shape", lambda b: torch.zeros(3, 5, 5, dtype=b.io_dtype), ValueError,
     r"has shape \(3, 5, 5\) but the state caches shape \(3, 5, 4\)"),
    ("flat", lambda b: torch.zeros(60, dtype=b.io_dtype), ValueError, r"has shape \(60,\)"),
    ("dtype", lambda b: torch.zeros(SHAPE, dtype=torch.float16), TypeError,
     r"has dtype torch.float16 but the state expects torch.float32"),
    ("float64", lambda b: torch.zeros(SHAPE, dtype=torch.float64), TypeError, r"has dtype torch.float64"),
    ("device", lambda b: torch.zeros(SHAPE, dtype=b.io_dtype, device="meta"), ValueError, r"is on meta.*lives on cpu"),
    ("not a tensor", lambda b: np.zeros(SHAPE, dtype=np.float32), TypeError, r"must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,make,exc,match", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_feature(what, make, exc, match, backend):
    buf = ready_state("cpu", backend=backend)
    snap = snapshot(buf)
    with pytest.raises(exc, match="feature " + match):
        fk.update_(buf, make(buf), 1.0, backend=backend)
    assert_unchanged(buf, snap)


@pytest.mark.parametrize("what,make,exc,match", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_out(what, make, exc, match, backend):
    buf = ready_state("cpu", backend=backend)
    snap = snapshot(buf)
    with pytest.raises(exc, match="out " + match):
        fk.forecast_(buf, make(buf), 1.0, backend=backend)
    assert_unchanged(buf, snap)


def test_feature_dtype_must_be_io_dtype_when_state_is_bf16(backend):
    """dtype= stores the state in bf16; features stay in the example's dtype."""
    buf = ready_state("cpu", backend=backend)
    x = torch.zeros(SHAPE)
    st = fk.allocate(x, dtype=torch.bfloat16)
    fk.update_(st, x, backend=backend)
    snap = snapshot(st)
    with pytest.raises(TypeError, match=r"feature has dtype torch.bfloat16 but the state expects torch.float32"):
        fk.update_(st, x.bfloat16(), backend=backend)
    assert_unchanged(st, snap)
    del buf


def test_state_on_meta_refuses_cpu_tensors():
    """A second device without a GPU: a state allocated on "meta"."""
    buf = fk.allocate(torch.empty(SHAPE, device="meta"))
    snap_t, snap_n = buf.t, buf.n_full
    with pytest.raises(ValueError, match=r"feature is on cpu but the state lives on meta"):
        fk.update_(buf, torch.zeros(SHAPE))
    assert buf.t == snap_t and buf.n_full == snap_n


# ---- non-contiguous inputs: handled exactly ----------------------------------------------
def _noncontiguous_views(buf, base_fn):
    """Tensors of the state's shape with other layouts: transposed, strided slice, permuted."""
    s = buf.shape
    return {
        "transposed": base_fn((s[2], s[1], s[0])).permute(2, 1, 0),
        "sliced": base_fn((s[0], s[1] * 2, s[2]))[:, ::2],
        "offset": base_fn((s[0] + 1,) + tuple(s[1:]))[1:],  # contiguous but at an offset
        "channels_last_like": base_fn((s[0], s[2], s[1])).transpose(1, 2),
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset", "channels_last_like"])
def test_noncontiguous_feature_is_read_correctly(layout, backend):
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    src = feature_like(a)
    views = _noncontiguous_views(a, lambda shp: torch.zeros(shp))
    x = views[layout]
    x.copy_(src)
    assert torch.equal(x, src)
    fk.update_(a, src, 0.5, backend=backend)
    fk.update_(b, x, 0.5, backend=backend)
    assert torch.equal(a.slots, b.slots)
    ya, yb = fk.forecast(a, 1.0, backend=backend), fk.forecast(b, 1.0, backend=backend)
    assert torch.equal(ya, yb)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset", "channels_last_like"])
def test_noncontiguous_out_is_written_correctly(layout, backend):
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    base = torch.full((200,), -7.0)  # guard: elements outside the view must stay untouched
    views = _noncontiguous_views(a, lambda shp: base[: math.prod(shp)].view(shp))
    out = views[layout]
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[torch.as_strided(torch.arange(200), out.shape, out.stride(), out.storage_offset()).flatten()] = False
    ref = fk.forecast(a, 0.5, backend=backend)
    assert fk.forecast_(b, out, 0.5, backend=backend) is out
    assert torch.equal(out, ref)
    assert torch.equal(a.slots, b.slots) and a.n_steps == b.n_steps
    assert (base[untouched] == -7.0).all(), "forecast_ wrote outside out's elements"


@pytest.mark.parametrize("make", [
    lambda buf: torch.empty(1).expand(buf.shape),
    lambda buf: torch.empty(buf.shape[1:]).expand(buf.shape),
    lambda buf: torch.empty(64).as_strided(buf.shape, (1, 1, 1)),
], ids=["expanded-scalar", "broadcast-row", "as_strided-overlap"])
def test_out_with_overlapping_elements_is_refused(make, backend):
    """An out whose elements share memory cannot hold a forecast. It must be refused before
    the launch: the launch rewrites a state slot, so failing afterwards (torch's copy_ into
    an expanded tensor raises) would leave the slots rewritten but the bookkeeping not."""
    buf = ready_state("cpu", backend=backend)
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"out has overlapping elements"):
        fk.forecast_(buf, make(buf), 1.0, backend=backend)
    assert_unchanged(buf, snap)


def test_feature_with_overlapping_elements_is_fine(backend):
    """Reading a broadcast feature is well defined: same result as its materialized copy."""
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    row = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(3))
    fk.update_(a, row.expand(SHAPE), backend=backend)
    fk.update_(b, row.expand(SHAPE).contiguous(), backend=backend)
    assert torch.equal(a.slots, b.slots)


# ---- forecasting too early -------------------------------------------------------------
@pytest.mark.parametrize("method,opts,need", [
    ("foca", {"anchor": "secant"}, 2), ("foca", {"anchor": "bdf2"}, 2),
    ("taylorseer", {"order": 2}, 1), ("reuse", {}, 1),
])
def test_forecast_before_enough_full_steps(method, opts, need, backend):
    x = torch.randn(SHAPE)
    buf = fk.allocate(x, method, **opts)
    for n_seen in range(need):
        snap = snapshot(buf)
        with pytest.raises(RuntimeError, match=rf"needs {need} fully computed step\(s\).*has seen {n_seen}"):
            fk.forecast_(buf, torch.empty(SHAPE), 1.0, backend=backend)
        assert_unchanged(buf, snap)
        with pytest.raises(RuntimeError, match=r"fully computed"):
            fk.forecast(buf, 1.0, backend=backend)
        assert_unchanged(buf, snap)
        fk.update_(buf, x, backend=backend)
    fk.forecast(buf, backend=backend)  # now it may


def test_forecast_after_reset_needs_full_steps_again(backend):
    buf = ready_state("cpu", backend=backend)
    buf.reset()
    snap = snapshot(buf)
    with pytest.raises(RuntimeError, match=r"needs 2 fully computed.*has seen 0"):
        fk.forecast(buf, backend=backend)
    assert_unchanged(buf, snap)


# ---- step sizes --------------------------------------------------------------------------
BAD_STEPS = [
    (0.0, ValueError, r"step size h must be finite and > 0, got 0.0"),
    (-1.0, ValueError, r"step size h must be finite and > 0, got -1.0"),
    (-0.0, ValueError, r"finite and > 0"),
    (float("nan"), ValueError, r"finite and > 0, got nan"),
    (float("inf"), ValueError, r"finite and > 0, got inf"),
    (float("-inf"), ValueError, r"finite and > 0, got -inf"),
    (torch.tensor(-2.0), ValueError, r"finite and > 0, got -2.0"),
    (torch.tensor([1.0, 2.0]), ValueError, r"step size h must be a scalar, got a tensor of shape \(2,\)"),
    ("1.0", TypeError, r"step size h must be a real number, got str"),
    (None, TypeError, r"real number, got NoneType"),
    (True, TypeError, r"real number, got bool"),
    (1 + 0j, TypeError, r"real number, got complex"),
    ([1.0], TypeError, r"real number, got list"),
]


@pytest.mark.parametrize("h,exc,match", BAD_STEPS, ids=[repr(b[0]) for b in BAD_STEPS])
@pytest.mark.parametrize("call", ["update_", "forecast_", "forecast"])
def test_bad_step_size(h, exc, match, call, backend):
    buf = ready_state("cpu", backend=backend)
    snap = snapshot(buf)
    with pytest.raises(exc, match=match):
        if call == "update_":
            fk.update_(buf, feature_like(buf), h, backend=backend)
        elif call == "forecast_":
            fk.forecast_(buf, out_like(buf), h, backend=backend)
        else:
            fk.forecast(buf, h, backend=backend)
    assert_unchanged(buf, snap)


@pytest.mark.parametrize("h", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5]),
                               Fraction(1, 2)], ids=["float", "np32", "np64", "tensor0d", "tensor1", "fraction"])
def test_step_size_types_accepted(h, backend):
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    assert torch.equal(fk.forecast(a, 0.5, backend=backend), fk.forecast(b, h, backend=backend))
    assert a.t == b.t
    x = feature_like(a)
    fk.update_(a, x, 0.5, backend=backend)
    fk.update_(b, x, h, backend=backend)
    assert torch.equal(a.slots, b.slots) and a.t == b.t


def test_integer_step_size_accepted(backend):
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    assert torch.equal(fk.forecast(a, 2, backend=backend), fk.forecast(b, 2.0, backend=backend))


# ---- aliasing the state -------------------------------------------------------------------
def _alias_views(buf):
    n = buf.numel
    return {
        "slot0": buf.slots[0, :n].view(buf.shape),
        "newest role": buf.role(buf.method.roles[0]),
        "second role": buf.role(buf.method.roles[1]),
        "straddling slots": buf.slots.view(-1)[n // 2: n // 2 + n].view(buf.shape),
        "last slot": buf.slots[-1, :n].view(buf.shape),
        "strided over slots": buf.slots.view(-1)[: 2 * n: 2].view(buf.shape),
    }


@pytest.mark.parametrize("alias", ["slot0", "newest role", "second role", "straddling slots", "last slot",
                                   "strided over slots"])
def test_out_aliasing_state_is_refused(alias, backend):
    buf = ready_state("cpu", backend=backend)
    out = _alias_views(buf)[alias]
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"out aliases the state's own storage"):
        fk.forecast_(buf, out, 1.0, backend=backend)
    assert_unchanged(buf, snap)


@pytest.mark.parametrize("alias", ["slot0", "newest role", "straddling slots", "strided over slots"])
def test_feature_aliasing_state_is_refused(alias, backend):
    buf = ready_state("cpu", backend=backend)
    x = _alias_views(buf)[alias]
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"feature aliases the state's own storage"):
        fk.update_(buf, x, 1.0, backend=backend)
    assert_unchanged(buf, snap)


def test_out_next_to_state_is_not_an_alias(backend):
    """Overlap is decided on memory ranges, not on sharing a storage: a slice of a bigger
    tensor right after (or before) the state's range is fine."""
    big = torch.zeros(3, 200)
    a, b = ready_state("cpu", backend=backend), ready_state("cpu", backend=backend)
    out = big[1, :60].view(SHAPE)
    y = fk.forecast(a, 1.0, backend=backend)
    fk.forecast_(b, out, 1.0, backend=backend)
    assert torch.equal(out, y)


def test_op_itself_refuses_aliasing(backend):
    """The custom op checks again (compiled graphs skip the Python-side check)."""
    buf = ready_state("cpu", backend=backend)
    n = buf.numel
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"out aliases the state's own storage"):
        lincomb_(buf.slots, None, buf.slots[1, :n], n, [0], [2], [1.0, 1.0], backend)
    with pytest.raises(ValueError, match=r"feature aliases the state's own storage"):
        lincomb_(buf.slots, buf.slots[0, :n], None, n, [], [2], [1.0], backend)
    assert_unchanged(buf, snap)


# ---- other misuse ----------------------------------------------------------------------
def test_not_a_state():
    x = torch.zeros(SHAPE)
    for call in (lambda: fk.update_(x, x), lambda: fk.forecast_(x, x), lambda: fk.forecast(x)):
        with pytest.raises(TypeError, match=r"buf must be a foca_kernels CacheState"):
            call()


def test_unknown_backend_leaves_state(backend):
    buf = ready_state("cpu", backend=backend)
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'torch'\) or 'auto', got 'cuda'"):
        fk.forecast(buf, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fk.update_(buf, feature_like(buf), backend="tensorrt")
    assert_unchanged(buf, snap)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fk.set_backend("nope")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    buf = ready_state("cpu")
    snap = snapshot(buf)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs the Triton interpreter: set TRITON_INTERPRET=1"):
        fk.forecast(buf, backend="triton")
    assert_unchanged(buf, snap)


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("FOCA_KERNELS_BACKEND", "torch")
    assert fk.get_backend("cpu") == "torch"
    monkeypatch.setenv("FOCA_KERNELS_BACKEND", "bogus")
    buf = ready_state("cpu")
    snap = snapshot(buf)
    with pytest.raises(ValueError, match=r"got 'bogus' \(from FOCA_KERNELS_BACKEND\?\)"):
        fk.forecast(buf)
    assert_unchanged(buf, snap)
    fk.set_backend("torch")  # set_backend beats the environment
    assert fk.get_backend("cpu") == "torch"


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fk.allocate([1.0, 2.0]), TypeError, r"example must be a torch.Tensor, got list"),
    (lambda: fk.allocate(torch.zeros(0, 3)), ValueError, r"cannot cache an empty tensor"),
    (lambda: fk.allocate(torch.zeros(3, dtype=torch.int32)), TypeError, r"dtype must be one of .* got torch.int32"),
    (lambda: fk.allocate(torch.zeros(3, dtype=torch.float64)), TypeError, r"state dtype must be one of"),
    (lambda: fk.allocate(torch.zeros(3), dtype=torch.float64), TypeError, r"state dtype must be one of"),
    (lambda: fk.allocate(torch.zeros(3), "magic"), ValueError, r"unknown method 'magic'"),
    (lambda: fk.allocate(torch.zeros(3), "foca", anchor="bdf3"), ValueError, r"FoCa anchor must be one of"),
    (lambda: fk.allocate(torch.zeros(3), "foca", order=2), TypeError, r"order"),
    (lambda: fk.allocate(torch.zeros(3), "taylorseer", order=0), ValueError, r"order must be 1, 2 or 3, got 0"),
    (lambda: fk.allocate(torch.zeros(3), "taylorseer", order=4), ValueError, r"order must be 1, 2 or 3, got 4"),
    (lambda: fk.allocate(torch.zeros(3), "taylorseer", order=2.0), ValueError, r"order must be 1, 2 or 3, got 2.0"),
    (lambda: fk.allocate(torch.zeros(3), "taylorseer", order=True), TypeError,
     r"order must be an int \(1, 2 or 3\), got bool"),
    (lambda: fk.state_nbytes(torch.zeros(3), "taylorseer", order=False), TypeError,
     r"order must be an int \(1, 2 or 3\), got bool"),
    (lambda: fk.CacheConfig(method="taylorseer", method_options={"order": True}), TypeError, r"order must be an int"),
    (lambda: fk.allocate(torch.zeros(3), "reuse", order=1), TypeError, r"reuse takes no options"),
    (lambda: fk.allocate(torch.zeros(3), fk.FoCa(), anchor="bdf2"), TypeError, r"options given together with a Method"),
], ids=["list", "empty", "int", "fp64", "state-fp64", "method", "anchor", "foca-order", "order0", "order4",
        "order-float", "order-bool", "nbytes-order-bool", "config-order-bool", "reuse-opts", "instance+opts"])
def test_bad_allocate(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
