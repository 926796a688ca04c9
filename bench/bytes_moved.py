"""Tensors each method reads and writes per call, in its steady state (counted from the
launch the planner emits, so it is what the kernel moves), and bytes at two real sizes.

    python bench/bytes_moved.py            # prints the markdown table of docs/benchmarks.md

Steady state: the periodic pattern F F s F s F s, then the call counted (a skip after a skip,
or a full step after a skip), with unequal step sizes so no coefficient vanishes by symmetry.

A full step with a fit (FoCa "calibrated") adds the fit's traffic in its two-pass fused form:
pass 1 reads the distinct tensors of r, u, q (five dot products), pass 2 reads those of U, V
and writes the slope. ops/fit.py runs it as plain PyTorch ops, which move more (each
combination and product is a pass of its own): the column is the floor, not what runs today.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import foca_kernels as fk  # noqa: E402

METHODS = [
    ("foca calibrated (fitted weights, default)", "foca", {"reading": "calibrated"}),
    ("foca r7 (closed form)", "foca", {"reading": "r7"}),
    ("foca r3 (closed form)", "foca", {"reading": "r3"}),
    ("foca r6 (closed form)", "foca", {"reading": "r6"}),
    ("foca r4", "foca", {"reading": "r4"}),
    ("foca r0 (secant anchor)", "foca", {"reading": "r0"}),
    ("taylorseer-1", "taylorseer", {"order": 1}),
    ("taylorseer-2", "taylorseer", {"order": 2}),
    ("taylorseer-3", "taylorseer", {"order": 3}),
    ("reuse", "reuse", {}),
]
SIZES = {"DiT-XL/2 256px": 256 * 1152, "FLUX 1024px": 4608 * 3072}


def moved(method, opts):
    """(skip launch, full launch) in the steady state."""
    buf = fk.allocate(torch.zeros(8), method, **opts)
    hs = iter([1.0, 0.7, 1.3, 0.9, 1.1, 0.8, 1.2, 1.0])
    for kind in "FFsFsFs":
        if kind == "F":
            fk.update_(buf, torch.randn(8), next(hs))
        else:
            fk.forecast(buf, next(hs))
    h = next(hs)
    skip = buf.plan(buf.method.skip(buf.context(buf.t + h)), buf.t + h)
    full = buf.plan(buf.method.full(buf.context(buf.t + h)), buf.t + h)
    return skip, full, buf.method.n_slots


def fit_moved(full) -> int:
    """Tensors a two-pass fused fit moves (0 without a fit)."""
    return 0 if full.fit is None else full.fit.tensors_moved


def table(dtype=torch.bfloat16) -> str:
    size = torch.empty((), dtype=dtype).element_size()
    head = ("| method | state tensors | skip: read / write | full: read / write | tensors per skip | per full "
            "(+ fit) | "
            + " | ".join(f"MB per skip, {k} {str(dtype)[6:]}" for k in SIZES) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, method, opts in METHODS:
        skip, full, slots = moved(method, opts)
        sr, sw = len(skip.reads), len(skip.writes) + int(skip.has_out)
        fr, fw = len(full.reads) + int(full.has_feature), len(full.writes) + int(full.has_out)
        mb = " | ".join(f"{skip.tensors_moved * n * size / 1e6:.1f}" for n in SIZES.values())
        fit = fit_moved(full)
        lines.append(f"| {label} | {slots} | {sr} / {sw} | {fr} / {fw} | {skip.tensors_moved} | "
                     f"{full.tensors_moved - fit}{f' + {fit}' if fit else ''} | {mb} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
