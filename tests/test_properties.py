"""Properties of the rules themselves, checked on the package and on the reference.

"The package in float64": the package stores states in fp32/fp16/bf16 only, so to test its
*math* (each method's step-size-dependent coefficients, and CacheState's slot planning)
without fp32 rounding, ``Shadow64`` runs the very launches ``CacheState.plan`` emits on a
float64 copy of the slots and then commits them to the CacheState's bookkeeping. The kernels
are checked in fp32 as well, with tolerances stated where used.

What was measured before the assertions were written is recorded next to each test.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import foca_kernels as fk
from foca_kernels.methods import FEATURE  # noqa: F401  (documents the column convention)
from helpers import assert_close, foca_reading, interval_schedule, make_ref, run_kernel, run_ref, study, times_of

EXACT_METHODS = [
    ("foca", {"anchor": "secant"}), ("foca", {"anchor": "bdf2"}),
    ("foca", {"reading": "r3"}), (study("r4"), {}), (study("r6"), {}), ("foca", {"reading": "r7"}),
    ("taylorseer", {"order": 1}), ("taylorseer", {"order": 2}), ("taylorseer", {"order": 3}),
]
EXACT_IDS = ["foca-secant", "foca-bdf2", "foca-r3", "foca-r4", "foca-r6", "foca-r7",
             "taylorseer-1", "taylorseer-2", "taylorseer-3"]


U32 = 2.0 ** -24  # fp32 unit roundoff


class Shadow64:
    """Apply the package's own launches (coefficients and slot plan) in float64.

    With ``bound=True`` it also carries, per slot, a first-order bound on the error an fp32
    execution of the same launches can have (the kernels' arithmetic): a row
    y = sum_i c_i v_i over k inputs, each coefficient rounded to fp32, each product and each
    partial sum rounded, has error <= sum_i |c_i| E_i + (2k + 1) u sum_i |c_i v_i|, with E_i the
    inputs' own error bounds (a feature's: how far its fp32 copy is from the exact value)."""

    def __init__(self, method, shape=(1,), bound=False, **opts):
        self.buf = fk.allocate(torch.zeros(shape), method, **opts)  # bookkeeping only
        self.slots = torch.zeros(self.buf.slots.shape, dtype=torch.float64)
        self.err = torch.zeros_like(self.slots) if bound else None
        self.n = self.buf.numel
        self.out_err = None

    def _apply(self, full, x, h, x_err=None):
        buf = self.buf
        t_new = 0.0 if buf.t is None else buf.t + h
        tr = buf.method.full(buf.context(t_new)) if full else buf.method.skip(buf.context(t_new))
        launch = buf.plan(tr, t_new)
        ins = [self.slots[r, : self.n].clone() for r in launch.reads]
        errs = [self.err[r, : self.n].clone() for r in launch.reads] if self.err is not None else None
        if launch.has_feature:
            ins.append(x.reshape(-1).to(torch.float64))
            if errs is not None:
                errs.append(torch.zeros(self.n, dtype=torch.float64) if x_err is None else x_err.reshape(-1))
        k = len(ins)
        n_rows = len(launch.writes) + int(launch.has_out)
        rows, bounds = [], []
        for j in range(n_rows):
            cs = launch.coef[j * k:(j + 1) * k]
            rows.append(sum(c * v for c, v in zip(cs, ins)))
            if errs is not None:
                terms = [(c, v, e) for c, v, e in zip(cs, ins, errs) if c != 0.0]
                bounds.append(sum(abs(c) * e for c, _, e in terms)
                              + (2 * len(terms) + 1) * U32 * sum(abs(c) * v.abs() for c, v, _ in terms))
        for j, w in enumerate(launch.writes):
            self.slots[w, : self.n] = rows[j]
            if errs is not None:
                self.err[w, : self.n] = bounds[j]
        buf.commit(launch, t_new, full)
        if launch.has_out:
            self.out_err = bounds[-1].view(buf.shape) if errs is not None else None
            return rows[-1].view(buf.shape)
        return None

    def full(self, x, h=1.0, x_err=None):
        self._apply(True, x, h, x_err)

    def forecast(self, h=1.0):
        if not self.buf.ready:
            raise RuntimeError("not ready")
        return self._apply(False, None, h)


class CacheDitRule:
    """cache-dit's published FoCa skip rule (cache_dit/caching/cache_contexts/calibrators/
    foca.py, per docs/method.md and the project notes): state F_k, F_km1, F_full, F_full_prev;
    skip e steps after the last full compute: F_full + (e/2)((F_full - F_full_prev) + (F_k - F_km1)),
    with no division by the distance between the two full computes; the forecast becomes F_k.
    (Its blend back towards F_full for e > 3 is not needed here and not implemented.)"""

    def __init__(self):
        self.f_k = self.f_km1 = self.full_v = self.full_prev = None
        self.e = 0

    def full(self, x, h=1.0):
        self.f_km1, self.f_k = self.f_k, x
        self.full_prev, self.full_v = self.full_v, x
        self.e = 0

    def forecast(self, h=1.0):
        self.e += 1
        if self.e > 3:
            raise NotImplementedError("cache-dit blends towards F_full for e > 3")
        out = self.full_v + (self.e / 2) * ((self.full_v - self.full_prev) + (self.f_k - self.f_km1))
        self.f_km1, self.f_k = self.f_k, out
        return out


def newton_forecaster():
    """Control for the order test: quadratic Newton backward extrapolation through the last
    three full computes (third order), to show the harness does see an h^3 method."""
    class Newton:
        def __init__(self):
            self.pts = []
            self.t = None

        def full(self, x, h=1.0):
            self.t = 0.0 if self.t is None else self.t + h
            self.pts = (self.pts + [(self.t, x)])[-3:]

        def forecast(self, h=1.0):
            self.t += h
            (t0, y0), (t1, y1), (t2, y2) = self.pts
            t = self.t
            l0 = (t - t1) * (t - t2) / ((t0 - t1) * (t0 - t2))
            l1 = (t - t0) * (t - t2) / ((t1 - t0) * (t1 - t2))
            l2 = (t - t0) * (t - t1) / ((t2 - t0) * (t2 - t1))
            return l0 * y0 + l1 * y1 + l2 * y2
    return Newton()


def _rel_err(got, exp):
    return ((got.double() - exp).abs().max() / exp.abs().max().clamp_min(1.0)).item()


# =====================================================================================
# 1. exact on straight lines, for every schedule
# =====================================================================================
def _line_case(seed, n, warmup=2):
    """Random full/skip pattern (after ``warmup`` full steps), random step ratios up to 1:8 and
    a random straight line per element (float64)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    full = [i < warmup or rng.random() < 0.3 for i in range(n)]
    steps = [1.0] + [rng.uniform(0.25, 2.0) for _ in range(n - 1)]
    a, b = torch.randn(2, 16, generator=g, dtype=torch.float64)
    xs = [a + b * t for t in times_of(steps)]
    return full, steps, xs


