"""The default by its worst case: the grid of docs/fidelity.md ("The default by its worst case")
and the rule written before its runs, applied mechanically.

    python studies/worst_case.py run --name digits --root /work/grid                  # every setting the CLI has
    python studies/worst_case.py run --name mnist --root /work/grid --steps 20 50 100 # a part of it
    python studies/worst_case.py run --name patches --demo-args "--model patches" --root /work/grid
    python studies/worst_case.py aggregate --root /work/grid > worst_case.md

``run`` makes one ``foca-kernels demo`` run per (model, setting, step count), all five candidates
(``foca-calibrated foca-r7 taylorseer2 taylorseer1 reuse``) at N = 3, 5, 7, 9 (only N below the
step count), 32 samples (seeds 0..31), one torch thread, the default schedule (warm-up 2, final
0) and module granularity, into ``<root>/<model>/<setting>/steps<S>/`` (the demo's ``--out``:
``results.json`` and the rest). A folder that already holds ``results.json`` is skipped, so a
stopped grid resumes where it stopped; a run is written to ``steps<S>.tmp`` and renamed when the
demo succeeded, its output goes to ``steps<S>.log``, and a run that failed leaves
``steps<S>.failed`` (it is retried by the next ``run``). Settings: ``euler-cfg`` (the default
sampler and guidance; 20, 30, 40, 50 and 100 steps), ``uncond`` (``--unconditional``, 50 steps)
and ``sampler-<name>`` (``--sampler <name>``, 50 steps); the last two only when
``foca-kernels demo --help`` lists the option (``--sampler``'s choices other than the default
give the names).

A *cell* of the rule is one (model, setting, step count, N): at a fixed N every candidate
computes the same steps, so each cell is an equal-compute comparison. ``aggregate`` reads every
run under ``--root`` and prints, in markdown: per cell the PSNR of each candidate and its paired
difference to TaylorSeer-2 (same seeds, 95% interval); the default against TaylorSeer-2,
TaylorSeer-1 and reuse in one compact row per (model, setting, steps); per candidate the worst
mean difference to TaylorSeer-2 and the worst-case regret (largest over the cells of the best
candidate's mean PSNR minus its own), each with its cell; then the rule:

1. a candidate meets the bar if its mean difference to TaylorSeer-2 is >= -0.1 dB in every cell;
2. among those, the smallest worst-case regret wins; regrets within 0.1 dB of the smallest are a
   tie, broken in favour of the current default (``foca-calibrated``), then of fewer stored
   tensors (reuse 1 < taylorseer1 2 < foca-r7 = taylorseer2 3 < foca-calibrated 4);
3. every cell where another candidate beats the chosen one by more than 0.5 dB with its paired
   interval above zero.

Cells of the expected grid (every model found, every setting the runs show the CLI had, every
step count, every N below it) that have no result are listed as missing; a run whose config is
not the grid's (samples, methods, schedule, granularity) is refused, not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from foca_kernels.demo.harness import paired_psnr_difference  # noqa: E402

CANDIDATES = ("foca-calibrated", "foca-r7", "taylorseer2", "taylorseer1", "reuse")
DEFAULT = "taylorseer2"  # the package default (docs/fidelity.md, "The default by its worst case")
REFERENCE = "taylorseer2"
TENSORS = {"reuse": 1, "taylorseer1": 2, "foca-r7": 3, "taylorseer2": 3, "foca-calibrated": 4, "fitted": 3,
           "fitted-free": 3}
LABEL = {"foca-calibrated": "calibrated", "foca-r7": "r7", "taylorseer2": "TS-2", "taylorseer1": "TS-1",
         "reuse": "reuse", "fitted": "fitted", "fitted-free": "fitted-free"}
INTERVALS = (3, 5, 7, 9)
SAMPLES = 32
STEPS = (20, 30, 40, 50, 100)
SIDE_STEPS = 50  # the unconditional and second-sampler settings
BASE_SETTING = "euler-cfg"
BAR = -0.1  # dB, mean difference to TaylorSeer-2 in every cell
TIE = 0.1  # dB, regrets this close are a tie
LOSS = 0.5  # dB, rule 3: cells where another candidate beats the chosen one by more


# ---------------------------------------------------------------------------------------
# running

def demo_help() -> str:
    out = subprocess.run([sys.executable, "-m", "foca_kernels.cli", "demo", "--help"], capture_output=True,
                         text=True, check=True)
    return out.stdout


def side_settings(help_text: str) -> List[Tuple[str, List[str]]]:
    """(setting, demo arguments) of the 50-step side settings the CLI offers now."""
    out = []
    if "--unconditional" in help_text:
        out.append(("uncond", ["--unconditional"]))
    if "--sampler" in help_text:
        choices = _choices(help_text, "--sampler")
        try:  # the default sampler as the package names it
            from foca_kernels.demo.sampler import DEFAULT_SAMPLER as default
        except ImportError:
            default = _default_choice(help_text, "--sampler")
        if default is None:
            raise SystemExit("cannot tell the default --sampler from `foca-kernels demo --help`")
        for c in choices:
            if c != default:
                out.append((f"sampler-{c}", ["--sampler", c]))
    return out


def _choices(help_text: str, option: str) -> List[str]:
    import re

    m = re.search(re.escape(option) + r"\s+\{([^}]*)\}", help_text)
    return [c.strip() for c in m.group(1).split(",")] if m else []


def _default_choice(help_text: str, option: str) -> Optional[str]:
    """The option's default as its help text states it ("default: X" / "(default X)" / "X (default)")."""
    import re

    i = help_text.find(option)
    block = " ".join(help_text[i:i + 600].split()) if i >= 0 else ""
    nxt = re.search(r"\s--[a-z]", block[len(option):])
    block = block[:len(option) + nxt.start()] if nxt else block
    m = re.search(r"default[:=]?\s+'?([A-Za-z0-9_-]+)", block) or re.search(r"([A-Za-z0-9_-]+)\s*\(default", block)
    return m.group(1) if m else None


