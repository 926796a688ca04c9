"""Study: does choosing the forecaster online, per module, from the error each candidate made on
the step just computed, beat every fixed forecaster in the worst case?

At every full step the true value of each cached module is computed anyway, so each candidate's
forecast of it (made from the history before that step) has a known error: free information. This
study keeps one cache state per candidate and module (``foca_kernels.allocate`` / ``update_`` /
``forecast``), forecasts with the candidate whose error was smallest at the latest full step (or
with an exponentially weighted error), and compares the final samples with full compute, against
each candidate used alone, on the same seeds. It is a prototype for the decision, not the package
path: it reads errors on the host (one sync per module and full step) and runs per module.

    python studies/select_proto.py --model digits --steps 20 50 --n 3 5 7 9 --samples 32
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Dict, List, Optional

import torch

import foca_kernels as fk
from foca_kernels.demo import specs
from foca_kernels.demo.harness import HarnessConfig
from foca_kernels.demo.method_table import cache_method
from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import sample
from foca_kernels.hooks import CacheConfig
from foca_kernels.hooks.targets import select_sites

CANDIDATES = {  # demo name -> (method, options), from the demo's table (checked against the registry)
    n: cache_method(n) for n in ("reuse", "taylorseer1", "taylorseer2", "foca-r7", "foca-calibrated")
}
PRIOR = ("taylorseer2", "foca-r7", "taylorseer1", "reuse")  # before any error is known
POOLS = {  # candidate sets for the selection
    "all": tuple(CANDIDATES),
    "closed": ("reuse", "taylorseer1", "taylorseer2", "foca-r7"),  # closed forms only: 3 stored values
}


class Clock:
    def __init__(self):
        self.step = -1
        self.full = True


class Slot:
    """One cached module: a state per candidate, the errors seen, the choice."""

    def __init__(self, pool: List[str], decay: float, margin: float = 1.0, anchor: str = "taylorseer2"):
        self.pool = pool
        self.decay = decay
        self.margin = margin  # leave the anchor only for an error below margin x the anchor's
        self.anchor = anchor
        self.states: Dict[str, fk.CacheState] = {}
        self.err: Dict[str, float] = {}
        self.choice: Optional[str] = None
        self.picks: Dict[str, int] = {}

    def full(self, x: torch.Tensor, t: float) -> None:
        if not self.states:
            for c in self.pool:
                m, o = CANDIDATES[c]
                self.states[c] = fk.allocate(x, m, **o)
        errs = {}
        for c, st in self.states.items():
            if st.n_full >= st.method.min_full:  # its forecast of this step, from before it
                f = fk.forecast(copy.deepcopy(st), t - st.t)
                errs[c] = float((f.double() - x.double()).pow(2).mean())
        if errs:  # shares of this window's total, so early (large) errors do not swamp later ones
            total = sum(errs.values()) or 1.0
            for c, e in errs.items():
                e = e / total
                self.err[c] = e if c not in self.err else self.decay * self.err[c] + e
        for st in self.states.values():
            fk.update_(st, x, 1.0 if st.t is None else t - st.t)
        ready = [c for c in self.pool if self.states[c].n_full >= self.states[c].method.min_full]
        known = [c for c in ready if c in self.err]
        if known:
            best = min(known, key=lambda c: (self.err[c], self.pool.index(c)))
            if (self.anchor and self.anchor in known and best != self.anchor
                    and not self.err[best] < self.margin * self.err[self.anchor]):
                best = self.anchor
            self.choice = best
        else:
            self.choice = next((c for c in PRIOR + tuple(self.pool) if c in ready), None)

    def skip(self, t: float) -> Optional[torch.Tensor]:
        if self.choice is None:
            return None
        st = self.states[self.choice]
        self.picks[self.choice] = self.picks.get(self.choice, 0) + 1
        return fk.forecast(st, t - st.t)


def run(model, labels, cfg: HarnessConfig, pattern: str, pool: List[str], decay: float, seed: int,
        margin: float = 1.0, anchor: str = "taylorseer2"):
    clock = Clock()
    slots: Dict[str, Slot] = {}
    sites = select_sites(model, CacheConfig())
    originals = []

    def wrap(site):
        orig = site.module.forward
        slot = slots.setdefault(site.name, Slot(pool, decay, margin, anchor))

        def forward(*a, **k):
            t = float(clock.step)
            if not clock.full:
                y = slot.skip(t)
                if y is not None:
                    return y
            y = orig(*a, **k)
            slot.full(y.detach(), t)
            return y

        site.module.forward = forward
        originals.append(site.module)

    for s in sites:
        wrap(s)
    root = model.forward

    def root_forward(*a, **k):
        clock.step += 1
        clock.full = pattern[clock.step] == "F"
        return root(*a, **k)

    model.forward = root_forward
    try:
        out = sample(model, labels, seed=seed, num_steps=len(pattern), guidance_scale=cfg.guidance_scale)
    finally:
        del model.forward
        for m in originals:
            del m.forward
    picks: Dict[str, int] = {}
    for s in slots.values():
        for c, n in s.picks.items():
            picks[c] = picks.get(c, 0) + n
    return out, picks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=[50])
    p.add_argument("--n", type=int, nargs="+", default=[3, 5, 7, 9])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--decay", type=float, nargs="+", default=[0.0])
    p.add_argument("--pools", nargs="+", default=["all"], choices=sorted(POOLS))
    p.add_argument("--margins", type=float, nargs="+", default=[1.0],
                   help="leave TaylorSeer-2 only for a candidate whose error is below margin x its error")
    p.add_argument("--only-select", action="store_true", help="skip the fixed candidates' runs")
    p.add_argument("--tie", choices=("anchor", "pool"), default="anchor",
                   help="equal errors (or, with --margins, not clearly lower ones) go to TaylorSeer-2 (anchor), "
                        "or to the first candidate in the pool's order (pool: no anchor at all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model_dir:
        specs.register_from_dir(args.model, args.model_dir) if hasattr(specs, "register_from_dir") else None
    model = load_demo_dit(args.model, directory=args.model_dir)
    labels = [i % 10 for i in range(args.samples)]
    cfg = HarnessConfig()
    fixed = list(CANDIDATES)
    for steps in args.steps:
        ref = sample(model, labels, seed=args.seed, num_steps=steps, guidance_scale=cfg.guidance_scale)
        for n in args.n:
            if n >= steps:
                continue
            pattern = CacheConfig(interval=n).pattern(steps)
            res = {}
            for c in (["taylorseer2"] if args.only_select else fixed):
                out, _ = run(model, labels, cfg, pattern, [c], 0.0, args.seed)
                res[c] = psnr(out, ref, reduction="none").double()
            for pool in args.pools:
                for d in args.decay:
                    for mg in args.margins:
                        anchor = "taylorseer2" if args.tie == "anchor" else ""
                        out, picks = run(model, labels, cfg, pattern, list(POOLS[pool]), d, args.seed, mg, anchor)
                        key = f"select-{pool}(decay={d},margin={mg},tie={args.tie})"
                        res[key] = psnr(out, ref, reduction="none").double()
                        res[key].picks = picks
            ts2 = res["taylorseer2"]
            best = max(float(v.mean()) for k, v in res.items() if k in fixed)  # of the fixed runs made
            print(f"\n{args.model} {steps} steps N={n} ({pattern.count('F')} full), {args.samples} samples")
            for k, v in res.items():
                dd = v - ts2
                m = float(dd.mean())
                half = 1.96 * float(dd.std(unbiased=True)) / math.sqrt(dd.numel()) if k != "taylorseer2" else 0.0
                extra = f"  picks {getattr(v, 'picks', '')}" if hasattr(v, "picks") else ""
                print(f"  {k:22s} {float(v.mean()):6.2f} dB  vs TS2 {m:+6.2f} [{m - half:+.2f}, {m + half:+.2f}]  "
                      f"regret {best - float(v.mean()):5.2f}{extra}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n{time.time() - t0:.0f} s")
