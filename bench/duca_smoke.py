"""Smoke check of DuCa on the shipped digits DiT: PSNR of the final samples against full
compute, DuCa against reuse at the same interval (50 Euler steps, batched CFG, warm-up 2).
Not the fidelity harness (few samples, no FID): a quick sign that DuCa works end to end.

    python bench/duca_smoke.py [--samples 4] [--intervals 3 5] [--variants] [--others]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import foca_kernels as fk  # noqa: E402
from foca_kernels.demo.metrics import psnr  # noqa: E402
from foca_kernels.demo.model import load_digits_dit  # noqa: E402
from foca_kernels.demo.sampler import sample  # noqa: E402
from foca_kernels.hooks import duca_info  # noqa: E402

VARIANTS = {
    "duca": {},
    "duca-const": {"ratio_schedule": "constant"},
    "duca-alt": {"phase_order": "alternate"},
    "duca-random": {"score": "random"},
    "duca+ts1": {"forecast": "taylorseer", "forecast_order": 1},
    "duca+ts2": {"forecast": "taylorseer", "forecast_order": 2},
}

OTHERS = {"taylorseer1": ("taylorseer", {"order": 1}), "taylorseer2": ("taylorseer", {"order": 2})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--variants", action="store_true", help="also DuCa option variants")
    ap.add_argument("--others", action="store_true", help="also TaylorSeer-1/2 (forecasting peers, same N)")
    ap.add_argument("--forecast", action="store_true", help="also DuCa with TaylorSeer forecasts (beyond the paper)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_digits_dit()
    labels = [i % 10 for i in range(a.samples)]
    ref = sample(model, labels, seed=0, num_steps=a.steps)
    names = ["reuse"] + ([v for v in VARIANTS if "+" not in v] if a.variants else ["duca"])
    names += (list(OTHERS) if a.others else []) + (["duca+ts1", "duca+ts2"] if a.forecast else [])
    print(f"{a.samples} samples, {a.steps} steps, PSNR (dB) vs full compute")
    print("| N | " + " | ".join(names) + " |")
    for n in a.intervals:
        row, notes = [], []
        for name in names:
            method, opts = ("reuse", {}) if name == "reuse" else OTHERS[name] if name in OTHERS else ("duca", VARIANTS[name])
            fk.enable_cache(model, method=method, method_options=opts, interval=n, num_inference_steps=a.steps)
            x = sample(model, labels, seed=0, num_steps=a.steps)
            if method == "duca":
                d = duca_info(model)
                notes.append(f"{name}: {d['tokens_computed']}/{d['tokens_total']} ff token rows on conservative steps")
            fk.disable_cache(model)
            row.append(f"{float(psnr(x, ref)):.2f}")
        print(f"| {n} | " + " | ".join(row) + " |  " + "; ".join(notes))


if __name__ == "__main__":
    main()
