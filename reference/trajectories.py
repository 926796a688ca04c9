"""Drive a reference forecaster along a schedule of full and skipped steps."""

from __future__ import annotations

from typing import Callable, Sequence

from .foca import FoCaRef
from .reuse import ReuseRef
from .taylorseer import TaylorSeerRef


def make_ref(method: str = "foca", **options):
    if method == "foca":
        return FoCaRef(**options)
    if method == "taylorseer":
        return TaylorSeerRef(**options)
    if method in ("reuse", "fora"):
        return ReuseRef()
    raise ValueError(f"unknown method {method!r}")


def interval_schedule(n_steps: int, interval: int, warmup: int = 2) -> list:
    """True where a step is computed: the first ``warmup`` steps and every ``interval``-th."""
    return [i < warmup or i % interval == 0 for i in range(n_steps)]


def run_schedule(ref, values: Callable[[int], object], full: Sequence[bool], steps: Sequence[float]):
    """Outputs of ``ref`` along a schedule: values(i) at full steps, forecasts elsewhere.

    ``steps[i]`` is the step size from step i-1 to step i (steps[0] is ignored)."""
    outs = []
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            x = values(i)
            ref.full(x, h)
            outs.append(x)
        else:
            outs.append(ref.forecast(h))
    return outs
