"""TaylorSeer: Taylor expansion around the last full compute from divided differences.

Its factors D0..Dm are defined recursively at each full compute a gap g after the previous
one:  D0' = X,  Di' = (D(i-1)' - D(i-1)) / g;  a skipped step x after the last full compute
forecasts  sum_i Di x^i / i!.  Di at the latest full compute depends only on the last i+1
computed values and their times, so the state holds those values (closed form, history.py):
a full step writes one tensor instead of m+1, a skip reads m+1 and writes the forecast. The
coefficients come from replaying the recursion on coefficient vectors, oldest value first.
Until i+1 full computes have been seen Di is undefined and the expansion is truncated there
(the TaylorSeer authors' and diffusers' warm-up behaviour).
"""

from __future__ import annotations

from math import factorial

from .base import StepContext, added, scaled
from .history import RawHistory


class TaylorSeer(RawHistory):
    min_full = 1

    def __init__(self, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"TaylorSeer order must be 1, 2 or 3, got {order!r}")
        super().__init__(order + 1)
        self.order = order
        self.name = f"taylorseer{order}"

    def describe(self) -> str:
        return f"taylorseer(order={self.order})"

    def factors(self, ctx: StepContext):
        """(D0..Dk as coefficient vectors over X0.., time of the last full compute)."""
        vals, times = self.history(ctx)
        factors, t_full = [vals[-1]], times[-1]
        for v, t in zip(reversed(vals[:-1]), reversed(times[:-1])):
            new = [v]
            for i in range(min(len(factors), self.order)):
                new.append(scaled(added(new[i], scaled(factors[i], -1.0)), 1.0 / (t - t_full)))
            factors, t_full = new, t
        return factors, t_full

    def forecast(self, ctx: StepContext):
        factors, t_full = self.factors(ctx)
        x = ctx.t - t_full
        out: dict = {}
        for i, d in enumerate(factors):
            out = added(out, scaled(d, x**i / factorial(i)))
        return out, None
