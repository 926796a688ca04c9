"""RCS readings on the shipped DiTs at equal compute: for each N, the fixed schedule's PSNR and
that of RCS variants whose threshold is calibrated (on the first 10 samples, as the harness does)
to compute as many steps of a generation as the fixed schedule (docs/method.md, "RFC").

    OMP_NUM_THREADS=1 python bench/rcs_study.py --model digits --samples 20
"""

import argparse
import time

import torch

import foca_kernels as fk
from foca_kernels.demo.harness import HarnessConfig, calibrate_rcs
from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import sample

VARIANTS = {
    "accumulated, max gap 2N": dict(rcs_accumulate=True),
    "per step, max gap 2N": dict(rcs_accumulate=False),
    "accumulated, max gap N+1": dict(rcs_accumulate=True, rcs_max_gap=None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--n", type=int, nargs="+", default=[3, 5, 7, 9])
    ap.add_argument("--methods", nargs="+", default=["foca", "rfc"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = load_demo_dit(a.model)
    labels = torch.arange(a.samples) % 10
    full = sample(m, labels, seed=0, num_steps=50)
    t0 = time.time()
    print(f"model {a.model}, {a.samples} samples, PSNR dB vs full compute (RCS: threshold calibrated to the "
          "fixed schedule's full steps; realised full steps in brackets)")
    print("| method | schedule | " + " | ".join(f"N={n}" for n in a.n) + " |")
    print("|---|---|" + "---|" * len(a.n))
    for meth in a.methods:
        row = []
        for n in a.n:
            cfg = fk.CacheConfig(interval=n, method=meth, num_inference_steps=50)
            with fk.cached(m, cfg):
                x = sample(m, labels, seed=0, num_steps=50)
            row.append(f"{float(psnr(x, full)):.1f} ({cfg.pattern(50).count('F')})")
        print(f"| {meth} | fixed | " + " | ".join(row) + " |", flush=True)
        for label, opts in VARIANTS.items():
            row = []
            for n in a.n:
                o = dict(opts)
                if "rcs_max_gap" in o:
                    o["rcs_max_gap"] = n + 1
                hc = HarnessConfig(methods=[f"{meth}-rcs"], intervals=[n], samples=a.samples, model=a.model,
                                   rcs_options=o, progress=False)
                th = calibrate_rcs(m, hc, f"{meth}-rcs", n, labels[:10])
                with fk.cached(m, hc.cache_config(f"{meth}-rcs", n, th)):
                    x = sample(m, labels, seed=0, num_steps=50)
                    pat = fk.cache_info(m).pattern
                row.append(f"{float(psnr(x, full)):.1f} ({pat.count('F')})")
            print(f"| {meth} | rcs {label} | " + " | ".join(row) + " |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
