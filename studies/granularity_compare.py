"""Module against block granularity: paired PSNR differences between ``foca-kernels demo`` runs.

    foca-kernels demo --model digits --granularity module --methods taylorseer2 reuse foca-calibrated \
        --n 3 5 7 9 --samples 50 --threads 1 --out digits-module
    foca-kernels demo ... --granularity block --out digits-block
    foca-kernels demo ... --granularity block --compute-blocks 1 --out digits-block-f1
    python studies/granularity_compare.py digits-module digits-block digits-block-f1

The first folder is the reference (module granularity); every other run is compared with it
method by method and N by N: mean PSNR, the paired difference (same seeds, so the images pair
up) with its 95% interval, and the wall-clock and CPU speed-ups the demo measured. The runs must
agree on everything but granularity / compute_blocks (seeds, samples, steps, schedule, model).
``--markdown`` prints one table row per (method, N). Then, per comparison, the worst cell for
the default method, and per run the cost of a skipped step relative to a full one estimated from
the CPU speed-ups (``skip_cost``). ``--at-speed`` compares each reference cell with the best cell
of each other run that was at least as fast (CPU speed-up; single timings move with the load of
a shared machine, so use runs made with ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from foca_kernels.demo.harness import paired_psnr_difference
from foca_kernels.demo.method_table import canonical_method

SAME = ("intervals", "samples", "num_steps", "guidance_scale", "seed", "warmup", "final", "model")


def load(folder: str) -> dict:
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        d = json.load(f)
    cfg = d["config"]
    cb = tuple(cfg.get("compute_blocks") or (0, 0))
    d["label"] = cfg["granularity"] + (f" F{cb[0]}" if cb[0] else "") + (f" B{cb[1]}" if cb[1] else "")
    d["by"] = {(r["method"], r["interval"]): r for r in d["runs"] if r["interval"] not in (None, "")}
    return d


def pair(a: dict, b: dict):
    return paired_psnr_difference(SimpleNamespace(psnr_per_image=[float(x) for x in a["psnr_per_image"]]),
                                  SimpleNamespace(psnr_per_image=[float(x) for x in b["psnr_per_image"]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="demo --out folders; the first is the reference")
    ap.add_argument("--markdown", action="store_true", help="markdown table rows")
    ap.add_argument("--no-speed", action="store_true", help="leave the speed-ups out of the markdown table")
    ap.add_argument("--at-speed", action="store_true",
                    help="also compare at equal or better speed: for each reference cell, each other run's best "
                         "PSNR (same method, any N) among its cells with a CPU speed-up at least the reference's")
    ap.add_argument("--default", default="foca", help="method whose worst cell is reported (default: foca)")
    args = ap.parse_args(argv)
    runs = [load(f) for f in args.folders]
    ref = runs[0]
    for r in runs[1:]:
        diff = {k: (ref["config"][k], r["config"][k]) for k in SAME if ref["config"][k] != r["config"][k]}
        if diff:
            raise SystemExit(f"{r['label']} differs from {ref['label']} in more than granularity: {diff}")
    model = ref["config"]["model"]
    keys = [k for k in ref["by"] if all(k in r["by"] for r in runs[1:])]
    order = {m: i for i, m in enumerate(ref["config"]["methods"])}
    keys.sort(key=lambda k: (order.get(k[0], 99), k[1]))
    if args.markdown:
        labels = [r["label"] for r in runs]
        speed_head = "" if args.no_speed else " speed-up wall / CPU: " + " ; ".join(labels) + " |"
        print(f"| {model} | N | " + " | ".join(f"{lb} PSNR" for lb in labels) + " | "
              + " | ".join(f"{lb} - {labels[0]}" for lb in labels[1:]) + " |" + speed_head)
        print("|---" * (2 + len(labels) + len(labels) - 1 + (0 if args.no_speed else 1)) + "|")
    worst = {}
    for m, n in keys:
        cells = [r["by"][(m, n)] for r in runs]
        diffs = []
        for r, c in zip(runs[1:], cells[1:]):
            d, lo, hi = pair(c, cells[0])
            diffs.append((d, lo, hi))
            if m == canonical_method(args.default):
                w = worst.get(r["label"])
                if w is None or d < w[1]:
                    worst[r["label"]] = (n, d, lo, hi)
        speed = " ; ".join(f"{c['speedup']:.2f}x / {c['cpu_speedup']:.2f}x" for c in cells)
        if args.markdown:
            print(f"| {m} | {n} | " + " | ".join(f"{c['psnr']:.2f}" for c in cells) + " | "
                  + " | ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, lo, hi in diffs) + " |"
                  + ("" if args.no_speed else f" {speed} |"))
        else:
            print(f"{model} {m} N={n}: " + " / ".join(f"{r['label']} {c['psnr']:.2f}" for r, c in zip(runs, cells))
                  + " dB; " + "; ".join(f"{r['label']} - {ref['label']} {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                                       for r, (d, lo, hi) in zip(runs[1:], diffs))
                  + f"; speed-up (wall / CPU) {speed}")
    for label, (n, d, lo, hi) in worst.items():
        print(f"{model}: worst {label} - {ref['label']} for {canonical_method(args.default)}: N={n} "
              f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] dB")
    if args.at_speed:
        for m, n in keys:
            c = ref["by"][(m, n)]
            for r in runs[1:]:
                faster = [x for (mm, _), x in r["by"].items() if mm == m and x["cpu_speedup"] >= c["cpu_speedup"]]
                if not faster:
                    print(f"{model} {m}: {ref['label']} N={n} ({c['cpu_speedup']:.2f}x): no {r['label']} run as fast")
                    continue
                b = max(faster, key=lambda x: x["psnr"])
                d, lo, hi = pair(b, c)
                print(f"{model} {m}: {ref['label']} N={n} ({c['cpu_speedup']:.2f}x CPU, {c['psnr']:.2f} dB) against "
                      f"{r['label']} N={b['interval']} ({b['cpu_speedup']:.2f}x, {b['psnr']:.2f} dB): "
                      f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    for r in runs:
        costs = sorted(skip_cost(c) for c in (r["by"][k] for k in keys))
        print(f"{model} {r['label']}: skipped step / full step from the CPU speed-ups: "
              f"median {costs[len(costs) // 2]:.3f} (range {costs[0]:.3f} to {costs[-1]:.3f} over {len(costs)} runs)")
    return 0


def skip_cost(cell: dict) -> float:
    """Cost of a skipped step as a fraction of a full one, from the run's CPU speed-up S: the run
    took steps / S full-step units, F of them full steps, the other s skipped: (steps / S - F) / s."""
    pattern = cell["schedule"]
    full, skipped = pattern.count("F"), pattern.count("s")
    return (len(pattern) / cell["cpu_speedup"] - full) / skipped


if __name__ == "__main__":
    sys.exit(main())
