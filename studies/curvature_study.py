"""Is there a curvature weight that beats TaylorSeer-2 on both shipped DiTs?

Every line-exact forecast over the last three computed values is X0 + x A + c(x) d2
(docs/method.md). This study runs families of c(x) closed loop on a demo DiT (warm-up 2,
final 0, 50 Euler steps, the same seeds as full compute) and prints PSNR against full compute
with paired 95% intervals against TaylorSeer-2:

    blend:L   L * r7 + (1 - L) * r3           (r3's saturating weight .. r7's g x / 2)
    sat:K     c(x) = (g x / 2) / (1 + x / (K g))   (r7's weight, saturating)
    mix:M     M * r7 + (1 - M) * TaylorSeer-2  (mix:0 is TaylorSeer-2 exactly: a check)
    theta:T   X0 + x (A + T (D - A))           (D = eq. (6) at the full step; T = 1/2 is r7)
    r3, r7, ts2, reuse, rfc[:R]                the package's own methods (rfc:R: RFE over reading R;
                                               rfc alone: RFE's default base)
    duca, duca:foca, duca:ts2                  DuCa reusing, or forecasting with FoCa / TaylorSeer-2

The four families are closed forms over X0..X2 written against the package's extension point
for them (``foca_kernels.methods.RawHistory``: a forecast is a linear combination of the stored
values, returned by ``forecast(ctx)``), as weighted sums of the forecasts of the package's own
methods (``make_method``); they run through the same state and fused kernels as the built-in
methods. Through plain PyTorch module hooks (no kernels, float32), two window-aware variants
of the theta family:

    first:T       theta T in the first window with three computed values (its gaps are 1 and
                  N: the warm-up pair and the first interval), r7's 1/2 afterwards
    calib[:T]     theta fitted at every full step by least squares on the previous window's
                  extrapolation to the new computed value (per batch row, clipped to [0, 1]);
                  T (default 1/2) until four computed values exist
    calib2        X0 + x (phi A + theta (D - A)): phi (the slope's weight, clipped to [0, 1.5])
                  and theta fitted together the same way; r7 (phi 1, theta 1/2) until then
    calib2t       calib2 fitted over the whole output tensor (one phi, theta per stream)

    python studies/curvature_study.py --model digits --samples 50 \\
        --methods ts2 r7 blend:0.5 blend:0.75 sat:2 theta:0.25 first:0.25 calib calib:0.25
    python studies/curvature_study.py --model patches --model-dir patches-model ...  # third_model.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from foca_kernels.methods import RawHistory
from foca_kernels.registry import make_method

from sweep import Sweep, add_arguments, paired


def added(*combos) -> dict:
    """The sum of linear combinations over the roles (dicts role -> coefficient)."""
    total: dict = {}
    for combo in combos:
        for k, v in combo.items():
            total[k] = total.get(k, 0.0) + v
    return total


def scaled(combo, c: float) -> dict:
    return {k: v * c for k, v in combo.items()}


class Curvature(RawHistory):
    """A weighted sum of the forecasts of the package's closed forms over X0..X2 (FoCa r7 and
    r3, TaylorSeer-1 and -2), with weights that may depend on x (time since the last computed
    value) and g (the last gap between computed values). Each part keeps its own memo."""

    min_full = 2

    def __init__(self, kind: str, p: float):
        super().__init__(3)
        self.kind, self.p = kind, p
        self.name = f"{kind}:{p:g}"
        self.parts = {"r3": make_method("foca", reading="r3"), "r7": make_method("foca", reading="r7"),
                      "ts1": make_method("taylorseer", order=1), "ts2": make_method("taylorseer", order=2)}

    def describe(self) -> str:
        return self.name

    def full_memo(self, ctx):
        return {key: method.full_memo(ctx) for key, method in self.parts.items()}

    def forecast(self, ctx):
        memo, out, nxt = ctx.memo, {}, {}
        for key, method in self.parts.items():
            ctx.memo = memo[key]
            out[key], nxt[key] = method.forecast(ctx)
        ctx.memo = memo
        return self.combine(out, ctx), nxt

    def combine(self, fc, ctx) -> dict:
        p = self.p
        if self.kind == "blend":
            return added(scaled(fc["r7"], p), scaled(fc["r3"], 1 - p))
        if self.kind == "theta":  # r7 = TS-1 + x (D - A) / 2
            return added(scaled(fc["r7"], 2 * p), scaled(fc["ts1"], 1 - 2 * p))
        if self.kind == "mix":
            return added(scaled(fc["r7"], p), scaled(fc["ts2"], 1 - p))
        if self.kind == "sat":
            _, times = self.history(ctx)
            mu = 1.0 / (1.0 + (ctx.t - times[0]) / (p * (times[0] - times[1])))
            return added(scaled(fc["r7"], mu), scaled(fc["ts1"], 1 - mu))
        raise ValueError(f"unknown family {self.kind!r}")


FAMILIES = ("blend", "sat", "theta", "mix")


def closed_method(name: str):
    kind, _, p = name.partition(":")
    if kind == "reuse":
        return make_method("reuse")
    if kind == "rfc":  # RFE over a FoCa reading, e.g. rfc:r7; rfc alone: RFE's default base
        return make_method("rfc", reading=p) if p else make_method("rfc")
    if kind in ("r3", "r7"):
        return make_method("foca", reading=kind)
    if kind == "ts2":
        return make_method("taylorseer", order=2)
    if kind in FAMILIES:
        return Curvature(kind, float(p))
    raise ValueError(f"unknown method {name!r}")


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


def run_hooked(sw: Sweep, name, warmup, interval):
    """A generation of ``sw``'s labels and seeds with the hooked variant ``name`` (first, calib*)."""
    from foca_kernels.demo.sampler import sample

    kind, _, p = name.partition(":")
    clock = {"step": 0, "warmup": warmup, "interval": interval}
    first = float(p) if p else 0.5
    calibrate = {"calib": "theta", "calib2": "both", "calib2t": "both"}.get(kind)
    streams = [_ThetaStream(getattr(b, m), clock, first, calibrate)
               for b in sw.dit.transformer_blocks for m in ("attn1", "ff")]
    for s in streams:
        s.pooled = kind == "calib2t"
    try:
        return sample(sw.dit, sw.labels, seed=sw.seed, num_steps=sw.steps,
                      callback=lambda info: clock.__setitem__("step", clock["step"] + 1))
    finally:
        for s in streams:
            s.remove()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, samples=50)
    ap.add_argument("--methods", nargs="+", default=["ts2", "r7", "blend:0.5", "sat:2", "first:0.25", "calib"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", help="write per-image PSNRs as JSON")
    args = ap.parse_args(argv)
    sw = Sweep.from_args(args)
    per, rows = {}, []
    methods = ["ts2"] + [m for m in args.methods if m != "ts2"]  # the reference of the intervals
    for name in methods:
        for n in args.intervals:
            t0 = time.perf_counter()
            if name.split(":")[0] in ("first", "calib", "calib2", "calib2t"):
                x = run_hooked(sw, name, args.warmup, n)
            else:
                if name.startswith("duca"):  # duca, duca:foca, duca:ts2 (DuCa's forecast option)
                    fc = {"": {}, "foca": {"forecast": "foca"},
                          "ts2": {"forecast": "taylorseer", "forecast_order": 2}}[name.partition(":")[2]]
                    cfg = sw.config(n, warmup=args.warmup, final=0, method="duca", method_options=fc)
                else:
                    cfg = sw.config(n, warmup=args.warmup, final=0, method=closed_method(name))
                x = sw.generate(cfg).x
            per[name, n] = sw.psnr_per_image(x)
            mean = sum(per[name, n]) / len(per[name, n])
            m, lo, hi = paired(per[name, n], per["ts2", n])
            rows.append(dict(method=name, N=n, psnr=mean, vs_ts2=[m, lo, hi], per_image=per[name, n]))
            print(f"{sw.name} {name:12s} N={n}: {mean:6.2f} dB, - ts2 {m:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(model=sw.name, samples=args.samples, warmup=args.warmup, rows=rows), f)


if __name__ == "__main__":
    main()
