"""FoCa, reading "calibrated": eq. (8)'s two slope weights fitted from the data at each full step.

Every line-exact forecast over the last three computed values is X0 + x (phi A + theta (D - A))
(x = t - T0; A the secant anchor of eq. (8), D eq. (6) at the full step; r7 is phi = 1,
theta = 1/2). Here (phi, theta) are refitted at every full step, by least squares over the
whole tensor, on how the window that just ended would have extrapolated to the new value
(reference/foca_calibrated.py states the rule; docs/method.md derives it; docs/fidelity.md
measures it). The weights are data, so they are solved on the device, and only their product
with the slopes is stored:

roles  X0, X1, X2   the last three computed values (newest first)
       Y            the window's slope, phi A + theta (D - A)
full   X0 <- feature, X1, X2 re-pointed; Y refitted in place (a :class:`Fit`, run before the
       copy: it reads the feature and the old X0..X2), or r7's slope while fewer than four
       computed values exist; r7's slope too when the fit's sums are not finite (a nan/inf in
       one element stays in that element)
skip   out = X0 + x Y: 2 reads, 1 write, the state does not move (TaylorSeer-2: 3 reads)
"""

from __future__ import annotations

from .base import FEATURE, Combo, Fit, Keep, Method, StepContext, Transition, added, scaled
from .history import bdf2_derivative, secant

PHI_RANGE = (0.0, 1.5)  # set before any measurement (docs/fidelity.md); reference/ pins the same
THETA_RANGE = (0.0, 1.0)
R7_WEIGHTS = (1.0, 0.5)  # (phi, theta) of reading r7: before four values exist, and when the fit's sums
# are not finite (a nan/inf in the data: docs/method.md, "Non-finite features")


def _slopes(vals, times):
    """(A, D) over the newest three of vals (D = A while only two exist), as combinations."""
    a = secant(vals[0], times[0], vals[1], times[1])
    if len(vals) < 3:
        return a, a
    return a, bdf2_derivative(vals[0], vals[1], vals[2], times[0] - times[1], times[1] - times[2])


def _minus(a: Combo, b: Combo) -> dict:
    return added(a, scaled(b, -1.0))


class FoCaCalibrated(Method):
    name = "foca"
    reading = "calibrated"
    roles = ("X0", "X1", "X2", "Y")
    n_slots = 4
    min_full = 2

    def __init__(self, sharded: bool = False):
        if not isinstance(sharded, bool):
            raise TypeError(f"foca reading calibrated: sharded must be a bool, got {type(sharded).__name__}")
        self.sharded = sharded  # tokens split over the default process group: fit on the whole

    def describe(self) -> str:
        return "foca(reading=calibrated" + (", sharded)" if self.sharded else ")")

    def full(self, ctx: StepContext) -> Transition:
        roles = {
            "X0": {FEATURE: 1.0},
            "X1": Keep("X0") if ctx.has("X0") else None,
            "X2": Keep("X1") if ctx.has("X1") else None,
        }
        vals, times = [{FEATURE: 1.0}], [ctx.t]
        for r in ("X0", "X1", "X2"):
            if not ctx.has(r):
                break
            vals.append({r: 1.0})
            times.append(ctx.time(r))
        if len(vals) < 2:
            roles["Y"] = None
            return Transition(roles)
        a, d = _slopes(vals, times)
        if len(vals) < 4:  # no finished window to learn from yet: r7's weights (1, 1/2)
            roles["Y"] = added(scaled(a, R7_WEIGHTS[0]), scaled(_minus(d, a), R7_WEIGHTS[1]))
            return Transition(roles)
        a1, d1 = _slopes(vals[1:], times[1:])  # the slopes the window that just ended used
        g = times[0] - times[1]
        fit = Fit("Y", r=_minus(vals[0], vals[1]), u=scaled(a1, g), q=scaled(_minus(d1, a1), g),
                  U=a, V=_minus(d, a), phi_range=PHI_RANGE, theta_range=THETA_RANGE, fixed=R7_WEIGHTS,
                  sharded=self.sharded)
        roles["Y"] = Keep("Y")
        return Transition(roles, fit=fit)

    def skip(self, ctx: StepContext) -> Transition:
        x = ctx.t - ctx.time("X0")
        return Transition({r: Keep(r) for r in self.roles}, out={"X0": 1.0, "Y": x})
