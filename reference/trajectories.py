"""Drive a reference forecaster along a schedule of full and skipped steps."""

from __future__ import annotations

from typing import Callable, Sequence

from .foca import FoCaRef, FoCaRestartRef
from .fitted import FittedRef
from .foca_calibrated import FoCaCalibratedRef
from .reuse import ReuseRef
from .taylorseer import TaylorSeerRef


DEFAULT_READING = "calibrated"  # must match foca_kernels.methods.DEFAULT_FOCA_READING (a test checks it)


def make_ref(method: str = "foca", **options):
    if method == "foca":
        reading = options.pop("reading", None)
        reading = reading or ("r0" if "anchor" in options else DEFAULT_READING)
        if reading in ("r3", "r6", "r7"):
            return FoCaRestartRef(reading)
        if reading == "calibrated":
            return FoCaCalibratedRef()
        if reading == "r4":
            return FoCaRef("secant", contraction=options.get("contraction", 0.5))
        return FoCaRef(**options)
    if method == "taylorseer":
        return TaylorSeerRef(**options)
    if method in ("reuse", "fora"):
        return ReuseRef()
    if method == "fitted":
        return FittedRef(**options)
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
