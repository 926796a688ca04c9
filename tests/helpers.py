"""Shared pieces of the core test suite: per-dtype tolerances with one verbose assert, the
tolerance-free rule for low precision, adapters between a CacheState and the plain
reference (reference/), and drivers that run a schedule of full and skipped steps.

Why the rules are what they are
-------------------------------
Every rule in foca_kernels is a linear combination sum_i c_i x_i applied in fp32 and rounded
once to the storage / output dtype. Against a float64 evaluation of the paper's equations:

* fp32: the error is the fp32 accumulation error, about k * 2^-24 * sum_i |c_i x_i| for k
  terms. It is *not* relative to the result (the combinations cancel: 1.5 F - 0.5 F_prev),
  so the check is |a - e| <= atol * scale + rtol * |e| with scale the magnitude of the data.
* fp16 / bf16: one rounding of the result dominates. The tolerance-free rule (Liger-Kernel's,
  used for FlashAttention too) asks that the kernel's error against float64 be at most twice
  the error of the same reference evaluated in that dtype by plain torch ops, plus a tiny
  eps. Two honest refinements, both documented where they are used:
  - the Triton interpreter casts fp32 -> bf16 by truncation (up to 1 ulp) instead of
    round-to-nearest-even (0.5 ulp). A kernel that stores one correctly computed value can
    then lose to plain torch by more than 2x on a handful of elements. So the yardstick is
    max(plain torch error, error of storing the exact value with the kernel's own rounding
    mode), i.e. "twice what the storage format itself costs, or twice what torch does".
  - FoCa is recursive: a rounding made at step k is carried (and for the bdf2 anchor
    amplified) into every later step. Step-by-step checks therefore start the reference from
    the kernel's own stored state (identical state), and whole sequences are judged against
    a float64 reference that rounds its stored state after every step the way the kernel's
    storage does (same dtype, same rounding mode), as well as against plain torch in that dtype.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Optional, Sequence

import torch

import foca_kernels as fk
from foca_kernels.methods import FOCA_STUDY_READINGS, Fitted, FoCa, FoCaClosed, Method, Reuse, TaylorSeer, make_foca
from reference import FittedRef, FoCaRef, FoCaRestartRef, ReuseRef, TaylorSeerRef, interval_schedule
from reference import make_ref as _make_ref


# --------------------------------------------------------------------------------------
# methods under test
# --------------------------------------------------------------------------------------
def study(reading: str) -> Method:
    """FoCa's study reading ``reading`` (r4, r6), which the public API refuses by name (no
    measured reason to choose it, docs/method.md), as the Method instance studies pass. A test
    takes it as ``(study(r), {})`` where it takes ``(method name, options)``."""
    return make_foca(reading=reading)


def foca_reading(reading: str):
    """(method, options) of FoCa's reading ``reading`` as tests pass them to allocate: a public
    reading by name, a study reading as its Method (:func:`study`)."""
    return (study(reading), {}) if reading in FOCA_STUDY_READINGS else ("foca", {"reading": reading})


def study_options(method: Method) -> dict:
    """The reference's options (reference.make_ref("foca", ...)) of a FoCa Method instance."""
    if isinstance(method, FoCa) and method.contraction:
        return {"reading": method.reading, "contraction": method.contraction}
    if isinstance(method, FoCa):
        return {"reading": "r0", "anchor": method.anchor}
    return {"reading": method.reading}


def make_ref(method="foca", **opts):
    """reference.make_ref, also for a FoCa Method instance (a study reading)."""
    if isinstance(method, Method):
        assert not opts and method.name == "foca", (method, opts)
        return _make_ref("foca", **study_options(method))
    return _make_ref(method, **opts)


