"""Compare the FoCa readings with TaylorSeer and reuse on analytic trajectories (float64
reference implementations, no kernels). Prints the two tables quoted in docs/method.md.

    PYTHONPATH=. python studies/study_readings.py

``reference/`` (the tests' oracle) lives in the checkout and is not installed: run from the
repository root with it on the path, as above.
"""

from __future__ import annotations

import math

import torch

try:
    from reference import interval_schedule, make_ref, run_schedule
except ModuleNotFoundError as e:
    if e.name != "reference":
        raise
    raise SystemExit("study_readings needs reference/ from the checkout: run it from the repository root as "
                     "PYTHONPATH=. python studies/study_readings.py") from None

METHODS = [
    ("reuse", {}),
    ("taylorseer", {"order": 1}),
    ("taylorseer", {"order": 2}),
    ("foca", {"anchor": "secant"}),
    ("foca", {"anchor": "bdf2"}),
]
TRAJECTORIES = {
    "sin": lambda t: torch.tensor([math.sin(0.1 * t), math.cos(0.07 * t) + 0.3 * math.sin(0.2 * t)]),
    "exp": lambda t: torch.tensor([math.exp(-0.05 * t), math.exp(-0.2 * t)]),
    "quadratic": lambda t: torch.tensor([0.001 * t * t - 0.05 * t]),
}


def label(method, opts):
    return method + "".join(f" {v}" for v in opts.values())


def schedule_table(n_steps=60, skip_first=20):
    # The first window after warm-up is identical for all but reuse (two adjacent full
    # computes: every method is a linear extrapolation), so it is left out of the maximum.
    print(f"max |forecast - truth| over unit steps {skip_first}..{n_steps - 1}, full at steps 0, 1 and every N-th")
    print("| trajectory | N | " + " | ".join(label(*m) for m in METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for name, f in TRAJECTORIES.items():
        for n in (2, 3, 5, 7, 9):
            full = interval_schedule(n_steps, n, warmup=2)
            cells = []
            for method, opts in METHODS:
                outs = run_schedule(make_ref(method, **opts), lambda i: f(float(i)), full, [1.0] * n_steps)
                cells.append(max((outs[i] - f(float(i))).abs().max().item() for i in range(skip_first, n_steps)))
            print(f"| {name} | {n} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")


def stability_table(lam=-1.0, h=0.1, ks=(1, 5, 10, 20, 40, 60)):
    print(f"\n|error| after k consecutive forecasts on y' = {lam} y, step {h}, after enough full steps")
    methods = METHODS[:3] + [("taylorseer", {"order": 3})] + METHODS[3:]
    print("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    f = lambda t: torch.tensor([math.exp(lam * t)])  # noqa: E731
    for method, opts in methods:
        ref = make_ref(method, **opts)
        n_full = 4
        for i in range(n_full):
            ref.full(f(i * h), h)
        t0 = (n_full - 1) * h
        errs = [abs(ref.forecast(h) - f(t0 + k * h)).item() for k in range(1, max(ks) + 1)]
        print(f"| {label(method, opts)} | " + " | ".join(f"{errs[k - 1]:.3g}" for k in ks) + " |")


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    schedule_table()
    stability_table()
