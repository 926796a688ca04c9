"""FoCa, equation by equation (paper: arXiv 2508.16211, eqs. (6)-(8); docs/method.md).

Unequal steps: h = t_{k+1} - t_k, h_prev = t_k - t_{k-1}, w = h / h_prev.
"""

from __future__ import annotations

import torch


def bdf2_derivative(f_new, f_k, f_km1, h, h_prev):
    """Eq. (6), variable step: F'_{k+1} = [(1+2w)/(1+w) F_{k+1} - (1+w) F_k + w^2/(1+w) F_{k-1}] / h."""
    w = h / h_prev
    return ((1 + 2 * w) / (1 + w) * f_new - (1 + w) * f_k + w * w / (1 + w) * f_km1) / h


def bdf2_predictor(f_k, f_km1, d_k, h, h_prev):
    """Eq. (7), variable step: F^_{k+1} = [(1+w)^2 F_k - w^2 F_{k-1} + (1+w) h F'_k] / (1+2w)."""
    w = h / h_prev
    return ((1 + w) ** 2 * f_k - w * w * f_km1 + (1 + w) * h * d_k) / (1 + 2 * w)


def heun_corrector(f_k, d_anchor, d_next, h):
    """Eq. (8): F_c = F_k + h/2 (F'_anchor + F'_{k+1})."""
    return f_k + h / 2 * (d_anchor + d_next)


def quadratic_at(xs, ts, t):
    """The polynomial through the points (ts[j], xs[j]) (two or three of them) at t (Lagrange)."""
    total = 0
    for j, (xj, tj) in enumerate(zip(xs, ts)):
        w = 1.0
        for i, ti in enumerate(ts):
            if i != j:
                w *= (t - ti) / (tj - ti)
        total = total + w * xj
    return total


class FoCaRef:
    """Reference FoCa, readings r0 and r4 (they carry the previous window's last forecast).

    ``anchor``: "secant" (slope between the last two full computes) or "bdf2" (eq. (6) at the
    full step over the two most recent values). ``contraction`` beta > 0 (reading r4, secant
    anchor): the corrected value becomes beta (F_full + (t - t_full) F'_anchor) + (1 - beta) F_c."""

    min_full = 2

    def __init__(self, anchor: str = "secant", contraction: float = 0.0):
        assert anchor in ("secant", "bdf2")
        assert contraction == 0.0 or anchor == "secant"
        self.anchor = anchor
        self.contraction = contraction
        self.t = None
        self.f = self.t_f = None  # newest value F_k (computed or calibrated) and its time
        self.f_prev = self.t_prev = None  # F_{k-1}
        self.f_full = self.t_full = None  # most recent full compute
        self.d_anchor = None  # F'_anchor
        self.n_full = 0

    def full(self, x: torch.Tensor, h: float = 1.0) -> None:
        t = 0.0 if self.t is None else self.t + h
        if self.anchor == "secant":
            if self.f_full is not None:
                self.d_anchor = (x - self.f_full) / (t - self.t_full)
        elif self.f is not None:
            if self.f_prev is None:
                self.d_anchor = (x - self.f) / (t - self.t_f)
            else:
                self.d_anchor = bdf2_derivative(x, self.f, self.f_prev, t - self.t_f, self.t_f - self.t_prev)
        self.f_prev, self.t_prev = self.f, self.t_f
        self.f, self.t_f = x.clone(), t
        self.f_full, self.t_full = self.f, t
        self.t = t
        self.n_full += 1

    def forecast(self, h: float = 1.0) -> torch.Tensor:
        if self.n_full < self.min_full:
            raise RuntimeError("FoCa needs two full computes before forecasting")
        t = self.t + h
        h_prev = self.t_f - self.t_prev
        d_k = (self.f - self.f_prev) / h_prev  # carried derivative F'_k
        pred = bdf2_predictor(self.f, self.f_prev, d_k, h, h_prev)  # (7)
        d_next = bdf2_derivative(pred, self.f, self.f_prev, h, h_prev)  # (6) at the prediction
        calibrated = heun_corrector(self.f, self.d_anchor, d_next, h)  # (8)
        if self.contraction:  # r4: pull toward the anchored line through the last full compute
            line = self.f_full + (t - self.t_full) * self.d_anchor
            calibrated = self.contraction * line + (1 - self.contraction) * calibrated
        self.f_prev, self.t_prev = self.f, self.t_f
        self.f, self.t_f = calibrated, t
        self.t = t
        return calibrated.clone()


