"""FoCa reading "calibrated" (methods/foca_calibrated.py, ops/fit.py): its slope weights are
fitted from the data at every full step, on the device.

Against the float64 reference (reference/foca_calibrated.py): exact on lines for random
schedules and unequal steps, second order on smooth trajectories, every step of the package in
fp32 / fp16 / bf16 against float64 applied to the package's own stored state, whole fp32
sequences, the fit's branches (generic, straight line, parallel directions, clipping, a sum
that is not finite: r7's weights), the bytes each step moves, refusals that leave the state
alone, torch.compile. (A nan/inf feature on every path, grouped and sharded: test_nonfinite.py.)
(Grouped skipped steps: tests/test_group.py; no host sync in a generation: test_hooks_nosync.py.)
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch._dynamo

import foca_kernels as fk
from foca_kernels.methods import FoCaCalibrated
from foca_kernels.methods import foca_calibrated as calibrated_method
from foca_kernels.ops.fit import fit_weights as device_fit, solve
from helpers import DTYPE_IDS, DTYPES, assert_close, interval_schedule, make_steps, smooth_features, times_of
from reference import make_ref
from reference.foca import bdf2_derivative
from reference.foca_calibrated import PHI_RANGE, R7_WEIGHTS, THETA_RANGE, FoCaCalibratedRef, fit_weights

OPTS = {"reading": "calibrated"}


def _run(engine, xs, full, steps, package=None, backend=None):
    """Drive a reference (or, with ``package``, a CacheState) along a schedule: {step: forecast}."""
    outs = {}
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if package is None:
            if is_full:
                engine.full(xs[i], h)
            else:
                outs[i] = engine.forecast(h)
        elif is_full:
            fk.update_(engine, xs[i], h, backend=backend)
        else:
            outs[i] = fk.forecast(engine, h, backend=backend)
    return outs


def _line_case(seed, n):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    full = [i < 2 or rng.random() < 0.3 for i in range(n)]
    steps = [1.0] + [rng.uniform(0.25, 2.0) for _ in range(n - 1)]
    a, b = torch.randn(2, 16, generator=g, dtype=torch.float64)
    return full, steps, [a + b * t for t in times_of(steps)]


def _rel(got, exp):
    return ((got.double() - exp).abs().max() / exp.abs().max().clamp_min(1.0)).item()


# ---- 1. exact on lines ---------------------------------------------------------------------------
def test_reference_is_exact_on_lines():
    """On a line q = g (D1 - A1) is rounding noise and the fit gives phi = 1 (to rounding) or
    takes the slope-only branch; theta multiplies D - A = 0. Measured over 30 schedules of 24
    steps: largest relative error 3.4e-15; asserted <= 1e-10 (test_properties.py's bar)."""
    worst = 0.0
    for seed in range(30):
        full, steps, xs = _line_case(seed, 24)
        for i, y in _run(make_ref("foca", **OPTS), xs, full, steps).items():
            worst = max(worst, _rel(y, xs[i]))
    assert worst <= 1e-10, worst


def test_package_is_exact_on_lines_fp32(backend, device):
    """fp32 kernels on lines: exact up to fp32 rounding of the stored values and the slope
    (measured: largest relative error 5.0e-7 over these schedules, both backends). The bound
    1e-5 is fp32's tolerance here (tests/helpers.py TOL) and 1e4 times below the O(1) error of a
    rule that is not exact on lines (reuse, checked on the same data)."""
    worst = reuse_err = 0.0
    for seed in range(8):
        full, steps, xs = _line_case(200 + seed, 16)
        xs32 = [x.float().to(device) for x in xs]
        outs = _run(fk.allocate(xs32[0], "foca", **OPTS), xs32, full, steps, package=True, backend=backend)
        worst = max([worst] + [_rel(y.cpu(), xs[i]) for i, y in outs.items()])
        outs = _run(fk.allocate(xs32[0], "reuse"), xs32, full, steps, package=True, backend=backend)
        reuse_err = max([reuse_err] + [_rel(y.cpu(), xs[i]) for i, y in outs.items()])
    assert worst <= 1e-5, worst
    assert reuse_err > 1e-2  # the control: the same harness sees an inexact rule


# ---- 2. order of accuracy ------------------------------------------------------------------------
def _traj(t):
    return torch.tensor([math.exp(0.7 * t), math.sin(t + 1.0)], dtype=torch.float64)


def test_second_order_with_periodic_full_steps():
    """Full every 3rd step over 20 steps of size h, so the weights are refitted five times. The
    forecast is a line through X0 with slope phi A + theta (D - A); on a smooth trajectory the
    fit makes phi = 1 + O(h) (the first-order change of the slope is what theta absorbs), so
    the forecast error is O(h^2), as r7's and TaylorSeer's. Measured slope of the log-log fit
    over h = 2^-4 .. 2^-9: 2.03; asserted within 0.25 (test_properties.py's band)."""
    hs = [2.0 ** -k for k in range(4, 10)]
    sched = interval_schedule(20, 3)
    errs = []
    for h in hs:
        ref = FoCaCalibratedRef()
        e = 0.0
        for i, full in enumerate(sched):
            if full:
                ref.full(_traj(i * h), h)
            else:
                e = max(e, (ref.forecast(h) - _traj(i * h)).abs().max().item())
        errs.append(e)
    slope = float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
    assert abs(slope - 2.0) <= 0.25, (slope, errs)


# ---- 3. the package against float64 -------------------------------------------------------------
SHAPES = [(3, 37), (1,), (2, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=["3x37", "1", "2x5x7"])
def test_fp32_sequences_match_float64_reference(shape, backend, device, gen):
    """Random schedules with unequal steps (several refits): every forecast within fp32's
    tolerance of the float64 reference run on the same fp32 features."""
    rng = random.Random(len(shape))
    for trial in range(3):
        n = 22
        full = [i < 2 or rng.random() < 0.35 for i in range(n)]
        steps = make_steps(n, rng)
        xs = [x.float() for x in smooth_features(shape, times_of(steps), gen)]
        got = _run(fk.allocate(xs[0].to(device), "foca", **OPTS), [x.to(device) for x in xs], full, steps,
                   package=True, backend=backend)
        exp = _run(make_ref("foca", **OPTS), [x.double() for x in xs], full, steps)
        assert got.keys() == exp.keys()
        for i in got:
            assert_close(got[i], exp[i], torch.float32, name=f"trial {trial} step {i}")


def _expected_slope(vals, times):
    """Y after a full step, from computed values newest first (float64), by the reference's rule."""
    ref, t_prev = FoCaCalibratedRef(), None
    for x, t in reversed(list(zip(vals, times))):
        ref.full(x, 1.0 if t_prev is None else t - t_prev)
        t_prev = t
    return ref.velocity


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_each_step_matches_float64_on_its_own_state(dtype, backend, device, gen):
    """Every call, judged from the package's own stored state (its rounding is not carried from
    step to step into the comparison): a full step's refitted slope Y against the float64 fit
    over the stored values and the new feature, a skipped step's output against X0 + x Y in
    float64 from the stored X0 and Y. Each is one fp32 evaluation rounded once to ``dtype``:
    the per-dtype tolerance of tests/helpers.py."""
    rng = random.Random(7)
    n = 26
    full = [i < 2 or i % 4 == 0 or rng.random() < 0.15 for i in range(n)]
    steps = make_steps(n, rng)
    ts = times_of(steps)
    xs = [x.to(device, dtype) for x in smooth_features((3, 41), ts, gen)]
    buf = fk.allocate(xs[0], "foca", **OPTS)
    held = []  # (stored value float64, time), newest first
    refits = 0
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            fk.update_(buf, xs[i], h, backend=backend)
            held = [(buf.role("X0").double().cpu(), ts[i])] + held[:3]
            if len(held) >= 2:
                exp = _expected_slope([v for v, _ in held], [t for _, t in held])
                assert_close(buf.role("Y"), exp, dtype, name=f"step {i} slope")
                refits += len(held) == 4
        else:
            out = fk.forecast(buf, h, backend=backend)
            exp = buf.role("X0").double().cpu() + (ts[i] - held[0][1]) * buf.role("Y").double().cpu()
            assert_close(out, exp, dtype, name=f"step {i} forecast")
    assert refits >= 4


def test_r7_weights_until_four_values_then_fitted():
    """With three computed values the slope is r7's (1/2)(A + D); from the fourth on it is the
    fitted one (and on this data differs from r7's)."""
    gen = torch.Generator().manual_seed(1)
    xs = [x.float() for x in smooth_features((4, 9), [0.0, 1.0, 3.0, 5.0], gen)]
    cal, r7 = fk.allocate(xs[0], "foca", **OPTS), fk.allocate(xs[0], "foca", reading="r7")
    for k, (x, h) in enumerate(zip(xs, [1.0, 1.0, 2.0, 2.0])):
        for b in (cal, r7):
            fk.update_(b, x, h, backend="torch")
        if k == 2:
            assert_close(fk.forecast(cal, 1.0, backend="torch"), fk.forecast(r7, 1.0, backend="torch"),
                         torch.float32, name="three values: r7")
            # forecasts do not move either state: the next full step comes 2 after the last one
            cal.t -= 1.0
            r7.t -= 1.0
    diff = (fk.forecast(cal, 1.0, backend="torch") - fk.forecast(r7, 1.0, backend="torch")).abs().max().item()
    assert diff > 1e-3


# ---- 4. the fit --------------------------------------------------------------------------------------
def _fit_cases():
    g = torch.Generator().manual_seed(3)
    u, q, noise = torch.randn(3, 50, generator=g, dtype=torch.float64)
    return {
        "generic": (0.9 * u + 0.3 * q + 0.05 * noise, u, q),  # inside the box: (0.9, 0.3) recovered
        "line": (1.0 * u, u, torch.zeros_like(u)),  # q = 0: phi from u alone, theta 1/2
        "parallel": (2.0 * u, u, 3.0 * u),  # q parallel to u: phi alone, clipped to 1.5
        "still": (torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(u)),  # nothing moved
        "clip-low": (-u - q, u, q),  # both negative: clipped to 0
        "clip-high": (2.0 * u + 3.0 * q, u, q),  # both above the box
    }


@pytest.mark.parametrize("case", list(_fit_cases()))
def test_device_fit_agrees_with_reference(case):
    r, u, q = _fit_cases()[case]
    exp = fit_weights(r, u, q)
    phi, theta = device_fit(r.float(), u.float(), q.float(), PHI_RANGE, THETA_RANGE, R7_WEIGHTS)
    assert phi.dtype == theta.dtype == torch.float64 and phi.dim() == 0
    assert (float(phi), float(theta)) == pytest.approx(exp, abs=1e-5)
    expected = {"generic": (0.9, 0.3), "line": (1.0, 0.5), "parallel": (1.5, 0.5), "still": (0.0, 0.5),
                "clip-low": (0.0, 0.0), "clip-high": (1.5, 1.0)}[case]
    assert exp == pytest.approx(expected, abs=0.02), f"reference gives {exp}"


def test_constants_match_the_reference():
    assert (calibrated_method.PHI_RANGE, calibrated_method.THETA_RANGE) == (PHI_RANGE, THETA_RANGE)
    assert calibrated_method.R7_WEIGHTS == R7_WEIGHTS == (1.0, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_sum_takes_r7_weights(bad):
    """A sum that is not finite (any one of the five, or a bad element in r, u or q of the data):
    exactly r7's (1, 1/2), on the device and in the reference; before, the solve's nan (or, where
    the parallel branch caught it, a clipped value) went into the slope of every element."""
    r, u, q = _fit_cases()["generic"]
    good = device_fit(r, u, q, PHI_RANGE, THETA_RANGE, R7_WEIGHTS)
    assert (float(good[0]), float(good[1])) != R7_WEIGHTS  # the control: a real fit
    sums = torch.stack((u @ u, u @ q, q @ q, r @ u, r @ q))
    for i in range(5):
        s = sums.clone()
        s[i] = bad
        phi, theta = solve(s, PHI_RANGE, THETA_RANGE, R7_WEIGHTS)
        assert (float(phi), float(theta)) == R7_WEIGHTS, f"sum {i}"
    for name, t in (("r", r), ("u", u), ("q", q)):
        t0 = t.clone()
        t[7] = bad
        assert fit_weights(r, u, q) == R7_WEIGHTS, f"reference, {name}"
        phi, theta = device_fit(r, u, q, PHI_RANGE, THETA_RANGE, R7_WEIGHTS)
        assert (float(phi), float(theta)) == R7_WEIGHTS, f"device, {name}"
        t.copy_(t0)


# ---- 5. traffic, refusals, compile ----------------------------------------------------------------
def test_bytes_moved_per_step():
    """A skipped step reads X0 and Y and writes the output (TaylorSeer-2 reads three); a full
    step copies the feature into one slot, plus the fit (over the feature and the old X0..X2)."""
    buf = fk.allocate(torch.zeros(8), "foca", **OPTS)
    assert isinstance(buf.method, FoCaCalibrated) and buf.method.n_slots == 4
    for k in range(4):
        fk.update_(buf, torch.full((8,), float(k * k)), 1.0)
    from foca_kernels.step import plan_step
    skip = plan_step(buf, False, buf.t + 1.0, 1.0)
    assert (len(skip.reads), skip.has_feature, len(skip.writes), skip.has_out) == (2, False, 0, True)
    assert skip.tensors_moved == 3 and skip.fit is None
    full = plan_step(buf, True, buf.t + 1.0, 1.0)
    assert (full.reads, full.has_feature, len(full.writes)) == ((), True, 1)
    assert full.fit is not None and full.fit.slot == full.slot_of["Y"] and full.fit.slot not in full.writes
    # the fit at its two-pass floor: reads feature, X0, X1, X2 (dots), then feature, X0, X1 (slope), writes Y
    assert full.fit.tensors_moved == 8 and full.tensors_moved == 2 + 8


def test_refused_full_step_writes_nothing():
    """A step size whose coefficients overflow fp32 is refused before the fit runs."""
    buf = fk.allocate(torch.zeros(5), "foca", **OPTS)
    for k in range(4):
        fk.update_(buf, torch.full((5,), float(k)) * torch.arange(5.0), 1.0)
    before = (buf.slots.clone(), dict(buf._slot_of), dict(buf._time_of), buf.t, buf.n_full)
    with pytest.raises(ValueError, match="step size h"):
        fk.update_(buf, torch.ones(5), 1e-39)
    assert torch.equal(buf.slots, before[0])
    assert (dict(buf._slot_of), dict(buf._time_of), buf.t, buf.n_full) == before[1:]


def test_compiled_sequence_matches_eager(gen):
    """update_ / forecast_ under torch.compile(fullgraph=True): the fit is plain tensor ops, so
    Dynamo traces it without a graph break; the compiled fit may sum in another order, hence
    fp32's tolerance rather than bitwise equality."""
    torch._dynamo.reset()
    full = [True, True, False, True, False, True, False, False, True, False]
    steps = [1.0, 0.5, 1.0, 0.75, 1.25, 1.0, 0.6, 0.9, 1.0, 0.8]
    xs = [x.float() for x in smooth_features((4, 33), times_of(steps), gen)]

    def step_full(buf, x, h):
        fk.update_(buf, x, h, backend="torch")

    def step_skip(buf, out, h):
        fk.forecast_(buf, out, h, backend="torch")

    outs = []
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        for f_full, f_skip in ((step_full, step_skip),
                               (torch.compile(step_full, fullgraph=True), torch.compile(step_skip, fullgraph=True))):
            buf, got = fk.allocate(xs[0], "foca", **OPTS), {}
            for i, is_full in enumerate(full):
                h = steps[i] if i else 1.0
                if is_full:
                    f_full(buf, xs[i], h)
                else:
                    got[i] = torch.empty(4, 33)
                    f_skip(buf, got[i], h)
            outs.append(got)
    torch._dynamo.reset()
    for i in outs[0]:
        assert_close(outs[1][i], outs[0][i], torch.float32, name=f"step {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on inf
@pytest.mark.parametrize("bad", [None, float("inf")], ids=["finite", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_three_fit_paths_agree(dtype, bad, monkeypatch):
    """The fit has three implementations: the compiled two-pass C loop (CPU, ops/cpu_codegen.py:
    foca_fit), the two Triton kernels (ops/triton_fit.py; here through the interpreter) and plain
    PyTorch ops (the fallback). The first two form r, u, q in fp32, the last in fp64, so they
    agree within the dtype's tolerance; none touches another slot. With an inf in one element of
    the feature all three take r7's weights: the same slope within the tolerance, non-finite in
    that element only, and the float64 slope with r7's weights (the PyTorch ops)."""
    from foca_kernels.ops import cpu_codegen
    from foca_kernels.ops.fit import run_fit
    if cpu_codegen.load() is None:
        pytest.skip(f"compiled CPU code unavailable: {cpu_codegen.status()}")
    gen = torch.Generator().manual_seed(5)
    xs = [x.to(dtype) for x in smooth_features((5, 301), [0.0, 1.0, 2.5, 4.0, 6.0], gen)]
    buf = fk.allocate(xs[0], "foca", **OPTS)
    for x, h in zip(xs[:4], [1.0, 1.0, 1.5, 1.5]):
        fk.update_(buf, x, h)
    from foca_kernels.step import plan_step
    from foca_kernels.ops.fit import flatten
    launch = plan_step(buf, True, buf.t + 2.0, 2.0)
    feature = xs[4].clone()
    if bad is not None:
        feature[2, 17] = bad
    *args, sharded = (buf.numel, feature.reshape(-1), launch.fit.slot, *flatten(launch.fit))
    assert sharded is False
    slots_c, slots_t = buf.slots.clone(), buf.slots.clone()
    assert cpu_codegen.fit_cpu(slots_c, *args, 1e-9)
    slots_g = buf.slots.clone()
    run_fit(slots_g, *args, False, "triton")
    monkeypatch.setenv(cpu_codegen.ENV, "0")
    run_fit(slots_t, *args)
    for name, got in (("compiled C", slots_c), ("Triton", slots_g)):
        assert_close(got[launch.fit.slot, :buf.numel], slots_t[launch.fit.slot, :buf.numel].double(), dtype,
                     name=f"slope, {name} vs PyTorch ops", nonfinite="kind" if bad is None else "position")
    if bad is not None:
        y = slots_t[launch.fit.slot, :buf.numel]
        assert int((~torch.isfinite(y)).sum()) == 1 and not torch.isfinite(y[2 * 301 + 17])
        held = [feature.double()] + [buf.role(r).double() for r in ("X0", "X1")]
        a = (held[0] - held[1]) / 2.0
        d = bdf2_derivative(held[0], held[1], held[2], 2.0, 1.5)
        phi, theta = R7_WEIGHTS
        assert_close(y, (phi * a + theta * (d - a)).reshape(-1), dtype, name="slope with r7's weights",
                     nonfinite="position")
    others = [s for s in range(buf.slots.shape[0]) if s != launch.fit.slot]
    for got in (slots_c, slots_g, slots_t):
        assert torch.equal(got[others], buf.slots[others])
    assert not torch.equal(slots_t[launch.fit.slot], buf.slots[launch.fit.slot])  # the fit did write


def test_options_and_refusals():
    """The default reading is calibrated and takes ``sharded=`` (a bool) only; the closed forms
    take no options; RFC and DuCa keep a closed form (r7) and refuse calibrated as a base."""
    assert isinstance(fk.make_method("foca"), FoCaCalibrated)
    m = fk.make_method("foca", sharded=True)
    assert isinstance(m, FoCaCalibrated) and m.sharded and "sharded" in m.describe()
    with pytest.raises(TypeError, match="sharded must be a bool"):
        fk.make_method("foca", sharded=1)
    with pytest.raises(TypeError, match="takes only sharded="):
        fk.make_method("foca", reading="calibrated", anchor="secant")
    with pytest.raises(TypeError, match="takes no options"):
        fk.make_method("foca", reading="r7", sharded=True)
    assert fk.make_method("rfc").base.reading == "r7"
    with pytest.raises(ValueError, match="closed form"):
        fk.make_method("rfc", base="foca", reading="calibrated")


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_bf16_state_with_fp32_features_fits_on_stored_values(backend_name):
    """``dtype=torch.bfloat16`` with an fp32 model: the fit sees the feature as the state stores
    it (rounded to bf16), so the slope is the float64 rule applied to the stored values alone,
    within bf16's tolerance, on every path."""
    gen = torch.Generator().manual_seed(11)
    ts = [0.0, 1.0, 2.5, 4.0, 5.5, 7.0]
    xs = [x.float() for x in smooth_features((3, 29), ts, gen)]
    buf = fk.allocate(xs[0], "foca", dtype=torch.bfloat16, **OPTS)
    held = []
    for i, x in enumerate(xs):
        fk.update_(buf, x, ts[i] - ts[i - 1] if i else 1.0, backend=backend_name)
        held = [(buf.role("X0").double(), ts[i])] + held[:3]
        if len(held) == 4:
            exp = _expected_slope([v for v, _ in held], [t for _, t in held])
            assert_close(buf.role("Y"), exp, torch.bfloat16, name=f"step {i} slope")