def cell_dir(root: str, name: str, setting: str, steps: int) -> str:
    return os.path.join(root, name, setting, f"steps{steps}")


def run_one(root: str, name: str, demo_args: List[str], setting: str, extra: List[str], steps: int,
            samples: int = SAMPLES, dry: bool = False) -> str:
    """One demo run; returns 'done' (already there), 'ok', 'failed' or 'dry'."""
    out = cell_dir(root, name, setting, steps)
    if os.path.exists(os.path.join(out, "results.json")):
        return "done"
    ns = [n for n in INTERVALS if n < steps]
    tmp, log, failed = out + ".tmp", out + ".log", out + ".failed"
    cmd = [sys.executable, "-m", "foca_kernels.cli", "demo", *demo_args, *extra, "--methods", *CANDIDATES,
           "--n", *map(str, ns), "--samples", str(samples), "--steps", str(steps), "--threads", "1",
           "--no-progress", "--out", tmp]
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"[{time.strftime('%H:%M:%S')}] {name}/{setting}/steps{steps}: {line}", flush=True)
    if dry:
        return "dry"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"# {line}\n# code: {_code_version()}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).returncode
    if rc != 0 or not os.path.exists(os.path.join(tmp, "results.json")):
        with open(failed, "w", encoding="utf-8") as f:
            f.write(f"rc {rc}; see {log}\n")
        print(f"  FAILED (rc {rc}) after {time.time() - t0:.0f}s; log {log}", flush=True)
        return "failed"
    with open(os.path.join(tmp, "command.txt"), "w", encoding="utf-8") as f:
        f.write(line.replace(tmp, out) + f"\n# code: {_code_version()}\n")
    os.rename(tmp, out)
    if os.path.exists(failed):
        os.remove(failed)
    print(f"  ok in {time.time() - t0:.0f}s", flush=True)
    return "ok"


