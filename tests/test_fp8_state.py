"""The fp8 state (foca_kernels/fp8.py): a 16-bit anchor and e4m3 increments with per-row scales.

Against reference/fp8.py (float64, the same scale and rounding rules):
* after every full step the stored e4m3 codes and scales equal the reference's, bit for bit;
* every forecast matches the float64 forecast on the values the state represents: fp32
  outputs within the fp32 tolerance, fp16 / bf16 outputs by the tolerance-free rule against
  storing the exact value in that dtype (with the backend's rounding: tests/helpers.py);
* the grouped steps (StateGroup, update_group_) equal one call per state, bit for bit, and the
  backends store the same codes and scales.
"""

from __future__ import annotations

import random

import pytest
import torch

import foca_kernels as fk
from foca_kernels.ops import cpu_codegen
from foca_kernels.fp8 import FP8_DTYPE, Fp8State, anchor_dtype_for
from helpers import (
    DTYPE_IDS, DTYPES, assert_close, assert_low_precision_rule, make_steps, random_schedule, round_to,
    rounding_mode, smooth_features, study, times_of,
)
from reference import FoCaRestartRef, TaylorSeerRef
from reference.fp8 import Fp8StorageRef, dequantize, quantize

pytestmark = pytest.mark.skipif(FP8_DTYPE is None, reason="torch build without float8_e4m3fn")


def _use_path(name, device, monkeypatch) -> str:
    """Select one implementation: "triton" (interpreted on CPU), "c" (the compiled CPU loop of
    lincomb.c, what the PyTorch backend runs on CPU) or "torch" (the PyTorch ops, the loop
    switched off); returns the backend name to pass."""
    if name == "triton":
        if not fk.backend.triton_installed():
            pytest.skip("triton not installed")
        if device.type == "cpu" and not fk.backend.interpreter_on():
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set before foca_kernels runs a kernel)")
        return "triton"
    if name == "c":
        if device.type != "cpu" or cpu_codegen.load() is None:
            pytest.skip(f"the compiled CPU loop: {cpu_codegen.status()}")
        monkeypatch.delenv(cpu_codegen.ENV, raising=False)
        return "torch"
    monkeypatch.setenv(cpu_codegen.ENV, "0")
    return "torch"


@pytest.fixture(params=["triton", "c", "torch"])
def backend(request, device, monkeypatch):
    """Every implementation of the fp8 steps (this module's own: the C loop is one of them)."""
    return _use_path(request.param, device, monkeypatch)

FP8 = FP8_DTYPE
METHODS = [
    ("taylorseer", {"order": 1}, lambda: TaylorSeerRef(1), 2),
    ("taylorseer", {"order": 2}, lambda: TaylorSeerRef(2), 3),
    ("taylorseer", {"order": 3}, lambda: TaylorSeerRef(3), 4),
    ("foca", {"reading": "r7"}, lambda: FoCaRestartRef("r7"), 3),
    (study("r6"), {}, lambda: FoCaRestartRef("r6"), 3),
]
METHOD_IDS = ["ts1", "ts2", "ts3", "r7", "r6"]
SHAPES = [(3, 7, 37), (1, 129), (5,)]  # odd row lengths and row counts; a 1-D tensor is one row


def _ref(make_base, m, io_dtype, backend, device):
    adt = anchor_dtype_for(io_dtype)
    return Fp8StorageRef(make_base, m, adt, rounding_mode(backend, adt, device) if io_dtype != adt else "rne")


def _check_codes(st: Fp8State, ref: Fp8StorageRef, what: str) -> None:
    for j, (codes, s) in enumerate(ref.codes, start=1):
        r = st.inc_row(j)
        got = st.incs[r, : st.numel].cpu()
        assert torch.equal(got.view(torch.uint8), codes.reshape(-1).view(torch.uint8)), f"{what}: codes of D{j}"
        assert torch.equal(st.scales[r, : st.n_rows].cpu().double(), s), f"{what}: scales of D{j}"


def _check_forecast(out, exp64, io_dtype, backend, device, what):
    if io_dtype == torch.float32:
        assert_close(out, exp64, torch.float32, name=what)
    else:
        stick = round_to(exp64, io_dtype, rounding_mode(backend, io_dtype, device))
        assert_low_precision_rule(out, exp64, {"storage": stick}, name=what)


