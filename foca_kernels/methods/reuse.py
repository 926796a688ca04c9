"""Plain reuse (FORA): a skipped step returns the last computed value."""

from __future__ import annotations

from .base import FEATURE, Keep, Method, StepContext, Transition


class Reuse(Method):
    name = "reuse"
    roles = ("D0",)
    n_slots = 1
    min_full = 1

    def full(self, ctx: StepContext) -> Transition:
        return Transition({"D0": {FEATURE: 1.0}})

    def skip(self, ctx: StepContext) -> Transition:
        return Transition({"D0": Keep("D0")}, out={"D0": 1.0})
