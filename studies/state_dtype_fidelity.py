"""Fidelity of the cache state's storage dtype, closed loop (docs/fidelity.md, "State storage").

One demo run per state dtype (the model's float32, bfloat16, and float8_e4m3fn: 16-bit anchor
+ e4m3 increments) with the same seeds, then per N the paired difference of per-image PSNR
(against full compute) of each dtype minus the bfloat16 state, with its 95% interval (the
harness's statistic, foca_kernels.demo.harness.paired_psnr_difference).

    python studies/state_dtype_fidelity.py run --model digits --out demo-out-state-dtype   # 3 demo runs
    python studies/state_dtype_fidelity.py aggregate --out demo-out-state-dtype --model digits mnist

``run`` passes its other options to every demo run (defaults: --methods taylorseer2 --n 3 5 7 9
--samples 32 --threads 1 --no-progress); a run whose results.json exists is not repeated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
BASE = "bfloat16"
DEFAULT_ARGS = ["--methods", "taylorseer2", "--n", "3", "5", "7", "9", "--samples", "32", "--threads", "1",
                "--no-progress"]


def run_dir(out: Path, model: str, dtype: str) -> Path:
    return out / f"{model}_{dtype}"


def run(model: str, out: Path, extra) -> None:
    for dt in DTYPES:
        d = run_dir(out, model, dt)
        if (d / "results.json").exists():
            print(f"{d}: done already", flush=True)
            continue
        cmd = [sys.executable, "-m", "foca_kernels.cli", "demo", "--model", model, "--state-dtype", dt,
               "--out", str(d), *(extra or DEFAULT_ARGS)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def _runs(path: Path) -> dict:
    from foca_kernels.demo.harness import RunResult

    data = json.loads((path / "results.json").read_text())
    fields = set(RunResult.__dataclass_fields__)
    return {(r["method"], r["interval"]): RunResult(**{k: v for k, v in r.items() if k in fields})
            for r in data["runs"] if r["method"] != "full"}


def aggregate(models, out: Path) -> str:
    from foca_kernels.demo.harness import paired_psnr_difference

    lines = ["| model | N | PSNR dB: fp32 / bf16 / fp8 state | fp32 - bf16 (95% CI) | fp8 - bf16 (95% CI) |",
             "|---|---|---|---|---|"]
    for model in models:
        runs = {dt: _runs(run_dir(out, model, dt)) for dt in DTYPES}
        for key in sorted(runs[BASE]):
            method, n = key
            psnr = " / ".join(f"{runs[dt][key].psnr:.2f}" for dt in DTYPES)
            cells = []
            for dt in ("float32", "float8_e4m3fn"):
                m, lo, hi = paired_psnr_difference(runs[dt][key], runs[BASE][key])
                cells.append(f"{m:+.3f} ({lo:+.3f}, {hi:+.3f})")
            lines.append(f"| {model} ({method}) | {n} | {psnr} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("aggregate")
    a.add_argument("--model", nargs="+", required=True)
    a.add_argument("--out", type=Path, required=True)
    args, extra = ap.parse_known_args(argv)
    if args.cmd == "run":
        run(args.model, args.out, extra)
    else:
        if extra:
            ap.error(f"unknown arguments {extra}")
        print(aggregate(args.model, args.out))


if __name__ == "__main__":
    main()
