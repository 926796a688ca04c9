"""The fused update as a torch custom op, so torch.compile traces it without graph breaks.

The op mutates the state allocation and the caller's output in place and returns nothing;
its fake implementation therefore has nothing to compute. Eager callers skip the custom-op
dispatcher (~70 us per call on CPU) and call :func:`run_lincomb` directly.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .dispatch import run_lincomb
from .fit import run_fit


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
    run_lincomb(slots, feature, out, n, reads, writes, coef, backend)


@lincomb_.register_fake
def _(slots, feature, out, n, reads, writes, coef, backend) -> None:
    return None


@torch.library.custom_op("foca_kernels::fit_", mutates_args=("slots",))
def fit_(
    slots: torch.Tensor,
    numel: int,
    feature: Optional[torch.Tensor],
    slot: int,
    inputs: List[int],
    coef: List[float],
    bounds: List[float],
    sharded: bool,
    backend: str,
) -> None:
    """A refitted slope (ops/fit.py) as one opaque op: Dynamo would otherwise fold the step
    times into the traced arithmetic and guard on them."""
    run_fit(slots, numel, feature, slot, inputs, coef, bounds, sharded, backend)


@fit_.register_fake
def _(slots, numel, feature, slot, inputs, coef, bounds, sharded, backend) -> None:
    return None
