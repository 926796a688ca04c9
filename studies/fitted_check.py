"""The fitted forecaster checked in closed loop: per cell of a worst-case grid, keep the fitted
weights only if the calibration batch, regenerated cached with them, is closer to its own full
compute than with TaylorSeer-2 (docs/fidelity.md, "The fitted forecaster, checked in closed
loop"). The check sees only the calibration batch (8 samples, the calibration seed); the
candidate's result in a cell is then that of the method picked, read from the grid's own runs
(same seeds, deterministic), so no judged sample is generated again.

    python studies/fitted_check.py --root GRID --models-dir MODELS > fitted_check.md

GRID: the output of ``studies/worst_case.py run ... --candidates taylorseer2 fitted-free ...``;
MODELS: where ``textures/`` and ``large/`` (studies/train_*.py) live.
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch

from foca_kernels.demo.harness import HarnessConfig, paired_psnr_difference
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.specs import resolve_spec

from fitted_confident import SETTINGS, check_cell

SHIPPED = ("digits", "mnist")


def check(model, cfg: HarnessConfig, n: int) -> tuple:
    """(picked method, fitted PSNR, TaylorSeer-2 PSNR) on the calibration batch: the check of
    studies/fitted_confident.py, picked by the higher mean."""
    _, scores = check_cell(model, cfg, n)
    got = {k: sum(v) / len(v) for k, v in scores.items()}
    pick = "fitted-free" if got["fitted-free"] > got["taylorseer2"] else "taylorseer2"
    return pick, got["fitted-free"], got["taylorseer2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=None, help="only these model folders of the grid")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, worst = [], None
    for name in sorted(os.listdir(args.root)):
        model_dir = None if name in SHIPPED else os.path.join(args.models_dir, name)
        if args.models and name not in args.models:
            continue
        if not os.path.isdir(os.path.join(args.root, name)) or model_dir and not os.path.isdir(model_dir):
            continue  # not a model's folder
        spec = resolve_spec(name, model_dir)
        model = load_demo_dit(spec.name, directory=model_dir)
        for setting, extra in SETTINGS.items():
            sdir = os.path.join(args.root, name, setting)
            if not os.path.isdir(sdir):
                continue
            for entry in sorted(os.listdir(sdir), key=lambda e: (len(e), e)):
                res = os.path.join(sdir, entry, "results.json")
                if not (entry.startswith("steps") and os.path.isfile(res)):
                    continue
                steps = int(entry[5:])
                runs = json.load(open(res))["runs"]
                by = {(r["method"], r.get("interval")): SimpleNamespace(psnr_per_image=r["psnr_per_image"])
                      for r in runs}
                cfg = HarnessConfig(model=name, model_dir=model_dir, num_steps=steps, **extra)
                for n in sorted({r.get("interval") for r in runs if r.get("interval")}):
                    pick, pf, pt = check(model, cfg, n)
                    d = paired_psnr_difference(by[(pick, n)], by[("taylorseer2", n)])
                    rows.append((name, setting, steps, n, pick, pf, pt, d))
                    if worst is None or d[0] < worst[-1][0]:
                        worst = rows[-1]
                    print(f"| {name} | {setting} | {steps} | {n} | {pick} | {pf:.2f} | {pt:.2f} | "
                          f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] |", flush=True)
    below = [r for r in rows if r[-1][0] < -0.1]
    print(f"\ncells: {len(rows)}; fitted kept in {sum(r[4] == 'fitted-free' for r in rows)}; "
          f"below TaylorSeer-2 by > 0.1 dB: {len(below)}; worst: {worst[-1][0]:+.2f} dB "
          f"({worst[0]} {worst[1]} {worst[2]} steps N={worst[3]})")
    for r in below:
        print(f"- {r[0]} {r[1]} {r[2]} steps N={r[3]}: {r[-1][0]:+.2f} [{r[-1][1]:+.2f}, {r[-1][2]:+.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
