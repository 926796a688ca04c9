"""FoCa readings that restart every window from computed values, stored in closed form.

All keep the last three computed values X0, X1, X2 (times T0 > T1 > T2; see history.py)
and the anchor of eq. (8) is the secant between the last two full computes,
A = (X0 - X1) / (T0 - T1). Inside a window each skipped step at t = t_k + h applies the
paper's predictor (7), derivative (6) and corrector (8) to the two most recent values
F_k, F_{k-1} (times t_k, t_{k-1}) and a carried derivative D. (6) applied to (7)'s
output returns D itself, so the corrector is F_c = F_k + h/2 (A + D). The readings differ
in D and in what F_{k-1} is right after a full step (docs/method.md):

r3  D after a full step = (6) over X0, X1, X2 (the secant while only two exist);
    F_{k-1} = X1; after each corrector D <- (6) at (F_c, F_k, F_{k-1}) (the "derivative
    update" of Fig. 4).
r6  D = the secant of the two most recent values (as r0); F_{k-1} after a full step =
    the quadratic through X0, X1, X2 evaluated at the step before the full one (instead
    of r0's previous-window forecast, which carries that window's error in).
r7  D = (6) over X0, X1, X2 at the full step, as r3, but kept through the window: (6) sees
    computed values only, never the window's own forecasts. The forecasts then lie on the
    line X0 + x (A + D) / 2 (the mean of the two slope estimates).

The recursion runs on coefficient vectors over X0..X2 (memo); the tensors are read once
per skipped step.
"""

from __future__ import annotations

from .base import Combo, StepContext, added, scaled
from .history import RawHistory, bdf2_derivative, lagrange, secant

READINGS_CLOSED = ("r3", "r6", "r7")


class FoCaClosed(RawHistory):
    name = "foca"
    min_full = 2

    def __init__(self, reading: str = "r3"):
        if reading not in READINGS_CLOSED:
            raise ValueError(f"closed-form FoCa reading must be one of {READINGS_CLOSED}, got {reading!r}")
        super().__init__(3)
        self.reading = reading
        self.anchor = "secant"

    def describe(self) -> str:
        return f"foca(reading={self.reading})"

    def full_memo(self, ctx: StepContext):
        # the step before this full one: where r6 evaluates its restart value
        return {"t_before": ctx.t_prev}

    def _start(self, ctx: StepContext) -> dict:
        """The recursion's variables right after the last full step."""
        vals, times = self.history(ctx)
        a = secant(vals[0], times[0], vals[1], times[1])
        if self.reading in ("r3", "r7"):
            fkm1, tkm1 = vals[1], times[1]
            if len(vals) == 3:
                d = bdf2_derivative(vals[0], vals[1], vals[2], times[0] - times[1], times[1] - times[2])
            else:
                d = a
        else:  # r6
            tkm1 = ctx.memo["t_before"]
            fkm1 = lagrange(vals, times, tkm1)
            d = None  # r6 carries the secant of the two most recent values
        return {"a": a, "fk": vals[0], "tk": times[0], "fkm1": fkm1, "tkm1": tkm1, "d": d}

    def forecast(self, ctx: StepContext):
        v = ctx.memo if ctx.memo and "fk" in ctx.memo else self._start(ctx)
        h, h_prev = ctx.t - v["tk"], v["tk"] - v["tkm1"]
        d = v["d"] if self.reading in ("r3", "r7") else secant(v["fk"], v["tk"], v["fkm1"], v["tkm1"])
        fc: Combo = added(v["fk"], scaled(added(v["a"], d), 0.5 * h))  # (8) with (6) o (7) = D
        nxt = dict(v, fk=fc, tk=ctx.t, fkm1=v["fk"], tkm1=v["tk"])
        if self.reading == "r3":
            nxt["d"] = bdf2_derivative(fc, v["fk"], v["fkm1"], h, h_prev)
        return fc, nxt
