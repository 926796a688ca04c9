"""Tensors each method reads and writes per call, in its steady state (counted from the
launch the planner emits, so it is what the kernel moves), and bytes at two real sizes.

    python bench/bytes_moved.py            # prints the markdown tables of docs/benchmarks.md

Steady state: the periodic pattern F F s F s F s, then the call counted (a skip after a skip,
or a full step after a skip), with unequal step sizes so no coefficient vanishes by symmetry.

A full step with a fit (FoCa "calibrated") adds the fit's traffic in its two-pass fused form:
pass 1 reads the distinct tensors of r, u, q (five dot products), pass 2 reads those of U, V
and writes the slope. ops/fit.py runs it as plain PyTorch ops, which move more (each
combination and product is a pass of its own): the column is the floor, not what runs today.
"""

from __future__ import annotations

import torch

import foca_kernels as fk
from foca_kernels.fp8 import FP8_DTYPE, Fp8State  # noqa: E402
from foca_kernels.methods import make_foca

METHODS = [
    ("foca calibrated (fitted weights, default)", "foca", {"reading": "calibrated"}),
    ("foca r7 (closed form)", "foca", {"reading": "r7"}),
    ("foca r3 (closed form)", "foca", {"reading": "r3"}),
    ("foca r6 (closed form; study reading)", make_foca(reading="r6"), {}),  # study readings: as a Method
    ("foca r4 (study reading)", make_foca(reading="r4"), {}),
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


FP8_METHODS = [
    ("taylorseer-1", "taylorseer", {"order": 1}),
    ("taylorseer-2 (default)", "taylorseer", {"order": 2}),
    ("taylorseer-3", "taylorseer", {"order": 3}),
    ("foca r7 (closed form)", "foca", {"reading": "r7"}),
]
ROWS = {"DiT-XL/2 256px": (256, 1152), "FLUX 1024px": (4608, 3072)}  # (tokens, channels) of one stream


def skip_bytes(method, opts, tokens: int, channels: int, state_dtype, io_dtype=torch.bfloat16) -> int:
    """Bytes one skipped step of one stream moves in the steady state: the stored tensors its
    launch reads (for the fp8 state: the anchor, the e4m3 increments with a nonzero coefficient
    and their per-token float32 scales) plus the forecast it writes in the io dtype."""
    x = torch.zeros(2, 8, dtype=io_dtype)
    buf = fk.allocate(x, method, dtype=state_dtype, **opts)
    hs = iter([1.0, 0.7, 1.3, 0.9, 1.1, 0.8, 1.2, 1.0])
    for kind in "FFsFsFs":
        if kind == "F":
            fk.update_(buf, torch.randn(2, 8, dtype=io_dtype), next(hs))
        else:
            fk.forecast(buf, next(hs))
    h = next(hs)
    skip = buf.plan(buf.method.skip(buf.context(buf.t + h)), buf.t + h)
    n = tokens * channels
    out = n * torch.empty((), dtype=io_dtype).element_size()
    if isinstance(buf, Fp8State):
        a0, terms = buf.skip_terms(skip)
        anchor = n * torch.empty((), dtype=buf.anchor_dtype).element_size() if a0 != 0.0 else 0
        return anchor + len(terms) * (n + 4 * tokens) + out
    return len(skip.reads) * n * torch.empty((), dtype=state_dtype).element_size() + out


def fp8_table(io_dtype=torch.bfloat16) -> str:
    """The fp8 state against the bf16 state, per skipped step of one stream."""
    head = ("| method | " + " | ".join(f"MB per skip, {k}: bf16 / fp8 state" for k in ROWS)
            + " | fp8 / bf16 (with the output write) | fp8 / bf16 (stored tensors read) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, method, opts in FP8_METHODS:
        cells, ratio = [], None
        for tokens, channels in ROWS.values():
            b16 = skip_bytes(method, opts, tokens, channels, torch.bfloat16, io_dtype)
            b8 = skip_bytes(method, opts, tokens, channels, FP8_DTYPE, io_dtype)
            out = tokens * channels * torch.empty((), dtype=io_dtype).element_size()
            cells.append(f"{b16 / 1e6:.2f} / {b8 / 1e6:.2f}")
            ratio = (b8 / b16, (b8 - out) / (b16 - out))  # the last size's (the largest)
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio[0]:.3f} | {ratio[1]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    if FP8_DTYPE is not None:
        print()
        print(fp8_table())