def _code_version() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                              ).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "foca_kernels"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" (foca_kernels modified)" if dirty else "")
    except OSError:
        return "unknown"


def plan(steps: List[int], settings: List[Tuple[str, List[str]]], only: Optional[List[str]]):
    """(setting, extra args, steps) in run order: the base setting first at 20, 50, 100 (so a
    model gets its widest coverage first), then the side settings at 50, then the other steps."""
    first = [s for s in (20, 50, 100) if s in steps]
    rest = [s for s in steps if s not in first]
    jobs = [(BASE_SETTING, [], s) for s in first]
    jobs += [(name, extra, SIDE_STEPS) for name, extra in settings]
    jobs += [(BASE_SETTING, [], s) for s in rest]
    return [j for j in jobs if only is None or j[0] in only]


def cmd_run(args) -> int:
    demo_args = shlex.split(args.demo_args) if args.demo_args else ["--model", args.name]
    settings = side_settings(demo_help()) if not args.no_side else []
    jobs = plan(args.steps, settings, args.settings)
    status = []
    for setting, extra, steps in jobs:
        status.append((setting, steps, run_one(args.root, args.name, demo_args, setting, extra, steps,
                                              samples=args.samples, dry=args.dry_run)))
    failed = [f"{s}/steps{n}" for s, n, st in status if st == "failed"]
    print(f"{args.name}: " + ", ".join(f"{s}/steps{n} {st}" for s, n, st in status))
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------
# aggregating

Cell = Tuple[str, str, int, int]  # (model, setting, steps, N)


def load_runs(root: str) -> Tuple[Dict[Tuple[str, str, int], dict], List[str]]:
    """Every finished run under root, keyed (model, setting, steps); and the problems found."""
    runs, problems = {}, []
    for model in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        mdir = os.path.join(root, model)
        if not os.path.isdir(mdir):
            continue
        for setting in sorted(os.listdir(mdir)):
            sdir = os.path.join(mdir, setting)
            if not os.path.isdir(sdir):
                continue
            for entry in sorted(os.listdir(sdir)):
                path = os.path.join(sdir, entry)
                if entry.endswith(".failed"):
                    problems.append(f"{model}/{setting}/{entry[:-7]}: the last run failed ({path})")
                if not (entry.startswith("steps") and entry[5:].isdigit() and os.path.isdir(path)):
                    continue
                f = os.path.join(path, "results.json")
                if not os.path.exists(f):
                    problems.append(f"{model}/{setting}/{entry}: no results.json")
                    continue
                with open(f, encoding="utf-8") as fh:
                    d = json.load(fh)
                bad = _check_config(d["config"], int(entry[5:]))
                if bad:
                    problems.append(f"{model}/{setting}/{entry}: not a grid run ({bad}); not counted")
                    continue
                runs[(model, setting, int(entry[5:]))] = d
    return runs, problems


def _check_config(cfg: dict, steps: int) -> str:
    bad = []
    if cfg.get("num_steps") != steps:
        bad.append(f"num_steps {cfg.get('num_steps')}")
    if cfg.get("samples", 0) < SAMPLES:
        bad.append(f"samples {cfg.get('samples')}")
    if cfg.get("warmup") != 2 or cfg.get("final") != 0:
        bad.append(f"schedule warm-up {cfg.get('warmup')} final {cfg.get('final')}")
    if cfg.get("granularity") != "module" or any(cfg.get("compute_blocks") or (0, 0)):
        bad.append(f"granularity {cfg.get('granularity')} {cfg.get('compute_blocks')}")
    missing = [m for m in CANDIDATES if m not in cfg.get("methods", ())]
    if missing:
        bad.append(f"methods without {missing}")
    return ", ".join(bad)


def _per_image(run: dict) -> List[float]:
    return [float(x) for x in run["psnr_per_image"]]


def _mean(v: List[float]) -> float:
    return sum(v) / len(v)


