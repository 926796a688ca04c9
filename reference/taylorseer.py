"""TaylorSeer: Taylor expansion around the last full compute, factors by divided differences."""

from __future__ import annotations

from math import factorial


class TaylorSeerRef:
    min_full = 1

    def __init__(self, order: int = 2):
        self.order = order
        self.factors = []  # factors[i] ~ i-th derivative at the last full compute
        self.computed = []  # [(value, time)] of the last order+1 full computes, newest first
        self.t = self.t_full = None
        self.n_full = 0

    def full(self, x, h: float = 1.0) -> None:
        t = 0.0 if self.t is None else self.t + h
        new = [x.clone()]
        for i in range(self.order):
            if i >= len(self.factors):
                break
            new.append((new[i] - self.factors[i]) / (t - self.t_full))
        self.factors = new
        self.computed = [(x.clone(), t)] + self.computed[: self.order]
        self.t = self.t_full = t
        self.n_full += 1

    def forecast(self, h: float = 1.0):
        self.t = self.t + h
        x = self.t - self.t_full
        return sum(d * x**i / factorial(i) for i, d in enumerate(self.factors))