class FoCaRestartRef:
    """Reference FoCa, readings r3, r6 and r7: every window restarts from computed values.

    After a full step (x at time t; the previous computed values x_p, x_pp):
      anchor   A = (x - x_p) / (t - t_p)                       (secant of the last two full)
      r3: F_k = x, F_{k-1} = x_p, D = eq. (6) over (x, x_p, x_pp) (secant while only two)
      r7: as r3
      r6: F_k = x, F_{k-1} = the quadratic through (x, x_p, x_pp) at the step before t
    Skipped step at t + h:
      D'  = (F_k - F_{k-1}) / h_prev              (r6: carried derivative, the secant)
      (7) F^ = predictor(F_k, F_{k-1}, D)
      (6) F'_{k+1} = derivative at F^             (equals D: see docs/method.md)
      (8) F_c = F_k + h/2 (A + F'_{k+1})
      r3: D <- eq. (6) at (F_c, F_k, F_{k-1})     (the derivative update after the corrector)
      r7: D is kept                                (no derivative update inside a window)
    """

    min_full = 2

    def __init__(self, reading: str = "r3"):
        assert reading in ("r3", "r6", "r7")
        self.reading = reading
        self.t = None
        self.computed = []  # [(x, t)] of the last three full computes, newest first
        self.f = self.t_f = self.f_prev = self.t_prev = None
        self.d = self.anchor_d = None
        self.n_full = 0

    def full(self, x, h: float = 1.0) -> None:
        t_before = self.t
        t = 0.0 if self.t is None else self.t + h
        self.computed = [(x.clone(), t)] + self.computed[:2]
        xs, ts = [c[0] for c in self.computed], [c[1] for c in self.computed]
        self.f, self.t_f = xs[0], t
        if len(xs) >= 2:
            self.anchor_d = (xs[0] - xs[1]) / (ts[0] - ts[1])
            if self.reading in ("r3", "r7"):
                self.f_prev, self.t_prev = xs[1], ts[1]
                if len(xs) == 3:
                    self.d = bdf2_derivative(xs[0], xs[1], xs[2], ts[0] - ts[1], ts[1] - ts[2])
                else:
                    self.d = self.anchor_d
            else:
                self.f_prev, self.t_prev = quadratic_at(xs, ts, t_before), t_before
        self.t = t
        self.n_full += 1

    def forecast(self, h: float = 1.0):
        if self.n_full < self.min_full:
            raise RuntimeError("FoCa needs two full computes before forecasting")
        t = self.t + h
        h = t - self.t_f
        h_prev = self.t_f - self.t_prev
        d_k = self.d if self.reading in ("r3", "r7") else (self.f - self.f_prev) / h_prev
        pred = bdf2_predictor(self.f, self.f_prev, d_k, h, h_prev)  # (7)
        d_next = bdf2_derivative(pred, self.f, self.f_prev, h, h_prev)  # (6) at the prediction
        calibrated = heun_corrector(self.f, self.anchor_d, d_next, h)  # (8)
        if self.reading == "r3":
            self.d = bdf2_derivative(calibrated, self.f, self.f_prev, h, h_prev)  # derivative update
        self.f_prev, self.t_prev = self.f, self.t_f
        self.f, self.t_f = calibrated, t
        self.t = t
        return calibrated.clone()
