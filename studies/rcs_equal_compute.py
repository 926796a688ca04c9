"""RCS against the fixed schedule at equal compute, the rule of docs/fidelity.md ("RCS against
the fixed schedule on four models"), applied to demo runs.

    foca-kernels demo --model M [--model-dir DIR] --methods foca-calibrated taylorseer2 foca-rcs \\
        --n 3 5 7 9 --samples 20 --threads 1 --out RUNS/M
    python studies/rcs_equal_compute.py RUNS/digits RUNS/mnist RUNS/textures RUNS/large

Per model and N: the PSNR of each run, the modules' skipped fraction (RCS computes at most as
many steps as the fixed schedule: its threshold is calibrated so), and RCS minus the better
fixed schedule at that N (by mean PSNR), paired over the same seeds, dB [95%]. Then the rule:
RCS is recommended only if that difference is >= -0.1 dB in every cell.
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

from foca_kernels.demo.harness import paired_psnr_difference

FIXED = ("foca-calibrated", "taylorseer2")
ADAPTIVE = "foca-rcs"
BAR = -0.1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="demo --out folders, one per model")
    args = ap.parse_args(argv)
    print(f"| model | N | {' | '.join(FIXED)} | {ADAPTIVE} | skipped, fixed / RCS | RCS minus the better fixed |")
    print("|---|---|" + "---|" * (len(FIXED) + 3))
    cells = []
    for folder in args.runs:
        runs = json.load(open(os.path.join(folder, "results.json")))["runs"]
        by = {(r["method"], r.get("interval")): r for r in runs}
        model = os.path.basename(os.path.normpath(folder))
        for n in sorted({r.get("interval") for r in runs if r.get("interval")}):
            fixed = {m: by[(m, n)] for m in FIXED}
            best = max(FIXED, key=lambda m: fixed[m]["psnr"])
            rcs = by[(ADAPTIVE, n)]
            d = paired_psnr_difference(SimpleNamespace(**rcs), SimpleNamespace(**fixed[best]))
            cells.append((d[0], model, n))
            psnrs = " | ".join(f"{fixed[m]['psnr']:.2f}" for m in FIXED)
            print(f"| {model} | {n} | {psnrs} | {rcs['psnr']:.2f} | {fixed[best]['skipped']:.2f} / "
                  f"{rcs['skipped']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] ({best}) |")
    below = [c for c in cells if c[0] < BAR]
    worst = min(cells)
    print(f"\ncells: {len(cells)}; RCS below the better fixed schedule by more than {-BAR} dB in {len(below)}; "
          f"above it by more than 0.5 dB in {sum(c[0] > 0.5 for c in cells)}; worst {worst[0]:+.2f} dB "
          f"({worst[1]} N={worst[2]}); recommended: {'yes' if not below else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
