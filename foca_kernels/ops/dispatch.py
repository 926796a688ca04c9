"""Run one fused update on the chosen backend (the body of the custom op)."""

from __future__ import annotations

from .aliasing import overlaps
from .torch_lincomb import lincomb_torch


def run_lincomb(slots, feature, out, n, reads, writes, coef, backend) -> None:
    for name, x in (("feature", feature), ("out", out)):
        if x is not None and overlaps(x, slots):
            raise ValueError(f"{name} aliases the state's own storage; pass a separate tensor")
    run_lincomb_checked(slots, feature, out, n, reads, writes, coef, backend)


def run_lincomb_checked(slots, feature, out, n, reads, writes, coef, backend) -> None:
    """run_lincomb for callers that have refused aliasing inputs already."""
    if backend == "triton":
        from .triton_lincomb import lincomb_triton  # imported late: see its docstring

        lincomb_triton(slots, feature, out, n, reads, writes, coef)
    elif backend == "torch":
        lincomb_torch(slots, feature, out, n, reads, writes, coef)
    else:
        raise ValueError(f"unknown backend {backend!r}")
