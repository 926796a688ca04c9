"""TaylorSeer: Taylor expansion around the last full compute from divided differences.

Roles ``D0..Dm``: D0 is the last computed value, Di approximates its i-th derivative.
At a full compute a gap g after the previous one (recursive divided differences):
    D0' = X,   Di' = (D(i-1)' - D(i-1)) / g
At a skipped step x after the last full compute:  out = sum_i Di x^i / i!
Di' is a linear combination of X and the old D0..D(i-1), so one fused pass writes all of
them in place. Until i+1 full computes have been seen Di is undefined and the expansion is
truncated there (the TaylorSeer authors' and diffusers' warm-up behaviour).
"""

from __future__ import annotations

from math import factorial

from .base import FEATURE, Keep, Method, StepContext, Transition, added, scaled


class TaylorSeer(Method):
    min_full = 1

    def __init__(self, order: int = 2):
        if not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"TaylorSeer order must be 1, 2 or 3, got {order!r}")
        self.order = order
        self.name = f"taylorseer{order}"
        self.roles = tuple(f"D{i}" for i in range(order + 1))
        self.n_slots = order + 1

    def describe(self) -> str:
        return f"taylorseer(order={self.order})"

    def full(self, ctx: StepContext) -> Transition:
        new = {FEATURE: 1.0}
        roles = {"D0": new}
        for i in range(1, self.order + 1):
            prev = f"D{i - 1}"
            if not ctx.has(prev):
                roles[f"D{i}"] = None
                continue
            g = ctx.t - ctx.time("D0")
            new = added(scaled(new, 1.0 / g), {prev: -1.0 / g})
            roles[f"D{i}"] = new
        return Transition(roles)

    def skip(self, ctx: StepContext) -> Transition:
        x = ctx.t - ctx.time("D0")
        out = {}
        for i, role in enumerate(self.roles):
            if not ctx.has(role):
                break
            out[role] = x**i / factorial(i)
        return Transition({r: Keep(r) for r in self.roles}, out=out)