METHODS = [
    ("foca", {"anchor": "secant"}),
    ("foca", {"anchor": "bdf2"}),
    ("taylorseer", {"order": 1}),
    ("taylorseer", {"order": 2}),
    ("taylorseer", {"order": 3}),
    ("reuse", {}),
    # readings r3, r4, r6, r7 (docs/method.md; r4 and r6 are study readings, built as a Method);
    # appended so the indices above stay valid
    ("foca", {"reading": "r3"}),
    (study("r4"), {}),
    (study("r6"), {}),
    ("foca", {"reading": "r7"}),
    # the fitted forecaster with weights as a calibration could give them (a != 1, c < 0, c > 1,
    # keys missing: TaylorSeer-2 there), dyadic so that lines stay exact in every dtype
    ("fitted", {"weights": {(1, 1): (0.5, 1.0), (2, 1): (0.75, -0.5), (2, 2): (1.0, 0.25), (3, 1): (1.25, 2.0),
                            (3, 2): (0.0, 0.0), (4, 1): (1.0, 1.5), (5, 2): (0.5, -1.0)}}),
]


def method_name(method) -> str:
    """The registry name of a method given by name or as a Method instance ("foca" for every
    FoCa reading)."""
    return method.name if isinstance(method, Method) else method


def method_id(method, opts: dict) -> str:
    if isinstance(method, Method):  # a study reading: its id as if it were given by name
        return f"{method.name}-{method.reading}"
    if method == "fitted":
        return "fitted"
    return "-".join([method] + [str(v) for v in opts.values()])


METHOD_IDS = [method_id(m, o) for m, o in METHODS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# --------------------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------------------
# (atol, rtol) per dtype, FlagGems-style. rtol is FlagGems' resolution table:
#   bf16 0.016: 8 significant bits; round-to-nearest costs <= 2^-8 = 0.0039 relative, the
#               Triton interpreter's truncating cast < 1 ulp <= 2^-7 = 0.0078: inside 0.016.
#   fp16 1e-3:  11 significant bits; round-to-nearest costs <= 2^-11 = 4.9e-4 relative.
#   fp32 1.3e-6: about 11 ulp at 1.0.
# atol is multiplied by the data's magnitude (scale): it covers the fp32 accumulation of a
# cancelling combination (k * 2^-24 * sum |c_i x_i| with |c_i| <= ~4 on the schedules here,
# about 1e-6 for unit-scale data) and results near zero, where a relative bound means nothing.
TOL = {
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 0.016),
    torch.float64: (1e-12, 1e-12),
}

# eps of the low-precision rule, times the data's magnitude: 4 fp32 ulps. It only matters when
# every yardstick is exactly 0 (a pure copy such as reuse's forecast), where it leaves room
# for the kernel's fp32 arithmetic and nothing more; it is 2000x below one bf16 ulp.
RULE_EPS = 2.0**-22


def _magnitude(x: torch.Tensor) -> float:
    fin = x[torch.isfinite(x)]
    return max(1.0, fin.abs().max().item()) if fin.numel() else 1.0