def run_checked(method, opts, make_base, m, shape, io_dtype, backend, device, full, steps, gen):
    xs64 = smooth_features(shape, times_of(steps), gen)
    xs = [x.to(device, io_dtype) for x in xs64]
    st = fk.allocate(xs[0], method, dtype=FP8, **opts)
    assert isinstance(st, Fp8State)
    ref = _ref(make_base, m, io_dtype, backend, device)
    outs = {}
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            fk.update_(st, xs[i], h, backend=backend)
            ref.full(xs[i].to("cpu", torch.float64), h)
            _check_codes(st, ref, f"step {i}")
        else:
            out = torch.empty(shape, dtype=io_dtype, device=device)
            fk.forecast_(st, out, h, backend=backend)
            _check_forecast(out, ref.forecast(h), io_dtype, backend, device, f"step {i} forecast")
            outs[i] = out
    return st, outs


@pytest.mark.parametrize("io_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mi", range(len(METHODS)), ids=METHOD_IDS)
def test_parity_random_schedule(mi, shape, io_dtype, backend, device, gen):
    """Random full / skipped sequences with unequal steps."""
    method, opts, make_base, m = METHODS[mi]
    rng = random.Random(1000 + mi)
    n = 14
    full = random_schedule(n, 2, rng)
    full[-1] = False
    run_checked(method, opts, make_base, m, shape, io_dtype, backend, device, full, make_steps(n, rng), gen)


@pytest.mark.parametrize("io_dtype", DTYPES, ids=DTYPE_IDS)
def test_parity_interval_schedule(io_dtype, backend, device, gen):
    """The hooks' pattern (compute every 4th step) with the default method, long enough that
    every increment row is rewritten several times."""
    rng = random.Random(7)
    n = 22
    full = [i < 2 or i % 4 == 0 for i in range(n)]
    run_checked("taylorseer", {"order": 2}, lambda: TaylorSeerRef(2), 3, (2, 9, 24), io_dtype, backend, device,
                full, make_steps(n, rng, 0.8, 1.2), gen)


def test_increments_carry_the_fp8_error_not_the_values(gen):
    """Why increments: against the same method on an fp32 state, the fp8 state's forecast is
    about as far off as a bf16 state's (the 16-bit anchor's rounding dominates), and far closer
    than the forecast from the values themselves stored in e4m3 with the same row scales."""
    steps = [1.0] * 8
    xs = [(x + 10.0).float() for x in smooth_features((4, 64), times_of(steps), gen)]
    dtypes = {"fp8": FP8, "bf16": torch.bfloat16, "fp32": None}
    sts = {k: fk.allocate(xs[0], "taylorseer", dtype=d) for k, d in dtypes.items()}
    values_e4m3 = fk.allocate(xs[0], "taylorseer")
    for x in xs[:3]:
        for st in sts.values():
            fk.update_(st, x, backend="torch")
        codes, s = quantize(x.double())
        fk.update_(values_e4m3, dequantize(codes, s).float(), backend="torch")
    exact = fk.forecast(sts["fp32"], 2.0, backend="torch")
    err = {k: (fk.forecast(st, 2.0, backend="torch") - exact).abs().max().item()
           for k, st in sts.items() if k != "fp32"}
    err_values = (fk.forecast(values_e4m3, 2.0, backend="torch") - exact).abs().max().item()
    assert err["fp8"] <= 2 * err["bf16"], err
    assert err["fp8"] < err_values / 4, (err, err_values)


@pytest.mark.parametrize("shape", [(3, 5, 40), (2, 3, 37)], ids=["c40", "c37"])  # C: 8-wide loop, with a tail
@pytest.mark.parametrize("io_dtype", DTYPES, ids=DTYPE_IDS)
def test_backends_store_the_same_bits(io_dtype, shape, device, gen, monkeypatch):
    """Triton, the C loop and the PyTorch ops store the same anchor, codes and scales (a nan
    included); the C loop's forecast is the PyTorch ops' bit for bit, Triton's agrees to the
    tolerance (its compiler may contract a multiply-add, the interpreter truncates to bf16)."""
    steps = [1.0, 0.9, 1.2, 1.0, 0.8]
    xs = [x.to(device, io_dtype) for x in smooth_features(shape, times_of(steps), gen)]
    xs[2][1, 2, 3] = float("nan")
    sts, outs = {}, {}
    for name in ("torch", "c", "triton"):
        try:
            b = _use_path(name, device, monkeypatch)
        except pytest.skip.Exception:
            continue
        if name == "triton" and io_dtype == torch.float32 and rounding_mode("triton", torch.bfloat16, device) != "rne":
            continue  # the interpreter truncates fp32 -> bf16 anchors (tests/helpers.py): other bits by design
        st = sts[name] = fk.allocate(xs[0], "taylorseer", dtype=FP8)
        for x, h in zip(xs[:4], steps):
            fk.update_(st, x, h, backend=b)
        outs[name] = fk.forecast(st, steps[4], backend=b)
    if len(sts) < 2:
        pytest.skip("needs two implementations")
    a = sts.pop("torch")
    for name, t in sts.items():
        assert torch.equal(a.incs.view(torch.uint8), t.incs.view(torch.uint8)), name
        assert torch.equal(a.scales, t.scales), name
        assert torch.equal(a.anchor.view(torch.uint8), t.anchor.view(torch.uint8)), name
        if name == "c":  # the same float32 operations in the same order, rounded to nearest even
            torch.testing.assert_close(outs[name], outs["torch"], rtol=0, atol=0, equal_nan=True)
        else:
            assert_close(outs[name], outs["torch"], io_dtype, name=f"{name} forecast")


