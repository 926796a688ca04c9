"""Is there a curvature weight that beats TaylorSeer-2 on both shipped DiTs? (issue 7)

Every line-exact forecast over the last three computed values is X0 + x A + c(x) d2
(docs/method.md). This study runs families of c(x) closed loop on a shipped demo DiT
(warm-up 2, final 0, 50 Euler steps, the same seeds as full compute) and prints PSNR against
full compute with paired 95% intervals against TaylorSeer-2:

    blend:L   L * r7 + (1 - L) * r3           (r3's saturating weight .. r7's g x / 2)
    sat:K     c(x) = (g x / 2) / (1 + x / (K g))   (r7's weight, saturating)
    mix:M     M * r7 + (1 - M) * TaylorSeer-2  (mix:0 is TaylorSeer-2 exactly: a check)
    theta:T   X0 + x (A + T (D - A))           (D = eq. (6) at the full step; T = 1/2 is r7)
    r3, r7, ts2, reuse, rfc:R                  the package's own methods (rfc:R: RFE over reading R)
    duca, duca:foca, duca:ts2                  DuCa reusing, or forecasting with FoCa / TaylorSeer-2

and, through plain PyTorch module hooks (no kernels, float32), two window-aware variants of
the theta family:

    first:T       theta T in the first window with three computed values (its gaps are 1 and
                  N: the warm-up pair and the first interval), r7's 1/2 afterwards
    calib[:T]     theta fitted at every full step by least squares on the previous window's
                  extrapolation to the new computed value (per batch row, clipped to [0, 1]);
                  T (default 1/2) until four computed values exist
    calib2        X0 + x (phi A + theta (D - A)): phi (the slope's weight, clipped to [0, 1.5])
                  and theta fitted together the same way; r7 (phi 1, theta 1/2) until then
    calib2t       calib2 fitted over the whole output tensor (one phi, theta per stream)

    python bench/curvature_study.py --model digits --samples 50 \\
        --methods ts2 r7 blend:0.5 blend:0.75 sat:2 theta:0.25 first:0.25 calib calib:0.25
    python bench/curvature_study.py --model patches --model-dir patches-model ...  # bench/third_model.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from foca_kernels.demo.metrics import psnr  # noqa: E402
from foca_kernels.demo.model import load_demo_dit  # noqa: E402
from foca_kernels.demo.sampler import DEFAULT_NUM_STEPS as STEPS, sample  # noqa: E402
from foca_kernels.hooks import CacheConfig, cached  # noqa: E402
from foca_kernels.methods import FoCaClosed, make_method  # noqa: E402
from foca_kernels.methods.base import added, scaled  # noqa: E402
from foca_kernels.methods.history import secant  # noqa: E402


class _OnR7(FoCaClosed):
    """A closed form defined against r7's forecast (its recursion needs no memo beyond r7's)."""

    def __init__(self, p: float):
        super().__init__("r7")
        self.p = p

    def forecast(self, ctx):
        vals, times = self.history(ctx)
        fc7, memo = super().forecast(ctx)
        x = ctx.t - times[0]
        ts1 = added(vals[0], scaled(secant(vals[0], times[0], vals[1], times[1]), x))
        return self.combine(fc7, ts1, vals, times, x), memo


class Sat(_OnR7):
    def combine(self, fc7, ts1, vals, times, x):
        mu = 1.0 / (1.0 + x / (self.p * (times[0] - times[1])))
        return added(scaled(fc7, mu), scaled(ts1, 1 - mu))


class Theta(_OnR7):
    def combine(self, fc7, ts1, vals, times, x):  # r7 = TS-1 + x (D - A) / 2
        return added(scaled(fc7, 2 * self.p), scaled(ts1, 1 - 2 * self.p))


class Mix(_OnR7):
    def combine(self, fc7, ts1, vals, times, x):
        ts2 = ts1
        if len(vals) == 3:  # TaylorSeer's second divided difference, divided by the last gap
            a0 = secant(vals[0], times[0], vals[1], times[1])
            a1 = secant(vals[1], times[1], vals[2], times[2])
            ts2 = added(ts1, scaled(added(a0, scaled(a1, -1.0)), x * x / 2 / (times[0] - times[1])))
        return added(scaled(fc7, self.p), scaled(ts2, 1 - self.p))


class Blend(FoCaClosed):
    """L * r7 + (1 - L) * r3, both recursions run on coefficient vectors side by side."""

    def __init__(self, lam: float):
        super().__init__("r3")
        self.lam, self.parts = lam, {"r3": FoCaClosed("r3"), "r7": FoCaClosed("r7")}

    def forecast(self, ctx):
        memo = ctx.memo if ctx.memo and "r3" in ctx.memo else {"r3": None, "r7": None}
        out, nxt = {}, {}
        for key, method in self.parts.items():
            ctx.memo = memo[key]
            out[key], nxt[key] = method.forecast(ctx)
        ctx.memo = memo
        return added(scaled(out["r7"], self.lam), scaled(out["r3"], 1 - self.lam)), nxt


def closed_method(name: str):
    kind, _, p = name.partition(":")
    if kind == "reuse":
        return make_method("reuse")
    if kind == "rfc":  # RFE over a FoCa reading, e.g. rfc:r7 (its default base is r3)
        return make_method("rfc", reading=p or "r3")
    if kind in ("r3", "r7"):
        return make_method("foca", reading=kind)
    if kind == "ts2":
        return make_method("taylorseer", order=2)
    return {"blend": Blend, "sat": Sat, "theta": Theta, "mix": Mix}[kind](float(p))


def _bdf2(f0, f1, f2, h, h_prev):
    """Eq. (6), variable step, on tensors."""
    w = h / h_prev
    return ((1 + 2 * w) / (1 + w) * f0 - (1 + w) * f1 + w * w / (1 + w) * f2) / h


class _ThetaStream:
    """One cached module, forecasting X0 + x (A + theta (D - A)) in plain PyTorch."""

    def __init__(self, module, clock, first, calibrate):
        self.module, self.forward0 = module, module.forward
        self.clock, self.first, self.calibrate = clock, first, calibrate  # calibrate: None | "theta" | "both"
        self.vals, self.theta, self.phi = [], None, 1.0  # vals: [(t, X)] newest first
        self.pooled = False  # fit over the whole tensor instead of per batch row
        module.forward = self.forward

    def forward(self, *args, **kwargs):
        k = self.clock["step"]
        w, n = self.clock["warmup"], self.clock["interval"]
        if k < w or (k - w + 1) % n == 0 or len(self.vals) < 2:
            out = self.forward0(*args, **kwargs)
            self.vals = [(float(k), out.detach().float())] + self.vals[:3]
            if self.calibrate and len(self.vals) == 4:
                self.theta, self.phi = self._fit()
            return out
        (t0, x0), (t1, x1) = self.vals[:2]
        a = (x0 - x1) / (t0 - t1)
        d = a if len(self.vals) < 3 else _bdf2(x0, x1, self.vals[2][1], t0 - t1, t1 - self.vals[2][0])
        theta = self.first if len(self.vals) < 4 else (self.theta if self.theta is not None else 0.5)
        return (x0 + (k - t0) * (self.phi * a + theta * (d - a))).to(x0.dtype)

    def _fit(self):
        """Least-squares (theta, phi) of the previous window's extrapolation to the newest value:
        X0 - X1 ~ phi u + theta q, u = g A_1 (the secant part), q = g (D_1 - A_1) (the curvature
        part), per batch row; phi stays 1 unless both are fitted."""
        (t0, x0), (t1, x1), (t2, x2), (t3, x3) = self.vals
        a = (x1 - x2) / (t1 - t2)
        u, q, r = (t0 - t1) * a, (t0 - t1) * (_bdf2(x1, x2, x3, t1 - t2, t2 - t3) - a), x0 - x1
        dims = tuple(range(0 if self.pooled else 1, r.dim()))
        dot = lambda y, z: (y * z).sum(dims, keepdim=True)  # noqa: E731
        if self.calibrate == "theta":
            theta = dot(r - u, q) / dot(q, q).clamp_min(1e-30)
            return theta.clamp(0.0, 1.0), 1.0
        uu, uq, qq, ru, rq = dot(u, u), dot(u, q), dot(q, q), dot(r, u), dot(r, q)
        det = uu * qq - uq * uq
        # no curvature seen (q = 0, e.g. a straight line) or q parallel to u: fit the slope alone
        ok = det > 1e-9 * uu * qq
        det = torch.where(ok, det, torch.ones_like(det))
        phi = torch.where(ok, (ru * qq - rq * uq) / det, ru / uu.clamp_min(1e-30))
        theta = torch.where(ok, (rq * uu - ru * uq) / det, torch.full_like(det, 0.5))
        return theta.clamp(0.0, 1.0), phi.clamp(0.0, 1.5)

    def remove(self):
        self.module.forward = self.forward0


def run_hooked(model, labels, name, warmup, interval, seed):
    kind, _, p = name.partition(":")
    clock = {"step": 0, "warmup": warmup, "interval": interval}
    first = float(p) if p else 0.5
    calibrate = {"calib": "theta", "calib2": "both", "calib2t": "both"}.get(kind)
    streams = [_ThetaStream(getattr(b, m), clock, first, calibrate)
               for b in model.transformer_blocks for m in ("attn1", "ff")]
    for s in streams:
        s.pooled = kind == "calib2t"
    try:
        return sample(model, labels, seed=seed, callback=lambda info: clock.__setitem__("step", clock["step"] + 1))
    finally:
        for s in streams:
            s.remove()


def paired(a, b):
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    half = 1.96 * math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d))
    return m, m - half, m + half


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help="digits | mnist | patches (bench/third_model.py)")
    ap.add_argument("--model-dir", default=None, help="where the model's files are (patches: its --out)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["ts2", "r7", "blend:0.5", "sat:2", "first:0.25", "calib"])
    ap.add_argument("--intervals", type=int, nargs="+", default=[3, 5, 7, 9])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write per-image PSNRs as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "patches":
        import third_model

        third_model.register()
    model = load_demo_dit(args.model, directory=args.model_dir)
    labels = torch.arange(args.samples) % 10
    full = sample(model, labels, seed=args.seed)
    per, rows = {}, []
    methods = ["ts2"] + [m for m in args.methods if m != "ts2"]  # the reference of the intervals
    for name in methods:
        for n in args.intervals:
            t0 = time.perf_counter()
            if name.split(":")[0] in ("first", "calib", "calib2", "calib2t"):
                x = run_hooked(model, labels, name, args.warmup, n, args.seed)
            else:
                if name.startswith("duca"):  # duca, duca:foca, duca:ts2 (DuCa's forecast option)
                    fc = {"": {}, "foca": {"forecast": "foca"},
                          "ts2": {"forecast": "taylorseer", "forecast_order": 2}}[name.partition(":")[2]]
                    cfg = CacheConfig(interval=n, warmup=args.warmup, final=0, method="duca", method_options=fc,
                                      num_inference_steps=STEPS)
                else:
                    cfg = CacheConfig(interval=n, warmup=args.warmup, final=0, method=closed_method(name),
                                      num_inference_steps=STEPS)
                with cached(model, cfg):
                    x = sample(model, labels, seed=args.seed)
            per[name, n] = [float(v) for v in psnr(x, full, reduction="none", max_db=120.0)]
            mean = sum(per[name, n]) / len(per[name, n])
            m, lo, hi = paired(per[name, n], per["ts2", n])
            rows.append(dict(method=name, N=n, psnr=mean, vs_ts2=[m, lo, hi], per_image=per[name, n]))
            print(f"{args.model} {name:12s} N={n}: {mean:6.2f} dB, - ts2 {m:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(model=args.model, samples=args.samples, warmup=args.warmup, rows=rows), f)


if __name__ == "__main__":
    main()
