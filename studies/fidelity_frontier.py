"""PSNR against compute: every (method, warm-up, final, N) on a shipped demo DiT, closed loop.

    python studies/fidelity_frontier.py --model digits --out frontier-digits.json
    python studies/fidelity_frontier.py --model mnist --samples 50 --out frontier-mnist.json
    python studies/fidelity_frontier.py --report frontier-digits.json frontier-mnist.json
    python studies/fidelity_frontier.py --compact frontier-digits.json more-digits.json  # best per compute

Each cached run samples the same seeds as the full-compute run (50 Euler steps, batched CFG,
module granularity) through ``foca_kernels.hooks.cached``; per-image PSNR against full
compute is stored, so paired confidence intervals between any two runs can be computed
later (``--report``). "compute" is the number of fully computed steps per cached module
(warm-up, one per window, the final ones, and steps forced while a method is not ready);
DuCa's conservative calls add the fraction of token rows they recompute.
The ``steps`` baseline samples with fewer Euler steps at each compute level.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from foca_kernels.demo.method_table import cache_method, canonical_method

from sweep import Sweep, add_arguments

METHODS = ("reuse", "taylorseer1", "taylorseer2", "foca-r0", "foca-r3", "foca-r4", "foca-r6")


def run(args) -> dict:
    sw = Sweep.from_args(args)
    rows_per_call = 2 * args.samples * sw.spec.tokens  # token rows of one model call (batched CFG)
    rows = []
    done_steps = set()
    for method in args.methods:
        method = canonical_method(method)
        m, opts = cache_method(method)
        for w in args.warmups:
            for fin in args.finals:
                for n in args.intervals:
                    r = sw.generate(sw.config(n, warmup=w, final=fin, method=m, method_options=opts))
                    compute = r.info.calls_computed / r.info.modules
                    if m == "duca":  # partially computed calls count by the fraction of token rows run
                        compute += r.tokens["tokens_computed"] / rows_per_call / r.info.modules
                    per = sw.psnr_per_image(r.x)
                    rows.append(dict(method=method, warmup=w, final=fin, N=n, compute=compute,
                                     psnr=sum(per) / len(per), per_image=[round(v, 4) for v in per],
                                     seconds=round(r.seconds, 2)))
                    print(f"{sw.name} {method:12s} W={w} final={fin} N={n}: compute {compute:.1f} "
                          f"PSNR {rows[-1]['psnr']:.2f} dB ({r.seconds:.1f}s)", flush=True)
                    k = round(compute)
                    if args.fewer_steps and k not in done_steps and 2 <= k < args.steps:
                        done_steps.add(k)
                        per = sw.psnr_per_image(sw.uncached(k))
                        rows.append(dict(method="steps", warmup=0, final=0, N=None, compute=float(k),
                                         psnr=sum(per) / len(per), per_image=[round(v, 4) for v in per]))
    return dict(model=sw.name, samples=args.samples, steps=args.steps, seed=args.seed, threads=args.threads,
                full_seconds=round(sw.full_seconds, 2), rows=rows,
                command="python studies/fidelity_frontier.py " + " ".join(sys.argv[1:]))


def frontier(rows, method):
    """Upper envelope of PSNR over compute for one method: [(compute, psnr, row)]."""
    pts = sorted(((r["compute"], r["psnr"], r) for r in rows if r["method"] == method), key=lambda p: (p[0], -p[1]))
    env, best = [], -math.inf
    for c, p, r in pts:
        if p > best:
            env.append((c, p, r))
            best = p
    return env


def envelope_at(env, c):
    """PSNR of an upper envelope at compute c (linear between its points; None outside)."""
    if not env or c < env[0][0] - 1e-9:
        return None
    for (c0, p0, _), (c1, p1, _) in zip(env, env[1:]):
        if c0 - 1e-9 <= c <= c1 + 1e-9:
            return p0 if c1 == c0 else p0 + (p1 - p0) * (c - c0) / (c1 - c0)
    return env[-1][1] if abs(c - env[-1][0]) < 1e-9 else env[-1][1]  # at or past the last point


def schedules(rows):
    return sorted({(r["warmup"], r["final"]) for r in rows if r["method"] != "steps"})


def report(paths, candidates, rivals=("taylorseer2", "reuse")) -> str:
    """Markdown: per model, PSNR by schedule; then, per candidate (method, warm-up, final),
    its margin over each rival at the same schedule and over the rival's best schedule at
    equal compute (upper envelope over every warm-up/final/N measured)."""
    docs = [json.load(open(p)) for p in paths]
    out = []
    for doc in docs:
        rows = doc["rows"]
        out.append(f"### {doc['model']}: {doc['samples']} samples, `{doc['command']}`\n")
        ns = sorted({r["N"] for r in rows if r["N"] is not None})
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "steps"]
        for w, f in schedules(rows):
            out.append(f"warm-up {w}, final {f}: PSNR dB (compute = full steps)\n")
            out.append("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
            out.append("|---|" + "---|" * len(ns))
            for m in methods:
                cells = []
                for n in ns:
                    r = next((r for r in rows if (r["method"], r["warmup"], r["final"], r["N"]) == (m, w, f, n)), None)
                    cells.append("-" if r is None else f"{r['psnr']:.2f} ({r['compute']:.0f})")
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
    out.append("### candidates: margin in dB (min over N of the candidate minus the rival)\n")
    out.append("| candidate | " + " | ".join(f"{d['model']}: vs {r} same schedule | {d['model']}: vs {r} frontier"
                                            for d in docs for r in rivals) + " |")
    out.append("|---|" + "---|" * (2 * len(docs) * len(rivals)))
    for m, w, f in candidates:
        cells = []
        for doc in docs:
            rows = doc["rows"]
            mine = [r for r in rows if (r["method"], r["warmup"], r["final"]) == (m, w, f)]
            for rival in rivals:
                same, front = [], []
                env = frontier(rows, rival)
                for r in mine:
                    key = (rival, w, f, r["N"])
                    o = next((x for x in rows if (x["method"], x["warmup"], x["final"], x["N"]) == key), None)
                    if o is not None:
                        same.append(r["psnr"] - o["psnr"])
                    e = envelope_at(env, r["compute"])
                    if e is not None:
                        front.append(r["psnr"] - e)
                cells.append(f"{min(same):+.2f}" if same else "-")
                cells.append(f"{min(front):+.2f}" if front else "-")
        out.append(f"| {m} W={w} final={f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def compact(paths, rival="taylorseer2") -> str:
    """Markdown, per model: each method's best PSNR at every number of full steps (over every
    warm-up/final/N measured, with the (warm-up, final, N) of the best), then each method's
    worst margin to ``rival`` at the compute levels both have. Sweep files of one model are
    merged (a later file's row replaces an earlier one's for the same run)."""
    models: dict = {}
    for p in paths:
        doc = json.load(open(p))
        m = models.setdefault(doc["model"], {"samples": doc["samples"], "rows": {}})
        for r in doc["rows"]:
            m["rows"][(r["method"], r["warmup"], r["final"], r["N"], r["compute"] if r["N"] is None else None)] = r
    out = []
    for model, m in models.items():
        best: dict = {}  # method -> {compute: row}
        for r in m["rows"].values():
            c = r["compute"]
            if c != int(c):
                continue  # DuCa's fractional compute has no equal-compute rival
            b = best.setdefault(r["method"], {})
            if int(c) not in b or r["psnr"] > b[int(c)]["psnr"]:
                b[int(c)] = r
        levels = sorted({c for b in best.values() for c in b})
        out.append(f"**{model}** ({m['samples']} samples): best PSNR (dB) over every warm-up/final/N with exactly "
                   "this many full steps; (warm-up, final, N) of the best\n")
        out.append("| method | " + " | ".join(map(str, levels)) + " |")
        out.append("|---|" + "---|" * len(levels))
        for meth, b in best.items():
            cells = []
            for c in levels:
                r = b.get(c)
                cells.append("-" if r is None else f"{r['psnr']:.1f}" + ("" if r["N"] is None else
                                                                             f" ({r['warmup']},{r['final']},{r['N']})"))
            out.append(f"| {meth} | " + " | ".join(cells) + " |")
        out.append("")
        if rival in best:
            out.append(f"worst margin to {rival}'s best at equal compute (dB, at full steps):")
            for meth, b in best.items():
                if meth in (rival, "steps"):
                    continue
                d = [(b[c]["psnr"] - best[rival][c]["psnr"], c) for c in b if c in best[rival]]
                if d:
                    worst = min(d)
                    above = sum(1 for v, _ in d if v >= 0)
                    out.append(f"- {meth}: {worst[0]:+.2f} ({worst[1]}); at or above at {above} of {len(d)} levels")
            out.append("")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), samples=100,
                       intervals=range(2, 10), threads=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--warmups", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--finals", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--no-fewer-steps", dest="fewer_steps", action="store_false")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the tables of these sweep files instead")
    ap.add_argument("--compact", nargs="+", metavar="JSON",
                    help="print each method's best PSNR per number of full steps (sweep files merged per model)")
    ap.add_argument("--candidates", nargs="+", metavar="METHOD:W:F", default=None,
                    help="defaults to judge in --report (e.g. foca-r3:3:1); default: every FoCa reading x schedule")
    args = ap.parse_args(argv)
    if args.compact:
        print(compact(args.compact))
        return 0
    if args.report:
        if args.candidates:
            cands = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.candidates]
        else:
            rows = json.load(open(args.report[0]))["rows"]
            cands = [(m, w, f) for m in dict.fromkeys(r["method"] for r in rows) if m.startswith("foca")
                     for w, f in schedules(rows)]
        print(report(args.report, cands))
        return 0
    res = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
