"""The fitted forecaster: TaylorSeer-2's terms, each weighted per skipped step.

A skipped step x after the last full compute, the k-th of its window after n_full full
computes, forecasts  D0 + a D1 x + c D2 x^2 / 2  with (a, c) = weights[(n_full, k)], or (1, 1)
(TaylorSeer-2) for a step the table does not hold. D_i are TaylorSeer's divided differences.
"""

from __future__ import annotations

from .taylorseer import TaylorSeerRef


class FittedRef(TaylorSeerRef):
    def __init__(self, weights=None):
        super().__init__(order=2)
        self.weights = dict(weights or {})
        self.k = 0  # skipped steps since the last full compute

    def full(self, x, h: float = 1.0) -> None:
        super().full(x, h)
        self.k = 0

    def forecast(self, h: float = 1.0):
        self.t = self.t + h
        self.k += 1
        a, c = self.weights.get((self.n_full, self.k), (1.0, 1.0))
        x = self.t - self.t_full
        w = (1.0, a * x, c * x * x / 2)
        return sum(d * w[i] for i, d in enumerate(self.factors))
