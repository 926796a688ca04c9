"""FoCa (Forecast then Calibrate), as transitions over four or three cached tensors.

Roles: ``F`` the newest value (computed or calibrated), ``F_prev`` the value before it,
``D_anchor`` the anchor derivative F'_anchor of eq. (8), and, for the secant anchor,
``F_full`` the most recent fully computed value. See docs/method.md for the derivation.

Skipped step at t_{k+1} = t_k + h, with h_prev = t_k - t_{k-1} and w = h / h_prev:
  carried derivative   F'_k     = (F_k - F_{k-1}) / h_prev
  predictor (7)        F^_{k+1} = [(1+w)^2 F_k - w^2 F_{k-1} + (1+w) h F'_k] / (1+2w)
  derivative (6)       F'_{k+1} = BDF2(F^_{k+1}, F_k, F_{k-1}) = F'_k    (identity)
  corrector (8)        F_c      = F_k + h/2 (F'_anchor + F'_{k+1})
so F_c = (1 + h/(2 h_prev)) F_k - h/(2 h_prev) F_{k-1} + h/2 D_anchor, which is what the
kernel applies. The reference (reference/foca.py) evaluates (6)-(8) one by one instead.
"""

from __future__ import annotations

from .base import FEATURE, Keep, Method, Same, StepContext, Transition, added, scaled

ANCHORS = ("secant", "bdf2")


class FoCa(Method):
    """FoCa forecaster.

    anchor="secant": F'_anchor = (F_full - F_full_prev) / (t_full - t_full_prev), the slope
        between the last two full computes (4 tensors; uses computed values only).
    anchor="bdf2":   F'_anchor = variable-step BDF2 derivative (6) at the full step, from the
        new value and the two most recent values, predicted or not (3 tensors).
    contraction=beta (reading r4, secant anchor only): the corrected value is pulled toward
        the anchored line, F_c <- beta (F_full + x F'_anchor) + (1 - beta) F_c, x = t - t_full.
    These readings carry the previous window's last forecast into the next window (after a
    full step F_{k-1} is that forecast); see foca_closed.py for the ones that restart.
    """

    name = "foca"
    min_full = 2

    def __init__(self, anchor: str = "secant", contraction: float = 0.0):
        if anchor not in ANCHORS:
            raise ValueError(f"FoCa anchor must be one of {ANCHORS}, got {anchor!r}")
        if isinstance(contraction, bool) or not isinstance(contraction, (int, float)) or not 0.0 <= contraction <= 1.0:
            raise ValueError(f"FoCa contraction must be a number in [0, 1], got {contraction!r}")
        if contraction and anchor != "secant":
            raise ValueError("FoCa contraction (reading r4) needs the secant anchor")
        self.anchor = anchor
        self.contraction = float(contraction)
        self.reading = "r4" if contraction else "r0"
        self.roles = ("F", "F_prev", "D_anchor") + (("F_full",) if anchor == "secant" else ())
        self.n_slots = len(self.roles)

    def describe(self) -> str:
        if self.contraction:
            return f"foca(reading=r4, contraction={self.contraction:g})"
        return f"foca(reading=r0, anchor={self.anchor})"

    def full(self, ctx: StepContext) -> Transition:
        roles = {
            "F": {FEATURE: 1.0},
            "F_prev": Keep("F") if ctx.has("F") else None,
            "D_anchor": self._anchor_derivative(ctx),
        }
        if self.anchor == "secant":
            roles["F_full"] = Same("F")
        return Transition(roles)

    def _anchor_derivative(self, ctx: StepContext):
        if self.anchor == "secant":
            if not ctx.has("F_full"):
                return None
            g = ctx.t - ctx.time("F_full")
            return {FEATURE: 1.0 / g, "F_full": -1.0 / g}
        if not ctx.has("F"):
            return None
        h = ctx.t - ctx.time("F")
        if not ctx.has("F_prev"):  # second value ever: BDF2 needs three points, use the secant
            return {FEATURE: 1.0 / h, "F": -1.0 / h}
        w = h / (ctx.time("F") - ctx.time("F_prev"))
        return {
            FEATURE: (1 + 2 * w) / ((1 + w) * h),
            "F": -(1 + w) / h,
            "F_prev": w * w / ((1 + w) * h),
        }

    def skip(self, ctx: StepContext) -> Transition:
        h = ctx.t - ctx.time("F")
        r = h / (2.0 * (ctx.time("F") - ctx.time("F_prev")))
        calibrated = {"F": 1.0 + r, "F_prev": -r, "D_anchor": 0.5 * h}
        if self.contraction:
            b, x = self.contraction, ctx.t - ctx.time("F_full")
            line = {"F_full": 1.0, "D_anchor": x}
            calibrated = added(scaled(calibrated, 1.0 - b), scaled(line, b))
        roles = {"F": calibrated, "F_prev": Keep("F"), "D_anchor": Keep("D_anchor")}
        if self.anchor == "secant":
            roles["F_full"] = Keep("F_full")
        return Transition(roles, out=calibrated)
