"""Forecasting methods, each a set of step-size-dependent linear transitions over roles."""

from __future__ import annotations

from .base import FEATURE, Keep, Method, Same, StepContext, Transition
from .foca import ANCHORS, FoCa
from .reuse import Reuse
from .taylorseer import TaylorSeer

METHOD_NAMES = ("foca", "taylorseer", "reuse")


def make_method(method="foca", **options) -> Method:
    """Build a method from its name and options, or pass a :class:`Method` through.

    ``make_method("foca", anchor="bdf2")``, ``make_method("taylorseer", order=2)``,
    ``make_method("reuse")``; "fora" is an alias of "reuse".
    """
    if isinstance(method, Method):
        if options:
            raise TypeError("options given together with a Method instance")
        return method
    name = str(method).lower()
    if name == "foca":
        return FoCa(**options)
    if name == "taylorseer":
        return TaylorSeer(**options)
    if name in ("reuse", "fora"):
        if options:
            raise TypeError(f"reuse takes no options, got {sorted(options)}")
        return Reuse()
    raise ValueError(f"unknown method {method!r}; expected one of {METHOD_NAMES}")


__all__ = [
    "ANCHORS", "FEATURE", "FoCa", "Keep", "METHOD_NAMES", "Method", "Reuse", "Same",
    "StepContext", "TaylorSeer", "Transition", "make_method",
]