def test_nonfinite_element_stays_in_its_place(backend, device, gen):
    """A nan (or inf) in one element is stored as nan there; the rest of its row keeps its
    scale (taken over the finite elements), so every other forecast element stays finite."""
    shape = (2, 4, 16)
    steps = [1.0] * 5
    xs = [x.to(device, torch.float32) for x in smooth_features(shape, times_of(steps), gen)]
    xs[1][0, 2, 5] = float("inf")
    xs[2][1, 3, 7] = float("nan")
    st = fk.allocate(xs[0], "taylorseer", dtype=FP8)
    for x in xs[:3]:
        fk.update_(st, x, backend=backend)
    out = fk.forecast(st, backend=backend)
    bad = ~torch.isfinite(out)
    expect = torch.zeros(shape, dtype=torch.bool, device=device)
    expect[0, 2, 5] = expect[1, 3, 7] = True
    assert torch.equal(bad, expect)


@pytest.mark.parametrize("io_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_steps_equal_single_steps(io_dtype, backend, device, gen):
    """update_group_ and StateGroup.forecast_ over fp8 states of several shapes give exactly
    what update_ / forecast_ give per state."""
    shapes = [(2, 5, 24), (1, 33), (3, 2, 17)]
    steps = [1.0, 0.8, 1.1, 0.9, 1.3, 1.0, 0.7]
    full = [True, True, False, True, False, False, True]
    feats = [[x.to(device, io_dtype) for x in smooth_features(s, times_of(steps), gen)] for s in shapes]
    single = [fk.allocate(f[0], "taylorseer", dtype=FP8) for f in feats]
    grouped = [fk.allocate(f[0], "taylorseer", dtype=FP8) for f in feats]
    outs = fk.pack_states_(grouped)
    for i, (is_full, h) in enumerate(zip(full, steps)):
        if is_full:
            for st, f in zip(single, feats):
                fk.update_(st, f[i], h, backend=backend)
            fk.update_group_(grouped, [f[i] for f in feats], h, backend=backend)
        else:
            want = [fk.forecast(st, h, backend=backend) for st in single]
            got = fk.StateGroup(grouped, outs).forecast_(h, backend=backend)
            for w, g in zip(want, got):
                assert torch.equal(w, g)
        for a, b in zip(single, grouped):
            assert torch.equal(a.slots, b.slots)


def test_nbytes_and_estimate():
    x = torch.zeros(2, 64, 96, dtype=torch.bfloat16)
    st = fk.allocate(x, "taylorseer", dtype=FP8)
    assert st.nbytes == fk.state_nbytes(x, "taylorseer", dtype=FP8)
    bf16 = fk.allocate(x, "taylorseer")
    # anchor (2 bytes) + 2 increments (1 byte each) + scales, against 3 x 2 bytes
    assert st.nbytes < bf16.nbytes * 0.7


@pytest.mark.parametrize("method,opts", [("foca", {}), ("foca", {"reading": "r0"}), (study("r4"), {}),
                                         ("reuse", {})], ids=["calibrated", "r0", "r4", "reuse"])
def test_refused_for_methods_without_increments(method, opts):
    with pytest.raises(ValueError, match="closed-form methods"):
        fk.allocate(torch.zeros(4, 8), method, dtype=FP8, **opts)


def test_refused_for_rfc_and_in_config():
    with pytest.raises(ValueError, match="closed-form methods"):
        fk.allocate(torch.zeros(4, 8), "rfc", dtype=FP8, input=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="closed-form methods"):
        fk.CacheConfig(method="foca", state_dtype=FP8)
    with pytest.raises(ValueError, match="closed-form methods"):
        fk.CacheConfig(method="duca", state_dtype=FP8)
    fk.CacheConfig(state_dtype=FP8)  # the default method is closed-form
    with pytest.raises(TypeError, match="move"):
        fk.allocate(torch.zeros(4, 8), "taylorseer", dtype=FP8).move_to_(torch.zeros(1, 8, dtype=torch.uint8))


def test_role_is_the_represented_value(gen):
    steps = [1.0, 1.0, 1.0]
    xs = [x.float() for x in smooth_features((3, 16), times_of(steps), gen)]
    st = fk.allocate(xs[0], "taylorseer", dtype=FP8)
    ref = Fp8StorageRef(lambda: TaylorSeerRef(2), 3, torch.bfloat16)
    for x in xs:
        fk.update_(st, x, backend="torch")
        ref.full(x.double())
    for j, v in enumerate(ref.values()):
        assert_close(st.role(f"X{j}"), v, torch.float32, name=f"X{j}")
    assert torch.equal(dequantize(*ref.codes[0]).reshape(3, 16), ref.incs[0])


@pytest.mark.parametrize("fused", ["torch", "triton"])
def test_hooks_cache_a_model_in_fp8(fused, device):
    """enable_cache(state_dtype=float8_e4m3fn) on a tiny diffusers DiT: every state is an fp8
    state, steps are forecast, and the samples are about as far from full compute as with the
    bf16 state."""
    if fused == "triton" and (device.type == "cpu" and not fk.backend.interpreter_on()):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    from hooks_tiny import CASES, sample

    case = CASES["dit"]
    model = case.make()
    full = sample(case, model, steps=10)
    outs = {}
    for dt in (FP8, torch.bfloat16):
        fk.enable_cache(model, fk.CacheConfig(interval=3, state_dtype=dt, backend=fused))
        outs[dt] = sample(case, model, steps=10)
        info = fk.cache_info(model)
        states = fk.hooks.cache_states(model)
        assert info.calls_forecast > 0
        assert states and all(isinstance(s, Fp8State) == (dt == FP8) for s in states)
        fk.disable_cache(model)
    assert torch.isfinite(outs[FP8]).all()
    err8, err16 = ((outs[dt] - full).norm().item() for dt in (FP8, torch.bfloat16))
    assert 0 < err16 and err8 <= 2 * err16, (err8, err16)


def test_refused_where_float8_does_not_run(monkeypatch):
    """A device (or torch build) whose float8 conversion fails is named, before any state exists."""
    import foca_kernels.fp8 as fp8

    monkeypatch.setitem(fp8._SUPPORT, "cpu", "RuntimeError: no float8 here")
    with pytest.raises(RuntimeError, match="does not run on cpu tensors.*no float8 here"):
        fk.allocate(torch.zeros(4, 8), "taylorseer", dtype=FP8)


def test_demo_state_dtype_option():
    """demo --state-dtype: the cached runs' CacheConfig gets it; the recording probe (reuse)
    keeps the model's dtype; a name that is no torch dtype is refused."""
    from foca_kernels.demo.harness import HarnessConfig

    cfg = HarnessConfig(methods=["taylorseer2"], intervals=[3], samples=2, state_dtype="float8_e4m3fn")
    assert cfg.cache_config("taylorseer2", 3).state_dtype == FP8
    assert cfg.cache_config("reuse", 2, stored=False).state_dtype is None
    with pytest.raises(ValueError, match="closed-form methods"):
        cfg.cache_config("foca-calibrated", 3)
    with pytest.raises(ValueError, match="state_dtype must name a torch dtype"):
        HarnessConfig(methods=["taylorseer2"], intervals=[3], samples=2, state_dtype="float9")


def test_non_contiguous_out(backend, device, gen):
    """forecast_ and StateGroup.forecast_ write a strided out exactly as a contiguous one."""
    steps = [1.0, 1.0, 1.0, 1.0]
    xs = [x.to(device, torch.float32) for x in smooth_features((6, 10), times_of(steps), gen)]
    sts = [fk.allocate(xs[0], "taylorseer", dtype=FP8) for _ in range(2)]
    for st in sts:
        for x in xs[:3]:
            fk.update_(st, x, backend=backend)
    want = fk.forecast(sts[0], backend=backend)
    strided = torch.empty(10, 6, device=device).t()
    fk.forecast_(sts[1], strided, backend=backend)
    assert torch.equal(strided, want)
    sts = [fk.allocate(xs[0], "taylorseer", dtype=FP8) for _ in range(2)]
    for x in xs[:3]:
        fk.update_group_(sts, [x, x], backend=backend)
    outs = [torch.empty(10, 6, device=device).t(), torch.empty(6, 10, device=device)]
    fk.StateGroup(sts, outs).forecast_(backend=backend)
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)