# Measured (30 random schedules of 24 steps each, float64): largest relative error of the
# reference 2.4e-13 (bdf2 anchor: it amplifies rounding, see test_bdf2_anchor_is_unstable),
# 2.9e-15 for the secant anchor, 0 for TaylorSeer; an inexact rule errs by O(1) on the same
# lines (reuse, cache-dit's rule, TaylorSeer forecasting from a single full compute).
# "Exact" is asserted as relative error <= 1e-10: six orders of magnitude from both.
LINE_TOL64 = 1e-10


@pytest.mark.parametrize("method,opts", EXACT_METHODS, ids=EXACT_IDS)
def test_exact_on_straight_lines_float64(method, opts):
    """Both FoCa anchors are exact slopes of a line and the skip rule is the trapezoid rule
    with exact slopes; TaylorSeer's divided differences of a line are its slope and zeros.
    Checked for the package's own coefficients (Shadow64) and for the reference."""
    for seed in range(30):
        full, steps, xs = _line_case(seed, 24)
        for engine in (Shadow64(method, (16,), **opts), make_ref(method, **opts)):
            outs = run_ref(engine, xs, full, steps)
            for i, y in outs.items():
                err = _rel_err(y, xs[i])
                assert err <= LINE_TOL64, f"{type(engine).__name__} seed {seed} step {i}: rel err {err:.3g}"