def _nonfinite_mismatch(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Elements where a and e are not both finite-or-equal non-finite (nan vs inf, +inf vs -inf
    and finite vs non-finite are all mismatches)."""
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    return (fa != fe) | (~fa & ~fe & ~(both_nan | same_inf))


def _describe(a, e, bad, limit=10) -> str:
    idx = torch.nonzero(bad)[:limit]
    lines = []
    for i in idx:
        t = tuple(int(v) for v in i)
        av, ev = a[t].item(), e[t].item()
        lines.append(f"    at {t}: got {av!r}, expected {ev!r}, diff {av - ev!r}")
    return "\n".join(lines)


def assert_close(actual, expected, dtype=None, *, atol=None, rtol=None, scale=None, name="tensor",
                 nonfinite="kind"):
    """|actual - expected| <= atol * scale + rtol * |expected| elementwise, with the per-dtype
    table; non-finite values must match in kind (nan / +inf / -inf), or with
    ``nonfinite="position"`` only in position (for comparisons with a reference that reaches
    the same value by other algebra: inf - inf gives nan there and -inf here). On failure the
    message lists the first mismatching indices with both values."""
    dtype = dtype or actual.dtype
    d_atol, d_rtol = TOL[dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    scale = _magnitude(e) if scale is None else scale
    nf = _nonfinite_mismatch(a, e) if nonfinite == "kind" else torch.isfinite(a) != torch.isfinite(e)
    if nf.any():
        raise AssertionError(
            f"{name}: {int(nf.sum())}/{a.numel()} elements differ in nan/inf pattern\n{_describe(a, e, nf)}"
        )
    fin = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
    bad = diff > atol * scale + rtol * e.abs().where(fin, torch.zeros_like(e))
    if bad.any():
        rel = (diff / e.abs().clamp_min(1e-300)).where(fin, torch.zeros_like(a))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements out of tolerance for {dtype} "
            f"(atol {atol} x scale {scale:.3g}, rtol {rtol}); max abs err {diff.max().item():.3e}, "
            f"max rel err {rel.max().item():.3e}; first mismatches:\n{_describe(a, e, bad)}"
        )


def max_err(x, ref64) -> float:
    """Max abs error over finite elements (non-finite patterns are checked separately)."""
    x = x.detach().to("cpu", torch.float64)
    r = ref64.detach().to("cpu", torch.float64)
    fin = torch.isfinite(x) & torch.isfinite(r)
    return (x - r).abs().where(fin, torch.zeros_like(x)).max().item() if x.numel() else 0.0


def assert_low_precision_rule(actual, expected64, yardsticks: Dict[str, torch.Tensor], *, factor=2.0,
                              eps=None, name="tensor"):
    """err(actual) <= factor * max_k err(yardstick_k) + eps, errors being max |. - expected64|.

    ``yardsticks``: what the kernel's error is compared with, e.g. {"torch bf16": the same
    reference evaluated in bf16, "storage": the exact value stored with the kernel's rounding}.
    Non-finite patterns must match ``expected64`` exactly."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    nf = _nonfinite_mismatch(a, e)
    if nf.any():
        raise AssertionError(f"{name}: nan/inf pattern differs from the float64 reference\n{_describe(a, e, nf)}")
    eps = RULE_EPS * _magnitude(e) if eps is None else eps
    err = max_err(a, e)
    errs = {k: max_err(v, e) for k, v in yardsticks.items()}
    bound = factor * max(errs.values()) + eps
    if not err <= bound:
        diff = (a - e).abs()
        worst = diff == diff.max()
        raise AssertionError(
            f"{name}: kernel error {err:.4g} > {factor} x max({', '.join(f'{k} {v:.4g}' for k, v in errs.items())}) "
            f"+ eps {eps:.2g} = {bound:.4g}\n{_describe(a, e, worst, 3)}"
        )
    return err, errs


# --------------------------------------------------------------------------------------
# rounding the way the kernel's storage does
# --------------------------------------------------------------------------------------
def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rounding_mode(backend: str, dtype: torch.dtype, device) -> str:
    """How the kernel rounds fp32 results into ``dtype``: "rne", except the Triton
    interpreter's fp32 -> bf16 cast, which truncates (drops the low 16 bits)."""
    dev = torch.device(device)
    if backend == "triton" and dev.type == "cpu" and interpreter_on() and dtype == torch.bfloat16:
        return "trunc"
    return "rne"


def round_to(x: torch.Tensor, dtype: torch.dtype, mode: str = "rne") -> torch.Tensor:
    """``x`` (any float dtype) as the kernel would store it: through fp32, then ``dtype``."""
    if dtype == torch.float64:
        return x.to(torch.float64)
    x32 = x.to(torch.float32)
    if mode == "trunc" and dtype == torch.bfloat16:
        bits = x32.contiguous().view(torch.int32) & -65536  # keep sign, exponent, top 7 mantissa bits
        return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    return x32.to(dtype)


# --------------------------------------------------------------------------------------
# reference <-> CacheState
# --------------------------------------------------------------------------------------
def role_time(buf, role: str) -> Optional[float]:
    """Time stamp of a role (bookkeeping is private to CacheState; tests may read it)."""
    return buf._time_of[role]


def ref_from_state(buf, dtype: torch.dtype):
    """A reference object holding the kernel's current state (its stored roles, cast to
    ``dtype``), so one step of the reference starts from exactly the kernel's state."""
    m = buf.method

    def get(role):
        v = buf.role(role)
        return None if v is None else v.detach().to("cpu", dtype).clone()

    if isinstance(m, FoCaClosed):
        ref = _restart_ref_from_state(buf, m, get)
    elif isinstance(m, FoCa):
        ref = FoCaRef(m.anchor, m.contraction)
        ref.f, ref.t_f = get("F"), role_time(buf, "F")
        ref.f_prev, ref.t_prev = get("F_prev"), role_time(buf, "F_prev")
        ref.d_anchor = get("D_anchor")
        if m.anchor == "secant":
            ref.f_full, ref.t_full = get("F_full"), role_time(buf, "F_full")
        # the bdf2 anchor keeps no F_full: FoCaRef only reads f_full for the secant anchor
    elif isinstance(m, TaylorSeer):  # replay its stored computed values, oldest first
        ref = FittedRef(m.weights) if isinstance(m, Fitted) else TaylorSeerRef(m.order)
        held = [(get(r), role_time(buf, r)) for r in m.roles if buf.role(r) is not None]
        for x, t in reversed(held):
            ref.t = t - 1.0 if ref.t is None else ref.t
            ref.full(x, t - ref.t)
    elif isinstance(m, Reuse):
        ref = ReuseRef()
        ref.last = get("D0")
    else:  # pragma: no cover
        raise TypeError(m)
    ref.t = buf.t
    ref.n_full = buf.n_full
    if isinstance(m, Fitted):
        ref.k = buf.n_skip  # the place in the window the next skip's weights are looked up by
    return ref


def _restart_ref_from_state(buf, m, get):
    """FoCaRestartRef holding the kernel's state: its stored computed values, and the window's
    recursion variables evaluated from the coefficient vectors the method keeps on the host
    (right after a full step, the ones the method starts a window from)."""
    ref = FoCaRestartRef(m.reading)
    ref.computed = [(get(r), role_time(buf, r)) for r in m.roles if buf.role(r) is not None]
    if buf.n_full < m.min_full:
        return ref
    memo = buf._memo if buf._memo and "fk" in buf._memo else m._start(buf.context(buf.t))

    def ev(combo):
        return sum(c * get(r) for r, c in combo.items())

    ref.f, ref.t_f = ev(memo["fk"]), memo["tk"]
    ref.f_prev, ref.t_prev = ev(memo["fkm1"]), memo["tkm1"]
    ref.anchor_d = ev(memo["a"])
    ref.d = ev(memo["d"]) if memo["d"] is not None else None
    return ref


def ref_roles(ref, method) -> Dict[str, Optional[torch.Tensor]]:
    """The reference's state under the kernel's role names."""
    if isinstance(method, FoCaClosed):
        return {r: (ref.computed[j][0] if j < len(ref.computed) else None) for j, r in enumerate(method.roles)}
    if isinstance(method, FoCa):
        roles = {"F": ref.f, "F_prev": ref.f_prev, "D_anchor": ref.d_anchor}
        if method.anchor == "secant":
            roles["F_full"] = ref.f_full
        return roles
    if isinstance(method, TaylorSeer):
        return {r: (ref.computed[j][0] if j < len(ref.computed) else None) for j, r in enumerate(method.roles)}
    return {"D0": ref.last}


def ref_role_times(ref, method) -> Dict[str, Optional[float]]:
    if isinstance(method, FoCaClosed):
        return {r: (ref.computed[j][1] if j < len(ref.computed) else None) for j, r in enumerate(method.roles)}
    if isinstance(method, FoCa):
        times = {"F": ref.t_f, "F_prev": ref.t_prev}
        if method.anchor == "secant":
            times["F_full"] = ref.t_full
        return times
    if isinstance(method, TaylorSeer):
        return {r: (ref.computed[j][1] if j < len(ref.computed) else None) for j, r in enumerate(method.roles)}
    return {}


class StorageRoundedRef:
    """A float64 reference whose stored state is rounded after every step exactly as the
    kernel's storage rounds it (``state_dtype`` with ``mode``), forecasts to ``io_dtype``.
    Its error against the plain float64 reference is what the storage format costs."""

    def __init__(self, method, opts, state_dtype, io_dtype, mode):
        self.ref = make_ref(method, **opts)
        self.m = fk.make_method(method, **opts)
        self.state_dtype, self.io_dtype, self.mode = state_dtype, io_dtype, mode

    def _r(self, x, dtype):
        return None if x is None else round_to(x, dtype, self.mode).to(torch.float64)

    def _round_state(self):
        r, sd = self.ref, self.state_dtype
        if isinstance(self.m, (FoCaClosed, TaylorSeer)):
            return  # they store the computed values only, rounded on the way in (full)
        if isinstance(self.m, FoCa):
            same = r.f_full is r.f
            r.f, r.f_prev, r.d_anchor = self._r(r.f, sd), self._r(r.f_prev, sd), self._r(r.d_anchor, sd)
            r.f_full = r.f if same else self._r(r.f_full, sd)
        else:
            r.last = self._r(r.last, sd)

    def full(self, x, h):
        if isinstance(self.m, (FoCaClosed, TaylorSeer)):  # the recursion runs on the stored (rounded) values
            x = self._r(x, self.state_dtype)
        self.ref.full(x.to(torch.float64), h)
        self._round_state()

    def forecast(self, h):
        out = self.ref.forecast(h)
        self._round_state()
        return self._r(out, self.io_dtype)


# --------------------------------------------------------------------------------------
# schedules and trajectories
# --------------------------------------------------------------------------------------
def make_steps(n: int, rng: random.Random, lo=0.5, hi=1.5) -> List[float]:
    """Unequal step sizes; steps[0] is unused (the first step has no predecessor)."""
    return [1.0] + [rng.uniform(lo, hi) for _ in range(n - 1)]


def times_of(steps: Sequence[float]) -> List[float]:
    ts = [0.0]
    for s in steps[1:]:
        ts.append(ts[-1] + s)
    return ts


def smooth_features(shape, ts, gen: torch.Generator, dtype=torch.float64) -> List[torch.Tensor]:
    """Per element a + b sin(w t + p) + c t: smooth, unit-scale, different for every element."""
    a, b, p, c = (torch.randn(4, *shape, generator=gen, dtype=torch.float64)).unbind(0)
    w = 0.2 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return [(a + b * torch.sin(w * t + p) + 0.1 * c * t).to(dtype) for t in ts]


def random_schedule(n: int, min_full: int, rng: random.Random, p_full=0.35) -> List[bool]:
    """First ``min_full`` steps computed, then random full/skip (random gaps)."""
    return [i < min_full or rng.random() < p_full for i in range(n)]


def run_kernel(buf, xs, full, steps, backend, out_dtype=None) -> Dict[int, torch.Tensor]:
    """Drive ``buf`` along a schedule; returns {step: forecast} for the skipped steps."""
    outs = {}
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            fk.update_(buf, xs[i], h, backend=backend)
        else:
            out = torch.empty(buf.shape, dtype=out_dtype or buf.io_dtype, device=buf.device)
            fk.forecast_(buf, out, h, backend=backend)
            outs[i] = out
    return outs


def run_ref(ref, xs, full, steps) -> Dict[int, torch.Tensor]:
    outs = {}
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            ref.full(xs[i], h)
        else:
            outs[i] = ref.forecast(h)
    return outs


__all__ = [
    "DTYPES", "DTYPE_IDS", "METHODS", "METHOD_IDS", "RULE_EPS", "StorageRoundedRef", "TOL",
    "assert_close", "assert_low_precision_rule", "foca_reading", "interval_schedule", "make_steps", "max_err",
    "make_ref", "method_id", "method_name", "random_schedule", "ref_from_state", "ref_role_times", "ref_roles",
    "role_time", "round_to", "rounding_mode", "run_kernel", "run_ref", "smooth_features", "study", "study_options",
    "times_of",
]
