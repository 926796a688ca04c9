"""Forecasting methods, each a set of step-size-dependent linear transitions over roles.

By name, with their options parsed once: foca_kernels/registry.py (``make_method``). RFC's
method is foca_kernels/rfc/, DuCa's foca_kernels/duca/ (both built on these)."""

from __future__ import annotations

from .base import FEATURE, Keep, Method, Same, StepContext, Transition
from .foca import ANCHORS, FoCa
from .foca_calibrated import FoCaCalibrated
from .foca_closed import FoCaClosed
from .fitted import Fitted
from .history import RawHistory
from .reuse import Reuse
from .taylorseer import TaylorSeer

FOCA_READINGS = ("r0", "r3", "r7", "calibrated")
"""The public readings, the ones ``method="foca"`` takes by name: each has a measured reason to
choose it (docs/method.md, "Which reading to choose")."""
FOCA_STUDY_READINGS = ("r4", "r6")
"""Readings kept for studies only: no measured reason to choose them (docs/method.md). Refused by
name; built as a Method with :func:`make_foca` (``make_foca(reading="r6")``), which every call
that takes a method accepts in place of a name."""
DEFAULT_FOCA_READING = "calibrated"  # chosen by a rule fixed before its runs, on both shipped models: docs/fidelity.md
CLOSED_FOCA_READING = "r7"  # the default among the closed forms (where a method must be one: DuCa, RCS's probe)
R4_CONTRACTION = 0.5


def make_foca(reading=None, **options) -> Method:
    """FoCa in one of its readings (docs/method.md), public or study: "r3", "r6" and "r7"
    restart every window from computed values (closed form over the last three), "r0"
    (``anchor=`` "secant" | "bdf2") and "r4" carry the previous window's forecast in,
    "calibrated" fits the corrector's slope weights at every full step. The method names
    (foca_kernels/registry.py) take the public readings only; this builds the study readings
    too (:data:`FOCA_STUDY_READINGS`)."""
    reading = DEFAULT_FOCA_READING if reading is None else reading
    if reading not in FOCA_READINGS + FOCA_STUDY_READINGS:
        raise ValueError(f"FoCa reading must be one of {FOCA_READINGS} (study readings: {FOCA_STUDY_READINGS}), "
                         f"got {reading!r}")
    if reading == "calibrated":
        if set(options) - {"sharded"}:
            raise TypeError(f"FoCa reading calibrated takes only sharded=, got {sorted(options)}")
        return FoCaCalibrated(**options)
    if reading in ("r3", "r6", "r7"):
        if options:
            raise TypeError(f"FoCa reading {reading} takes no options, got {sorted(options)}")
        return FoCaClosed(reading)
    if reading == "r4":
        if set(options) - {"contraction"}:
            raise TypeError(f"FoCa reading r4 takes only contraction=, got {sorted(options)}")
        return FoCa(anchor="secant", contraction=options.get("contraction", R4_CONTRACTION))
    if "contraction" in options:
        raise TypeError("contraction= is an option of reading r4")
    return FoCa(**options)


__all__ = [
    "ANCHORS", "CLOSED_FOCA_READING", "DEFAULT_FOCA_READING", "FEATURE", "FOCA_READINGS", "FOCA_STUDY_READINGS", "FoCa",
    "FoCaCalibrated", "FoCaClosed", "Fitted", "Keep", "RawHistory", "Method", "Reuse", "Same", "StepContext",
    "TaylorSeer", "Transition", "make_foca",
]
