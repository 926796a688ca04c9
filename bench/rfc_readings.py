"""RFE readings on the shipped DiTs: PSNR of the final samples vs full compute for FoCa r3,
TaylorSeer-2 and RFC with per-token / per-sample norms and the "ratio" / "gain" estimates
(docs/method.md, "RFC"). Closed loop, the package's default schedule (warm-up 2, final 0).

    OMP_NUM_THREADS=1 python bench/rfc_readings.py --model digits --samples 20
"""

import argparse
import time

import torch

import foca_kernels as fk
from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import sample

VARIANTS = [
    ("foca r3", "foca", {}),
    ("taylorseer2", "taylorseer", {"order": 2}),
    ("rfc token ratio", "rfc", {"norm": "token", "estimate": "ratio"}),
    ("rfc sample ratio", "rfc", {"norm": "sample", "estimate": "ratio"}),
    ("rfc token gain", "rfc", {"norm": "token", "estimate": "gain"}),
    ("rfc sample gain", "rfc", {"norm": "sample", "estimate": "gain"}),
    ("rfc(ts2) sample ratio", "rfc", {"base": "taylorseer", "order": 2, "norm": "sample"}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--n", type=int, nargs="+", default=[3, 5, 7, 9])
    ap.add_argument("--clip", type=float, nargs="*", default=[])
    ap.add_argument("--only-clip", action="store_true", help="only the rfc sample ratio rows with --clip values")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = load_demo_dit(a.model)
    labels = torch.arange(a.samples) % 10
    full = sample(m, labels, seed=0, num_steps=50)
    variants = ([] if a.only_clip else list(VARIANTS)) + [(f"rfc sample ratio clip {c:g}", "rfc", {"norm": "sample", "clip": c}) for c in a.clip]
    print(f"model {a.model}, {a.samples} samples, PSNR dB vs full compute")
    print("| variant | " + " | ".join(f"N={n}" for n in a.n) + " |")
    print("|---|" + "---|" * len(a.n))
    t0 = time.time()
    for label, meth, opts in variants:
        row = []
        for n in a.n:
            with fk.cached(m, fk.CacheConfig(interval=n, method=meth, method_options=opts, num_inference_steps=50)):
                x = sample(m, labels, seed=0, num_steps=50)
            row.append(f"{float(psnr(x, full)):.1f}")
        print(f"| {label} | " + " | ".join(row) + " |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