def test_inexact_rules_are_not_exact_on_lines():
    """The control for the test above: the same harness sees an O(1) error from rules that
    are not exact on lines."""
    full, steps, xs = _line_case(0, 24)
    assert max(_rel_err(y, xs[i]) for i, y in run_ref(make_ref("reuse"), xs, full, steps).items()) > 1e-2
    # TaylorSeer with one full compute before forecasting truncates to D0: a constant
    one_full = [True] + [False] * 4
    outs = run_ref(make_ref("taylorseer", order=2), xs, one_full, steps)
    assert max(_rel_err(y, xs[i]) for i, y in outs.items()) > 1e-2
    # cache-dit's rule whenever two full computes are not adjacent (see the dedicated test)
    sched = [True, True, False, False, True, False, False]
    outs = run_ref(CacheDitRule(), xs, sched, [1.0] * 7)
    assert max(_rel_err(y, xs[i]) for i, y in outs.items()) > 1e-2


@pytest.mark.parametrize("method,opts", EXACT_METHODS, ids=EXACT_IDS)
def test_exact_on_straight_lines_kernels(method, opts, backend):
    """The fused kernels in fp32 on lines with random schedules (14 steps, step ratios up to
    1:8): exact up to rounding, where "rounding" is the first-order bound on what fp32
    execution of these very launches can cost (Shadow64's bound: input rounding of the
    features plus every coefficient, product and sum rounding, propagated through the
    recursion). A fixed relative tolerance would not do: rounding is amplified by the methods
    themselves, differently per schedule. TaylorSeer-3 divides rounding errors by g^3 and its
    forecast multiplies them by x^3/6, so with short gaps and long horizons (x/g)^3 is large:
    measured over 40 such schedules, 2.9e-4 relative error on a line for TaylorSeer-3 (plain
    torch fp32 ops on the reference: 1.9e-4), 1.2e-5 TaylorSeer-2, 4e-6 bdf2 (which amplifies
    rounding window after window), 1e-6 FoCa secant; every error within 22% of its bound."""
    for seed in range(5):
        full, steps, xs = _line_case(100 + seed, 14)
        xs32 = [x.float() for x in xs]
        outs = run_kernel(fk.allocate(xs32[0], method, **opts), xs32, full, steps, backend)
        shadow = Shadow64(method, (16,), bound=True, **opts)
        for i, is_full in enumerate(full):
            h = steps[i] if i else 1.0
            if is_full:
                shadow.full(xs[i], h, x_err=(xs32[i].double() - xs[i]).abs())
                continue
            y = shadow.forecast(h)
            assert (y - xs[i]).abs().max() <= 1e-10 * xs[i].abs().max(), "the float64 math must be exact"
            err = (outs[i].double() - xs[i]).abs()
            bound = shadow.out_err + 1e-12  # second-order terms (u^2) and y's own 1e-13 deviation
            bad = err > bound
            assert not bad.any(), (
                f"seed {seed} step {i}: fp32 error {err.max().item():.3g} exceeds its rounding bound "
                f"at {torch.nonzero(bad)[:3].tolist()} (bound there {bound[bad][:3].tolist()})")