def pair(a: dict, b: dict) -> Tuple[float, float, float]:
    """Paired PSNR difference a - b (the harness's statistic): mean and 95% interval, dB."""
    return paired_psnr_difference(SimpleNamespace(psnr_per_image=_per_image(a)),
                                  SimpleNamespace(psnr_per_image=_per_image(b)))


def cells_of(runs) -> Tuple[Dict[Cell, Dict[str, dict]], List[str]]:
    """Per cell, each candidate's run; and the cells lacking a candidate."""
    cells, problems = {}, []
    for (model, setting, steps), d in runs.items():
        for n in d["config"]["intervals"]:
            by = {r["method"]: r for r in d["runs"] if r["interval"] == n}
            lack = [m for m in CANDIDATES if m not in by]
            if lack:
                problems.append(f"{model}/{setting}/steps{steps} N={n}: no run of {lack}")
                continue
            nonfinite = {m: by[m].get("nonfinite", 0) for m in CANDIDATES if by[m].get("nonfinite", 0)}
            if nonfinite:
                problems.append(f"{model}/{setting}/steps{steps} N={n}: samples with non-finite values "
                                f"(judged clipped): {nonfinite}")
            computed = {m: by[m].get("calls_computed") for m in CANDIDATES}
            if len(set(computed.values())) > 1:
                problems.append(f"{model}/{setting}/steps{steps} N={n}: the candidates computed different numbers "
                                f"of module calls (not equal compute): {computed}")
            cells[(model, setting, steps, n)] = {m: by[m] for m in CANDIDATES}
    return cells, problems


def expected_cells(runs, cells) -> List[Cell]:
    """The grid the runs found imply: every model, the base setting at every step count, every
    side setting any model's runs have at 50 steps, every N below the step count."""
    models = sorted({k[0] for k in runs} | {k[0] for k in cells})
    sides = sorted({k[1] for k in runs if k[1] != BASE_SETTING})
    out = []
    for m in models:
        for s in STEPS:
            out += [(m, BASE_SETTING, s, n) for n in INTERVALS if n < s]
        for side in sides:
            out += [(m, side, SIDE_STEPS, n) for n in INTERVALS if n < SIDE_STEPS]
    return out


def fmt_d(d: Tuple[float, float, float]) -> str:
    return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def cell_name(c: Cell) -> str:
    return f"{c[0]} {c[1]} {c[2]} steps N={c[3]}"


def analyse(cells: Dict[Cell, Dict[str, dict]]):
    """Per candidate: worst difference to TaylorSeer-2 (value, interval, cell), worst-case regret
    (value, cell); per cell the mean PSNRs and the differences."""
    mean = {c: {m: _mean(_per_image(r)) for m, r in by.items()} for c, by in cells.items()}
    diff = {c: {m: pair(by[m], by[REFERENCE]) for m in CANDIDATES if m != REFERENCE} for c, by in cells.items()}
    worst, regret = {}, {}
    for m in CANDIDATES:
        if m == REFERENCE:
            worst[m] = ((0.0, 0.0, 0.0), None)
        else:
            c = min(cells, key=lambda c: diff[c][m][0])
            worst[m] = (diff[c][m], c)
        c = max(cells, key=lambda c: max(mean[c].values()) - mean[c][m])
        regret[m] = (max(mean[c].values()) - mean[c][m], c)
    return mean, diff, worst, regret


