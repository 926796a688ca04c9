"""The fitted forecaster, kept only when its closed-loop check is confident: the validation of
docs/fidelity.md ("The fitted forecaster, kept only with confidence"), with the rule written
there before these runs.

Per cell (model, setting, step count, N) it records everything the rule and its alternatives
need, per sample, so the decision is applied by ``aggregate`` and nothing is generated twice:

* the judged batch (``--samples`` samples, labels i % 10, seed ``--seed``): full compute, then
  TaylorSeer-2 and the fitted forecaster (``fit="free"``) through the public hooks; PSNR of each
  sample against its own full compute;
* the calibration (``hooks.calibrate``) on 8 other samples (seed ``--seed`` + 1000003), and its
  closed-loop check: the same 8 samples generated again with the fitted weights and with
  TaylorSeer-2, PSNR per sample against the calibration's full compute.

    python studies/fitted_confident.py run --root OUT --model digits --setting euler-cfg --steps 25 --n 4 6 8
    python studies/fitted_confident.py run --root OUT --model textures --model-dir MODELS/textures ...
    python studies/fitted_confident.py recheck --grid GRID --models-dir MODELS --root OUT2 [--models NAME]
    python studies/fitted_confident.py aggregate --root OUT > fitted_confident.md

``recheck`` does the calibration and the check for every cell of an earlier grid
(``studies/worst_case.py run ... --candidates taylorseer2 fitted-free ...``) and takes the judged
per-sample PSNRs from that grid's runs (same seeds, deterministic), so the rule can be read on it
too. ``run`` writes ``OUT/<model>/<setting>/steps<S>/n<N>.json`` per cell (a cell that exists is
skipped, so a stopped run resumes). ``aggregate`` prints per cell the check's paired difference
on the calibration batch (mean and one-sided 95% lower bound), the method each rule keeps and
its mean difference to TaylorSeer-2 on the judged batch with a 95% interval, then per rule the
cells below the bar and the worst cell.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List

import torch

from foca_kernels.demo.harness import CALIBRATION_SEED_OFFSET, HarnessConfig
from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import sample
from foca_kernels.demo.specs import resolve_spec
from foca_kernels.hooks import cached, calibrate

SETTINGS = {"euler-cfg": {}, "uncond": {"unconditional": True}, "sampler-dpm": {"sampler": "dpm"}}
BAR = -0.1  # dB: the kept method's mean difference to TaylorSeer-2 in every cell
T95_ONE_SIDED = {7: 1.895}  # Student t, 0.95 quantile, by degrees of freedom (8 calibration samples)


def per_sample_psnr(x: torch.Tensor, ref: torch.Tensor) -> List[float]:
    return [float(v) for v in psnr(x, ref, reduction="none")]


def check_cell(model, cfg: HarnessConfig, n: int):
    """The calibration and its check: (fitted method options, {method: per-sample PSNR})."""
    gen = dict(num_steps=cfg.num_steps, **cfg.sample_options())
    cal_labels = torch.arange(cfg.calibration_samples) % 10
    cal_seed = cfg.seed + CALIBRATION_SEED_OFFSET
    with calibrate(model, cfg.cache_config("taylorseer2", n), fit="free") as cal:
        cal_ref = sample(model, cal_labels, seed=cal_seed, **gen)
    configs = {"fitted-free": cfg.cache_config("fitted-free", n, weights=cal.method_options),
               "taylorseer2": cfg.cache_config("taylorseer2", n)}
    scores = {}
    for name, config in configs.items():
        with cached(model, config):
            scores[name] = per_sample_psnr(sample(model, cal_labels, seed=cal_seed, **gen), cal_ref)
    return configs, scores


def run_cell(model, cfg: HarnessConfig, n: int, judged_ref: torch.Tensor, labels: torch.Tensor) -> dict:
    configs, scores = check_cell(model, cfg, n)
    out = {"n": n, "check": scores, "judged": {}}
    for name, config in configs.items():
        with cached(model, config):
            out["judged"][name] = per_sample_psnr(
                sample(model, labels, seed=cfg.seed, num_steps=cfg.num_steps, **cfg.sample_options()), judged_ref)
    return out


def save(path: str, cell: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(cell, f)
    os.replace(path + ".tmp", path)


def cmd_recheck(args) -> int:
    torch.set_num_threads(args.threads)
    for name in sorted(os.listdir(args.grid)):
        if args.models and name not in args.models:
            continue
        model_dir = None if name in ("digits", "mnist") else os.path.join(args.models_dir, name)
        if model_dir and not os.path.isdir(model_dir):
            continue
        model = load_demo_dit(resolve_spec(name, model_dir).name, directory=model_dir)
        for setting, extra in SETTINGS.items():
            sdir = os.path.join(args.grid, name, setting)
            for entry in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else ():
                res = os.path.join(sdir, entry, "results.json")
                if not (entry.startswith("steps") and os.path.isfile(res)):
                    continue
                steps = int(entry[5:])
                runs = json.load(open(res))["runs"]
                judged = {(r["method"], r.get("interval")): r["psnr_per_image"] for r in runs}
                folder = os.path.join(args.root, name, setting, entry)
                os.makedirs(folder, exist_ok=True)
                cfg = HarnessConfig(model=name, model_dir=model_dir, num_steps=steps, **extra)
                for n in sorted({r.get("interval") for r in runs if r.get("interval")}):
                    path = os.path.join(folder, f"n{n}.json")
                    if os.path.exists(path):
                        continue
                    _, scores = check_cell(model, cfg, n)
                    save(path, {"n": n, "check": scores, "model": name, "setting": setting, "steps": steps,
                                "seed": cfg.seed, "judged": {k: judged[(k, n)] for k in scores}})
                    print(f"{name} {setting} {steps} N={n} rechecked", flush=True)
    return 0


def cmd_run(args) -> int:
    torch.set_num_threads(args.threads)
    spec = resolve_spec(args.model, args.model_dir)
    model = load_demo_dit(spec.name, directory=args.model_dir)
    cfg = HarnessConfig(model=args.model, model_dir=args.model_dir, num_steps=args.steps, seed=args.seed,
                        samples=args.samples, **SETTINGS[args.setting])
    folder = os.path.join(args.root, args.model, args.setting, f"steps{args.steps}")
    os.makedirs(folder, exist_ok=True)
    labels = torch.arange(args.samples) % 10
    judged_ref = None
    for n in args.n:
        path = os.path.join(folder, f"n{n}.json")
        if os.path.exists(path):
            continue
        if judged_ref is None:
            judged_ref = sample(model, labels, seed=cfg.seed, num_steps=cfg.num_steps, **cfg.sample_options())
        cell = run_cell(model, cfg, n, judged_ref, labels)
        cell.update(model=args.model, setting=args.setting, steps=args.steps, seed=args.seed)
        save(path, cell)
        print(f"{args.model} {args.setting} {args.steps} N={n} done", flush=True)
    return 0


def paired(a: List[float], b: List[float]):
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    m = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return m, se


def keeps(rule: str, cell: dict) -> str:
    """The method a rule keeps in a cell, from the check on the calibration batch only."""
    m, se = paired(cell["check"]["fitted-free"], cell["check"]["taylorseer2"])
    if rule == "better":  # the earlier check: a higher mean PSNR
        ok = m > 0
    elif rule == "confident":  # the one-sided 95% lower bound of the paired difference above zero
        ok = m - T95_ONE_SIDED[len(cell["check"]["taylorseer2"]) - 1] * se > 0
    elif rule == "fitted":
        ok = True
    else:
        raise ValueError(rule)
    return "fitted-free" if ok else "taylorseer2"


def cells(root: str) -> List[dict]:
    found = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if f.startswith("n") and f.endswith(".json"):
                found.append(json.load(open(os.path.join(dirpath, f))))
    return sorted(found, key=lambda c: (c["model"], c["setting"], c["steps"], c["n"]))


def cmd_aggregate(args) -> int:
    found = cells(args.root)
    rules = ("confident", "better", "fitted")
    print("| model | setting | steps | N | check: fitted - TS-2, mean [one-sided 95% low] | kept (confident) | "
          "kept - TS-2, judged [95%] | kept (better) | kept - TS-2 | fitted alone - TS-2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary: Dict[str, list] = {r: [] for r in rules}
    for c in found:
        m, se = paired(c["check"]["fitted-free"], c["check"]["taylorseer2"])
        low = m - T95_ONE_SIDED[len(c["check"]["taylorseer2"]) - 1] * se
        row = [c["model"], c["setting"], str(c["steps"]), str(c["n"]), f"{m:+.2f} [{low:+.2f}]"]
        for r in rules:
            k = keeps(r, c)
            jm, jse = paired(c["judged"][k], c["judged"]["taylorseer2"]) if k != "taylorseer2" else (0.0, 0.0)
            summary[r].append((jm, k, c, jm - 1.96 * jse if k != "taylorseer2" else 0.0))
            if r == "fitted":
                row.append(f"{jm:+.2f}")
            else:
                row += [k, f"{jm:+.2f} [{jm - 1.96 * jse:+.2f}, {jm + 1.96 * jse:+.2f}]" if r == "confident"
                        else f"{jm:+.2f}"]
        print("| " + " | ".join(row) + " |")
    print()
    for r in rules:
        rows = summary[r]
        if not rows:
            continue
        worst = min(rows, key=lambda x: x[0])
        below = [x for x in rows if x[0] < BAR]
        wins = sum(x[0] > 0.5 for x in rows)
        print(f"- rule {r}: cells {len(rows)}, fitted kept in {sum(x[1] == 'fitted-free' for x in rows)}, "
              f"above TS-2 by > 0.5 dB in {wins} (interval above zero in {sum(x[3] > 0 for x in rows)}), "
              f"below the bar ({BAR} dB) in {len(below)}; worst "
              f"{worst[0]:+.2f} dB ({worst[2]['model']} {worst[2]['setting']} {worst[2]['steps']} steps "
              f"N={worst[2]['n']})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--root", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--model-dir", default=None)
    r.add_argument("--setting", choices=sorted(SETTINGS), default="euler-cfg")
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--n", type=int, nargs="+", required=True)
    r.add_argument("--seed", type=int, default=7)
    r.add_argument("--samples", type=int, default=32)
    r.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("recheck")
    c.add_argument("--grid", required=True)
    c.add_argument("--models-dir", required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--models", nargs="+", default=None)
    c.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("aggregate")
    a.add_argument("--root", required=True)
    args = ap.parse_args(argv)
    return {"run": cmd_run, "recheck": cmd_recheck, "aggregate": cmd_aggregate}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
