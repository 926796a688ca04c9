"""FoCa, reading "calibrated": the weights of eq. (8)'s two slopes fitted from data.

Every line-exact forecast over the last three computed values X0, X1, X2 (times T0 > T1 > T2)
is X0 + x (phi A + theta (D - A)), x = t - T0, with the secant A = (X0 - X1) / (T0 - T1) (the
anchor of eq. (8)) and D = eq. (6) over X0, X1, X2 (docs/method.md, "Readings"). Reading r7
fixes phi = 1, theta = 1/2 (the corrector's mean of the two slopes). This reading fits them:

at every full step, once four computed values X0..X3 exist, the window that just ended would
have forecast X0 from X1, X2, X3 as X1 + g (phi A1 + theta (D1 - A1)), g = T0 - T1, with A1, D1
the same slopes one full step earlier. (phi, theta) minimise, over the whole tensor,

    | r - phi u - theta q |^2,   r = X0 - X1,  u = g A1,  q = g (D1 - A1),

that is the 2x2 normal equations [uu uq; uq qq] (phi, theta) = (ru, rq), and are then clipped
to phi in [0, 3/2], theta in [0, 1] (ranges fixed before any measurement). When u and q are
(nearly) parallel or q = 0 (no curvature seen: a straight line), only phi is fitted
(phi = ru / uu) and theta = 1/2. With three computed values the weights are r7's (1, 1/2); with
two, the forecast is the secant line. The fitted weights are used until the next full step.

Non-finite data: if any of the five sums is not finite (a nan or inf in r, u or q, which a nan
or inf in one element of X0..X3 puts there), the fit is not made and the weights are r7's
(1, 1/2), the reading's fixed weights, the ones it uses before four values exist. The bad
element still carries its own non-finite value into the slope; every other element gets r7's
finite slope instead of a slope whose weights are nan.
"""

from __future__ import annotations

import math

from .foca import bdf2_derivative

PHI_RANGE = (0.0, 1.5)
THETA_RANGE = (0.0, 1.0)
PARALLEL = 1e-9  # det <= PARALLEL * uu * qq: the two directions cannot be told apart
R7_WEIGHTS = (1.0, 0.5)  # (phi, theta) of reading r7: before four values exist, and when a sum is not finite


def fit_weights(r, u, q):
    """Least-squares (phi, theta) of r ~ phi u + theta q over all elements, clipped; Python floats.
    r7's weights when a sum is not finite (a nan or inf in r, u or q)."""
    r, u, q = r.double().reshape(-1), u.double().reshape(-1), q.double().reshape(-1)
    uu, uq, qq, ru, rq = float(u @ u), float(u @ q), float(q @ q), float(r @ u), float(r @ q)
    if not all(math.isfinite(s) for s in (uu, uq, qq, ru, rq)):
        return R7_WEIGHTS
    det = uu * qq - uq * uq
    if det > PARALLEL * uu * qq:
        phi, theta = (ru * qq - rq * uq) / det, (rq * uu - ru * uq) / det
    else:
        phi, theta = (ru / uu if uu > 0 else 0.0), 0.5
    clip = lambda v, lo_hi: min(max(v, lo_hi[0]), lo_hi[1])  # noqa: E731
    return clip(phi, PHI_RANGE), clip(theta, THETA_RANGE)


class FoCaCalibratedRef:
    """Reference FoCa, reading "calibrated" (see the module docstring)."""

    min_full = 2

    def __init__(self):
        self.t = None
        self.computed = []  # [(x, t)] of the last four full computes, newest first
        self.phi, self.theta = R7_WEIGHTS
        self.velocity = None  # phi A + theta (D - A), the forecast's slope in this window
        self.n_full = 0

    @staticmethod
    def _slopes(xs, ts):
        """(A, D) over the three newest of xs (D = A while only two exist)."""
        a = (xs[0] - xs[1]) / (ts[0] - ts[1])
        if len(xs) < 3:
            return a, a
        return a, bdf2_derivative(xs[0], xs[1], xs[2], ts[0] - ts[1], ts[1] - ts[2])

    def full(self, x, h: float = 1.0) -> None:
        t = 0.0 if self.t is None else self.t + h
        self.computed = [(x.clone(), t)] + self.computed[:3]
        xs, ts = [c[0] for c in self.computed], [c[1] for c in self.computed]
        if len(xs) == 4:  # how the last window's extrapolation met the new value
            a1, d1 = self._slopes(xs[1:], ts[1:])
            g = ts[0] - ts[1]
            self.phi, self.theta = fit_weights(xs[0] - xs[1], g * a1, g * (d1 - a1))
        if len(xs) >= 2:
            a, d = self._slopes(xs, ts)
            self.velocity = self.phi * a + self.theta * (d - a)
        self.t = t
        self.n_full += 1

    def forecast(self, h: float = 1.0):
        if self.n_full < self.min_full:
            raise RuntimeError("FoCa needs two full computes before forecasting")
        self.t = self.t + h
        x0, t0 = self.computed[0]
        return x0 + (self.t - t0) * self.velocity