def decide(worst, regret) -> Tuple[Optional[str], List[str]]:
    """The rule, step by step; returns the choice and the reasoning lines."""
    lines = []
    meets = [m for m in CANDIDATES if worst[m][0][0] >= BAR]
    for m in CANDIDATES:
        (d, _, _), c = worst[m]
        if m == REFERENCE:
            lines.append(f"- {m}: meets the bar by construction")
        else:
            lines.append(f"- {m}: worst mean difference to TaylorSeer-2 {d:+.2f} dB ({cell_name(c)}): "
                         + ("meets the bar" if d >= BAR else f"fails the bar ({BAR:+.1f} dB)"))
    if not meets:
        return None, lines + ["No candidate meets the bar."]
    best = min(regret[m][0] for m in meets)
    tied = [m for m in meets if regret[m][0] <= best + TIE]
    lines.append(f"Meet the bar: {', '.join(meets)}. Worst-case regrets: "
                 + ", ".join(f"{m} {regret[m][0]:.2f} dB" for m in meets)
                 + f". Smallest {best:.2f}; within {TIE} dB of it: {', '.join(tied)}.")
    if len(tied) == 1:
        choice = tied[0]
        lines.append(f"Decision: {choice} (the smallest worst-case regret, no tie).")
    elif DEFAULT in tied:
        choice = DEFAULT
        lines.append(f"Decision: {choice} (tie broken in favour of the current default).")
    else:
        fewest = min(TENSORS[m] for m in tied)
        few = [m for m in tied if TENSORS[m] == fewest]
        choice = min(few, key=lambda m: regret[m][0])
        lines.append(f"Decision: {choice} (tie broken by stored tensors: "
                     + ", ".join(f"{m} {TENSORS[m]}" for m in tied)
                     + (f"; {', '.join(few)} store equally many, the smaller regret taken" if len(few) > 1 else "")
                     + ").")
    return choice, lines


def cmd_aggregate(args) -> int:
    runs, problems = load_runs(args.root)
    cells, more = cells_of(runs)
    problems += more
    expected = expected_cells(runs, cells)
    missing = [c for c in expected if c not in cells]
    if not cells:
        print("no finished runs under", args.root)
        return 1
    mean, diff, worst, regret = analyse(cells)
    order = sorted(cells, key=lambda c: (c[0], c[1] != BASE_SETTING, c[1], c[2], c[3]))
    samples = sorted({runs[c[:3]]["config"]["samples"] for c in cells})

    print(f"# The default by its worst case: {len(cells)} cells of {len(expected)} expected "
          f"({len(runs)} demo runs, {', '.join(map(str, samples))} samples each)\n")
    if missing:
        print(f"**Missing cells ({len(missing)}):** " + "; ".join(cell_name(c) for c in missing) + "\n")
    for p in problems:
        print(f"- {p}")
    if problems:
        print()

    if not args.no_cells:
        print("## Per cell: PSNR dB and paired difference to TaylorSeer-2, dB [95%]\n")
        others = [m for m in CANDIDATES if m != REFERENCE]
        print("| model | setting | steps | N | " + " | ".join(LABEL[m] for m in CANDIDATES) + " | "
              + " | ".join(f"{LABEL[m]} − TS-2" for m in others) + " | best |")
        print("|---" * (5 + len(CANDIDATES) + len(others)) + "|")
        for c in order:
            best = max(CANDIDATES, key=lambda m: mean[c][m])
            print(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | " + " | ".join(f"{mean[c][m]:.2f}" for m in CANDIDATES)
                  + " | " + " | ".join(fmt_d(diff[c][m]) for m in others) + f" | {LABEL[best]} |")
        print()

    keys = sorted({c[:3] for c in cells}, key=lambda k: (k[0], k[1] != BASE_SETTING, k[1], k[2]))
    head = "| model | setting | steps | " + " | ".join(f"N = {n}" for n in INTERVALS) + " |"
    rule = "|---" * (3 + len(INTERVALS)) + "|"
    print("## Mean PSNR dB of each candidate, N = " + " / ".join(map(str, INTERVALS)) + "\n")
    print("| model | setting | steps | " + " | ".join(LABEL[m] for m in CANDIDATES) + " |")
    print("|---" * (3 + len(CANDIDATES)) + "|")
    for key in keys:
        ns = [(*key, n) for n in INTERVALS]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
            " / ".join(f"{mean[c][m]:.1f}" if c in cells else "-" for c in ns) for m in CANDIDATES) + " |")
    print()
    for other in ("taylorseer2", "taylorseer1", "reuse"):
        print(f"## The default minus {other}: mean paired difference dB [95%]\n")
        print(head)
        print(rule)
        for key in keys:
            ns = [(*key, n) for n in INTERVALS]
            print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
                (fmt_d(pair(cells[c][DEFAULT], cells[c][other])) if c in cells else
                 ("missing" if c in expected else "-")) for c in ns) + " |")
        print()

    print("## Per candidate: worst case and worst-case regret over all cells\n")
    print("| candidate | stored tensors | worst mean difference to TS-2, dB [95%] | cell | worst-case regret dB | cell "
          "| cells below TS-2 by > 0.1 dB |")
    print("|---|---|---|---|---|---|---|")
    for m in CANDIDATES:
        (d, c), (g, gc) = worst[m], regret[m]
        below = sum(1 for cc in cells if m != REFERENCE and diff[cc][m][0] < BAR)
        print(f"| {m} | {TENSORS[m]} | " + ("(reference)" if m == REFERENCE else fmt_d(d)) + " | "
              + ("-" if c is None else cell_name(c)) + f" | {g:.2f} | {cell_name(gc)} | {below} of {len(cells)} |")
    print()

    choice, lines = decide(worst, regret)
    print("## The rule applied\n")
    for line in lines:
        print(line)
    print()
    for m in [x for x in (choice, DEFAULT) if x] if choice != DEFAULT else [DEFAULT]:
        loses, by_other = [], {o: 0 for o in CANDIDATES if o != m}
        for c in order:
            beats = []
            for o in CANDIDATES:
                if o == m:
                    continue
                d = pair(cells[c][o], cells[c][m])
                if d[0] > LOSS and d[1] > 0:
                    beats.append(f"{o} {fmt_d(d)}")
                    by_other[o] += 1
            if beats:
                loses.append(f"{cell_name(c)}: " + "; ".join(beats))
        print(f"Cells where another candidate beats {m} by more than {LOSS} dB (paired interval above zero): "
              f"{len(loses)} of {len(cells)} (" + ", ".join(f"{o} in {k}" for o, k in by_other.items()) + ")")
        for line in loses:
            print(f"- {line}")
        print()
    if missing:
        print(f"The decision above is over {len(cells)} cells; {len(missing)} expected cells are missing.")
    return 0