# =====================================================================================
# 2. order of accuracy
# =====================================================================================
def _order_errors(engine_factory, warmup, n_skip, hs, ratios, f):
    """Max forecast error of a fixed pattern (``warmup`` full steps then ``n_skip``
    forecasts, step i of size h * ratios[i]) for each h."""
    errs = []
    for h in hs:
        eng = engine_factory()
        steps = [1.0] + [h * r for r in ratios[1:warmup + n_skip]]
        ts = [0.0]
        for s in steps[1:]:
            ts.append(ts[-1] + s)
        for i in range(warmup):
            eng.full(f(ts[i]), steps[i] if i else 1.0)
        e = 0.0
        for i in range(warmup, warmup + n_skip):
            y = eng.forecast(steps[i])
            e = max(e, (y.double() - f(ts[i]).double()).abs().max().item())
        errs.append(e)
    return errs


def _slope(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def _traj(t):  # two smooth components with O(1), non-vanishing derivatives near t = 0
    return torch.tensor([math.exp(0.7 * t), math.sin(t + 1.0)], dtype=torch.float64)


RATIOS = [1.0, 1.0, 0.6, 1.3, 1.0, 0.8, 1.4, 0.7, 1.1]  # fixed pattern of unequal steps

# (name, factory, warm-up fulls, expected order p). Measured slopes of the log-log fit over
# h = 2^-4 .. 2^-9 (float64, 1 and 3 forecasts): FoCa secant 2.01/2.02, bdf2 2.02/2.02,
# TaylorSeer-1 2.01/2.02, TaylorSeer-2 2.09/1.87, TaylorSeer-3 2.03/2.02, reuse 1.01/1.02,
# Newton control 2.96/2.95.
#
# TaylorSeer of order 2 (and 3) is second order, not third: its factors are *backward*
# divided differences, D1 = (F_k - F_{k-1})/g = F'(t_k) - (g/2) F'' + ..., and the forecast
# F_k + D1 x + D2 x^2/2 misses x (g/2) F'' = O(h^2). (Newton's form adds x(x+g)/2 instead of
# x^2/2 and is third order: the control.) This is the method as its authors and diffusers
# define it; the package and the reference agree on it.
ORDER_CASES = [
    ("foca-secant", lambda: Shadow64("foca", (2,), anchor="secant"), 2, 2),
    ("foca-bdf2", lambda: Shadow64("foca", (2,), anchor="bdf2"), 3, 2),
    ("taylorseer-1", lambda: Shadow64("taylorseer", (2,), order=1), 2, 2),
    ("taylorseer-2", lambda: Shadow64("taylorseer", (2,), order=2), 3, 2),
    ("taylorseer-3", lambda: Shadow64("taylorseer", (2,), order=3), 4, 2),
    ("reuse", lambda: Shadow64("reuse", (2,)), 1, 1),
    ("foca-r3", lambda: Shadow64("foca", (2,), reading="r3"), 3, 2),
    ("foca-r4", lambda: Shadow64(study("r4"), (2,)), 2, 2),
    ("foca-r6", lambda: Shadow64(study("r6"), (2,)), 3, 2),
    ("foca-r7", lambda: Shadow64("foca", (2,), reading="r7"), 2, 2),  # a line per window: TaylorSeer-1's order
    ("ref-foca-r7", lambda: make_ref("foca", reading="r7"), 2, 2),
    ("ref-foca-secant", lambda: make_ref("foca", anchor="secant"), 2, 2),
    ("ref-foca-r3", lambda: make_ref("foca", reading="r3"), 3, 2),
    ("ref-taylorseer-2", lambda: make_ref("taylorseer", order=2), 3, 2),
    ("newton-control", newton_forecaster, 3, 3),
]
# Band: the error is C h^p (1 + O(h)), so the local slope is p + O(h); at h <= 1/16 on these
# trajectories all measured fits are within 0.13 of p. +-0.25 keeps orders p and p+-1 apart.
ORDER_BAND = 0.25


@pytest.mark.parametrize("name,factory,warmup,p", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
@pytest.mark.parametrize("n_skip", [1, 3])
def test_order_of_accuracy(name, factory, warmup, p, n_skip):
    hs = [2.0 ** -k for k in range(4, 10)]
    errs = _order_errors(factory, warmup, n_skip, hs, RATIOS, _traj)
    s = _slope(hs, errs)
    assert abs(s - p) <= ORDER_BAND, f"{name}: error ~ h^{s:.3f}, expected h^{p} (errors {errs})"


def test_order_of_accuracy_periodic_schedule_foca():
    """FoCa secant with full computes every 3rd step (forecasts recurse across full steps):
    still second order. Measured slope 2.03."""
    hs = [2.0 ** -k for k in range(4, 10)]
    sched = interval_schedule(14, 3)
    errs = []
    for h in hs:
        eng = Shadow64("foca", (2,))
        ts = [i * h for i in range(14)]
        e = 0.0
        for i, full in enumerate(sched):
            if full:
                eng.full(_traj(ts[i]), h)
            else:
                e = max(e, (eng.forecast(h) - _traj(ts[i])).abs().max().item())
        errs.append(e)
    assert abs(_slope(hs, errs) - 2) <= ORDER_BAND


@pytest.mark.parametrize("method,opts,warmup,p", [
    ("foca", {"anchor": "secant"}, 2, 2), ("taylorseer", {"order": 1}, 2, 2), ("reuse", {}, 1, 1),
], ids=["foca-secant", "taylorseer-1", "reuse"])
def test_order_of_accuracy_kernels(method, opts, warmup, p, backend):
    """The same on the fused kernels in fp32, over h = 2^-2 .. 2^-6 where the smallest error
    (~1e-3) is still far above fp32 rounding (~1e-7). Measured: 2.05 FoCa, 2.05 TS-1 (the same
    forecasts after adjacent full computes), 1.09 reuse, on both backends."""
    hs = [2.0 ** -k for k in range(2, 7)]

    def factory():
        class K:
            def __init__(self):
                self.buf = fk.allocate(torch.zeros(2), method, **opts)

            def full(self, x, h=1.0):
                fk.update_(self.buf, x.float(), h, backend=backend)

            def forecast(self, h=1.0):
                return fk.forecast(self.buf, h, backend=backend)
        return K()

    errs = _order_errors(factory, warmup, 3, hs, RATIOS, _traj)
    s = _slope(hs, errs)
    assert abs(s - p) <= ORDER_BAND, f"error ~ h^{s:.3f}, expected h^{p} (errors {errs})"


# =====================================================================================
# 3. stability on y' = lambda y (the paper's Proposition 1)
# =====================================================================================
def _decay_errors(method, opts, lam, h, n_full, K, engine="shadow"):
    f = lambda t: torch.tensor([math.exp(lam * t)], dtype=torch.float64)  # noqa: E731
    eng = Shadow64(method, (1,), **opts) if engine == "shadow" else make_ref(method, **opts)
    for i in range(n_full):
        eng.full(f(i * h), h)
    return np.array([abs(eng.forecast(h).item() - f((n_full - 1 + k) * h).item()) for k in range(1, K + 1)])


# Measured with 4 adjacent full computes (TaylorSeer-3 needs 4) then K = 60 forecasts (float64):
#   lambda -2, h 0.1:            k = 1      10     30     60     growth exponent, k = 30..60
#       FoCa (= TaylorSeer-1)      0.022  0.74   3.1    6.7    1.12
#       TaylorSeer-2               0.0086 0.61   9.0    42     2.20   (below FoCa until k = 11)
#       TaylorSeer-3               0.0096 0.39   18     173    3.27
#       reuse                      0.10   0.48   0.55   0.55   0      (bounded by y(t_last) = 0.55)
#   lambda -1, h 0.25: exponents 1.09 / 2.16 / 3.22, TaylorSeer-2 above FoCa from k = 10 on;
#   lambda -4, h 0.25: 1.01 / 2.03 / 3.04, from k = 2 on;
#   lambda -0.5, h 0.1 (not asserted): FoCa's curve is still convex at k = 60 (exponent 1.47,
#   the solution's own decay dominates) and TaylorSeer-2 only overtakes it at k = 51.
# So on this problem FoCa's error is NOT bounded in k as the paper's Proposition 1 states:
# the forecast keeps moving along the anchor slope while the solution decays; it grows at
# most linearly, with slope h |lambda| y at most (proved below). Taylor of order m >= 2 grows
# like k^m and overtakes FoCa; reuse is the one bounded method here.
STAB_CASES = [(-2.0, 0.1, 12), (-1.0, 0.25, 10), (-4.0, 0.25, 2)]
N_FULL = 4
R0 = {"reading": "r0"}  # the numbers above are reading r0's (the first default)


@pytest.mark.parametrize("lam,h,k_star", STAB_CASES, ids=[f"lam{c[0]}-h{c[1]}" for c in STAB_CASES])
def test_stability_on_decay(lam, h, k_star):
    K = 60
    ks = np.arange(1, K + 1)
    foca = _decay_errors("foca", R0, lam, h, N_FULL, K)
    ts1 = _decay_errors("taylorseer", {"order": 1}, lam, h, N_FULL, K)
    ts2 = _decay_errors("taylorseer", {"order": 2}, lam, h, N_FULL, K)
    ts3 = _decay_errors("taylorseer", {"order": 3}, lam, h, N_FULL, K)
    reuse = _decay_errors("reuse", {}, lam, h, N_FULL, K)
    y_prev, y_last = math.exp(lam * (N_FULL - 2) * h), math.exp(lam * (N_FULL - 1) * h)

    # after adjacent full computes F'_k = F'_anchor, and FoCa is linear extrapolation (= TS-1)
    np.testing.assert_allclose(foca, ts1, rtol=1e-12, atol=1e-15)
    # at most linear growth: the forecast moves by h |s| per step, s = (y_last - y_prev)/h,
    # |s| <= |lambda| y_prev, while the solution only decays: e(k) <= e(1) + (k-1) h |lambda| y_prev
    bound = foca[0] + (ks - 1) * h * abs(lam) * y_prev
    assert (foca <= bound * (1 + 1e-12)).all()
    # ... and it does grow (the paper's "bounded" does not hold for this reading)
    assert foca[-1] > 10 * foca[0]
    # Taylor of order >= 2 grows faster than linearly: fitted exponent over the second half
    half = slice(K // 2, K)
    g2 = _slope(ks[half], ts2[half])
    g3 = _slope(ks[half], ts3[half])
    assert g2 >= 1.8, f"TaylorSeer-2 error grows like k^{g2:.2f}"
    assert g3 >= 2.7, f"TaylorSeer-3 error grows like k^{g3:.2f}"
    assert _slope(ks[half], foca[half]) <= 1.3
    # and overtakes FoCa for good once k >= k_star (measured crossing points)
    after = slice(k_star - 1, None)
    assert (foca[after] < ts2[after]).all(), \
        f"first k with FoCa >= TS-2 after k*: {ks[after][foca[after] >= ts2[after]][:3]}"
    # reuse is bounded by the last computed value (the solution stays in (0, y_last])
    assert (reuse <= y_last + 1e-12).all()
    # the reference agrees with the package's math
    np.testing.assert_allclose(_decay_errors("foca", R0, lam, h, N_FULL, K, engine="ref"), foca, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("reading", ["r3", "r4", "r6", "r7"])
@pytest.mark.parametrize("lam,h", [(-2.0, 0.1), (-1.0, 0.25)], ids=["lam-2-h0.1", "lam-1-h0.25"])
def test_readings_grow_linearly_on_decay(reading, lam, h):
    """docs/method.md: every FoCa reading here is exact on lines, so none stays bounded on
    y' = lambda y; each grows about linearly (fitted exponent over k = 30..60 below 1.3, error
    at k = 60 over 10x the first), slower than TaylorSeer-2 (exponent >= 1.8)."""
    K, ks = 60, np.arange(1, 61)
    e = _decay_errors(*foca_reading(reading), lam, h, N_FULL, K)
    half = slice(K // 2, K)
    assert e[-1] > 10 * e[0]
    assert _slope(ks[half], e[half]) <= 1.3
    ts2 = _decay_errors("taylorseer", {"order": 2}, lam, h, N_FULL, K)
    assert e[-1] < ts2[-1]


def test_stability_on_decay_kernels(backend):
    """The kernels (fp32) reproduce the float64 error curves: FoCa linear, TaylorSeer-2 above it
    from k = 12 on (lambda -2, h 0.1)."""
    lam, h, K = -2.0, 0.1, 40
    f = lambda t: torch.tensor([math.exp(lam * t)])  # noqa: E731
    curves = {}
    for name, method, opts in [("foca", "foca", R0), ("ts2", "taylorseer", {"order": 2})]:
        buf = fk.allocate(torch.zeros(1), method, **opts)
        for i in range(N_FULL):
            fk.update_(buf, f(i * h), h, backend=backend)
        curves[name] = np.array([abs(fk.forecast(buf, h, backend=backend).item() - math.exp(lam * (N_FULL - 1 + k) * h))
                                 for k in range(1, K + 1)])
        np.testing.assert_allclose(curves[name], _decay_errors(method, opts, lam, h, N_FULL, K), rtol=1e-4, atol=1e-6)
    assert (curves["foca"][11:] < curves["ts2"][11:]).all()


def test_secant_anchor_stable_across_windows():
    """Full compute every N-th step on a smooth trajectory, 30 windows: with the secant anchor
    the error per window stays at the level of the first windows (measured: the max over windows
    10-30 is 0.84-1.33x the max over windows 1-3 for N = 2, 3, 5, 9 and h = 0.05, 0.1, 0.2)."""
    for n in (2, 3, 5, 9):
        for h in (0.05, 0.2):
            per_window = _window_errors("secant", n, h, 30)
            assert per_window[9:].max() <= 2.0 * per_window[:3].max(), (n, h, per_window)


@pytest.mark.xfail(strict=True, reason=(
    "FoCa anchor='bdf2' is unstable across full-compute windows: the BDF2 anchor takes the "
    "last forecast's error e with gain (1+w)/h, the next window's forecasts then carry ~c*e, "
    "so errors grow geometrically window after window, independently of h. Measured on "
    "sin(t+1), equal steps, h = 0.05/0.1/0.2: growth per window 1.5x (N=2), 2.96x (N=3), "
    "5.94x (N=5), 12x (N=9); max error over windows 10-30 vs windows 1-3: 4e4x (N=2) to "
    "1e29x (N=9). docs/method.md keeps it as an option for evaluation only. This test states "
    "the property it lacks; it fails (xfail) until the anchor is made stable."))
def test_bdf2_anchor_stable_across_windows():
    for n in (2, 3, 5, 9):
        for h in (0.05, 0.2):
            per_window = _window_errors("bdf2", n, h, 30)
            assert per_window[9:].max() <= 2.0 * per_window[:3].max(), (n, h, per_window)


def test_bdf2_anchor_is_unstable():
    """The measured fact behind the xfail above, so that a change in it is noticed: the
    bdf2 anchor's error grows by more than 1.3x per window (measured 1.5x at N = 2, up to 12x
    at N = 9) while the secant anchor's does not (measured 0.87-1.10x)."""
    for n in (2, 3, 5, 9):
        w = _window_errors("bdf2", n, 0.1, 16)
        rate = (w[15] / w[5]) ** (1 / 10)
        assert rate > 1.3, (n, rate)
        w = _window_errors("secant", n, 0.1, 16)
        assert (w[15] / w[5]) ** (1 / 10) < 1.2


def _window_errors(anchor, n, h, windows):
    """Max forecast error in each of ``windows`` windows [w n, (w+1) n) (a full compute
    opens each), on sin(t + 1) with equal steps h; window 0 (warm-up) left out."""
    f = lambda t: torch.tensor([math.sin(t + 1.0)], dtype=torch.float64)  # noqa: E731
    sched = interval_schedule(n * (windows + 1), n)
    eng = Shadow64("foca", (1,), anchor=anchor)
    errs = np.zeros(windows + 1)
    for i, full in enumerate(sched):
        if full:
            eng.full(f(i * h), h)
        else:
            errs[i // n] = max(errs[i // n], abs(eng.forecast(h).item() - f(i * h).item()))
    return errs[1:]


# =====================================================================================
# 4. cache-dit's published rule vs ours
# =====================================================================================
def test_cache_dit_rule_overshoots_where_ours_is_exact():
    """y = t, schedule full, full, skip, skip, full, skip, skip (h = 1). cache-dit's rule
    multiplies the full-to-full difference F_full - F_full_prev (here 3, over 3 steps) as if
    it were a one-step slope: it predicts 6 and 9 at t = 5, 6 where the truth is 5 and 6."""
    sched = [True, True, False, False, True, False, False]
    xs = [torch.tensor([float(t)], dtype=torch.float64) for t in range(7)]
    steps = [1.0] * 7
    cd = run_ref(CacheDitRule(), xs, sched, steps)
    assert [cd[i].item() for i in (2, 3, 5, 6)] == [2.0, 3.0, 6.0, 9.0]
    for anchor in ("secant", "bdf2"):
        ours = run_ref(make_ref("foca", anchor=anchor), xs, sched, steps)
        assert [ours[i].item() for i in (2, 3, 5, 6)] == pytest.approx([2.0, 3.0, 5.0, 6.0], abs=1e-12)
        shadow = run_ref(Shadow64("foca", (1,), anchor=anchor), xs, sched, steps)
        assert [shadow[i].item() for i in (2, 3, 5, 6)] == pytest.approx([2.0, 3.0, 5.0, 6.0], abs=1e-12)


@pytest.mark.parametrize("anchor", ["secant", "bdf2"])
def test_cache_dit_schedule_on_kernels(anchor, backend):
    sched = [True, True, False, False, True, False, False]
    xs = [torch.tensor([float(t)] * 5) for t in range(7)]
    outs = run_kernel(fk.allocate(xs[0], "foca", anchor=anchor), xs, sched, [1.0] * 7, backend)
    for i, exp in zip((2, 3, 5, 6), (2.0, 3.0, 5.0, 6.0)):
        assert_close(outs[i], torch.full((5,), exp, dtype=torch.float64), torch.float32, name=f"t={i}")


# =====================================================================================
# 5. every step computed
# =====================================================================================
@pytest.mark.parametrize("method,opts", EXACT_METHODS + [("reuse", {})], ids=EXACT_IDS + ["reuse"])
def test_state_after_full_steps_holds_the_computed_values(method, opts, backend):
    """With every step computed nothing is forecast: the state's newest value is the model's
    output bit for bit (the uncached result), and the first forecast after them equals the
    reference's."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 11, generator=g) for _ in range(5)]
    buf = fk.allocate(xs[0], method, **opts)
    ref = make_ref(method, **opts)
    for x in xs:
        fk.update_(buf, x, 0.5, backend=backend)
        ref.full(x.double(), 0.5)
        newest = buf.role(buf.method.roles[0])  # F (FoCa r0/r4), X0 (closed forms) or D0
        assert torch.equal(newest, x)
    assert_close(fk.forecast(buf, 0.5, backend=backend), ref.forecast(0.5), torch.float32)
