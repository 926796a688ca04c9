"""The fused update as a torch custom op, so torch.compile traces it without graph breaks.

The op mutates the state allocation and the caller's output in place and returns nothing;
its fake implementation therefore has nothing to compute.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .aliasing import overlaps
from .torch_lincomb import lincomb_torch


@torch.library.custom_op("foca_kernels::lincomb_", mutates_args=("slots", "out"))
def lincomb_(
    slots: torch.Tensor,
    feature: Optional[torch.Tensor],
    out: Optional[torch.Tensor],
    n: int,
    reads: List[int],
    writes: List[int],
    coef: List[float],
    backend: str,
) -> None:
    for name, x in (("feature", feature), ("out", out)):
        if x is not None and overlaps(x, slots):
            raise ValueError(f"{name} aliases the state's own storage; pass a separate tensor")
    if backend == "triton":
        from .triton_lincomb import lincomb_triton  # imported late: see its docstring

        lincomb_triton(slots, feature, out, n, reads, writes, coef)
    elif backend == "torch":
        lincomb_torch(slots, feature, out, n, reads, writes, coef)
    else:
        raise ValueError(f"unknown backend {backend!r}")


@lincomb_.register_fake
def _(slots, feature, out, n, reads, writes, coef, backend) -> None:
    return None
