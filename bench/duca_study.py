"""DuCa variants on the shipped DiTs: PSNR of the final samples vs full compute, next to reuse,
at the package's default schedule (warm-up 2, final 0), closed loop. What each option of
DuCa's conservative step buys (docs/fidelity.md, "DuCa"); ``fresh 0`` must equal reuse (a
conservative step then recomputes nothing), which checks the bookkeeping.

    OMP_NUM_THREADS=1 python bench/duca_study.py --model mnist --samples 20
"""

import argparse
import time

import torch

import foca_kernels as fk
from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import sample
from foca_kernels.hooks import duca_info

VARIANTS = {
    "reuse": ("reuse", {}),
    "duca": ("duca", {}),
    "fresh 0": ("duca", {"fresh_ratio": 0.0}),
    "fresh 0.5": ("duca", {"fresh_ratio": 0.5}),
    "fresh 1 (ff recomputed, attention reused)": ("duca", {"fresh_ratio": 1.0, "ratio_schedule": "constant"}),
    "random score": ("duca", {"score": "random"}),
    "no bonuses": ("duca", {"staleness_weight": 0.0, "spatial_bonus": 0.0}),
    "constant ratio": ("duca", {"ratio_schedule": "constant"}),
    "alternate phases": ("duca", {"phase_order": "alternate"}),
    "forecast taylorseer-1": ("duca", {"forecast": "taylorseer", "forecast_order": 1}),
    "forecast taylorseer-2": ("duca", {"forecast": "taylorseer", "forecast_order": 2}),
    "taylorseer2": ("taylorseer", {"order": 2}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--n", type=int, nargs="+", default=[3, 5, 7, 9])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="V")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = load_demo_dit(a.model)
    labels = torch.arange(a.samples) % 10
    full = sample(m, labels, seed=0, num_steps=50)
    print(f"model {a.model}, {a.samples} samples, PSNR dB vs full compute (share of feed-forward token rows computed)")
    print("| variant | " + " | ".join(f"N={n}" for n in a.n) + " |")
    print("|---|" + "---|" * len(a.n))
    t0 = time.time()
    for label in a.variants:
        meth, opts = VARIANTS[label]
        row = []
        for n in a.n:
            with fk.cached(m, fk.CacheConfig(interval=n, method=meth, method_options=opts, num_inference_steps=50)):
                x = sample(m, labels, seed=0, num_steps=50)
                share = ""
                if meth == "duca":
                    info = duca_info(m)
                    share = f" ({info['tokens_computed'] / max(1, info['tokens_total']):.2f})"
            row.append(f"{float(psnr(x, full)):.2f}{share}")
        print(f"| {label} | " + " | ".join(row) + " |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