def main(argv=None) -> int:
    global CANDIDATES, DEFAULT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the missing grid runs of one model")
    r.add_argument("--name", required=True, help="model name (the folder under --root)")
    r.add_argument("--demo-args", default=None,
                   help="demo arguments that select the model (default: '--model <name>')")
    r.add_argument("--root", required=True, help="output root (outside the repository)")
    r.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="step counts of the base setting")
    r.add_argument("--settings", nargs="+", default=None,
                   help="only these settings (euler-cfg, uncond, sampler-<name>)")
    r.add_argument("--no-side", action="store_true", help="only the base setting")
    r.add_argument("--samples", type=int, default=SAMPLES)
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = sub.add_parser("aggregate", help="tables, worst cases and the rule over every finished run")
    a.add_argument("--root", required=True)
    a.add_argument("--no-cells", action="store_true", help="leave out the per-cell table")
    a.add_argument("--default", default=None,
                   help=f"the candidate the 'default minus' tables and the tie-break use (default: {DEFAULT})")
    for p in (r, a):
        p.add_argument("--candidates", nargs="+", default=None,
                       help=f"demo method names compared (default: {' '.join(CANDIDATES)}); taylorseer2 must be one")
    args = ap.parse_args(argv)
    if getattr(args, "default", None):
        DEFAULT = args.default
    if args.candidates:
        if REFERENCE not in args.candidates:
            ap.error(f"--candidates must include {REFERENCE}, the reference of the bar")
        CANDIDATES = tuple(args.candidates)
    return cmd_run(args) if args.command == "run" else cmd_aggregate(args)


if __name__ == "__main__":
    sys.exit(main())
