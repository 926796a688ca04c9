"""Forecasting methods, each a set of step-size-dependent linear transitions over roles."""

from __future__ import annotations

from .base import FEATURE, Keep, Method, Same, StepContext, Transition
from .foca import ANCHORS, FoCa
from .foca_calibrated import FoCaCalibrated
from .foca_closed import FoCaClosed
from .fitted import Fitted
from .history import RawHistory
from .reuse import Reuse
from .rfc import RFC
from .taylorseer import TaylorSeer

METHOD_NAMES = ("foca", "taylorseer", "reuse", "rfc", "fitted")
FOCA_READINGS = ("r0", "r3", "r4", "r6", "r7", "calibrated")
DEFAULT_FOCA_READING = "calibrated"  # chosen by a rule fixed before its runs, on both shipped models: docs/fidelity.md
CLOSED_FOCA_READING = "r7"  # the default among the closed forms (where a method must be one: DuCa, RCS's probe)
R4_CONTRACTION = 0.5
RFC_FOCA_READING = "r7"  # RFE's default base, by RFE over r3 vs r7 on three trained DiTs (docs/fidelity.md, "RFC")


def make_foca(reading=None, **options) -> Method:
    """FoCa in one of its readings (docs/method.md): "r3" and "r6" restart every window from
    computed values (closed form over the last three), "r0" (``anchor=`` "secant" | "bdf2")
    and "r4" carry the previous window's forecast in."""
    reading = DEFAULT_FOCA_READING if reading is None else reading
    if reading not in FOCA_READINGS:
        raise ValueError(f"FoCa reading must be one of {FOCA_READINGS}, got {reading!r}")
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


def make_method(method="foca", **options) -> Method:
    """Build a method from its name and options, or pass a :class:`Method` through.

    ``make_method("foca", reading="r3")``, ``make_method("foca", reading="r0", anchor="bdf2")``,
    ``make_method("taylorseer", order=2)``,
    ``make_method("reuse")``; "fora" is an alias of "reuse".
    """
    if isinstance(method, Method):
        if options:
            raise TypeError("options given together with a Method instance")
        return method
    name = str(method).lower()
    if name == "foca":
        if "anchor" in options and "reading" not in options:
            options["reading"] = "r0"  # the anchor choice belongs to reading r0
        return make_foca(**options)
    if name == "taylorseer":
        return TaylorSeer(**options)
    if name == "rfc":  # RFE over a closed-form temporal method (methods/rfc.py)
        rfe = {k: options.pop(k) for k in ("norm", "estimate", "clip", "sharded") if k in options}
        base = options.pop("base", "foca")
        if str(base).lower() == "rfc":
            raise ValueError("rfc cannot wrap itself")
        if str(base).lower() == "foca" and "reading" not in options and "anchor" not in options:
            options["reading"] = RFC_FOCA_READING
        return RFC(make_method(base, **options), **rfe)
    if name == "fitted":  # TaylorSeer-2's terms, weights fitted per model (methods/fitted.py, hooks/calibration.py)
        if set(options) - {"weights", "pattern"}:
            raise TypeError(f"fitted takes only weights= and pattern=, got {sorted(options)}")
        return Fitted(**options)
    if name in ("reuse", "fora"):
        if options:
            raise TypeError(f"reuse takes no options, got {sorted(options)}")
        return Reuse()
    raise ValueError(f"unknown method {method!r}; expected one of {METHOD_NAMES}")


__all__ = [
    "ANCHORS", "CLOSED_FOCA_READING", "DEFAULT_FOCA_READING", "FEATURE", "FOCA_READINGS", "FoCa", "FoCaCalibrated",
    "FoCaClosed", "Fitted", "Keep", "RawHistory", "METHOD_NAMES", "Method", "RFC", "Reuse", "Same",
    "StepContext", "TaylorSeer", "Transition", "make_foca", "make_method",
]
