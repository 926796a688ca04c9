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


class FoCaRef:
    """Reference FoCa. ``anchor``: "secant" (slope between the last two full computes) or
    "bdf2" (eq. (6) at the full step over the two most recent values)."""

    min_full = 2

    def __init__(self, anchor: str = "secant"):
        assert anchor in ("secant", "bdf2")
        self.anchor = anchor
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
        self.f_prev, self.t_prev = self.f, self.t_f
        self.f, self.t_f = calibrated, t
        self.t = t
        return calibrated.clone()
