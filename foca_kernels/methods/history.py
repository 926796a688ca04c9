"""Methods stored in closed form: the raw values of the last m fully computed steps.

When a method's forecasts depend only on the last m computed values (TaylorSeer, FoCa's
readings r3 and r6), the state holds exactly those values, ``X0`` (newest) .. ``X{m-1}``:

* full step: the new value goes into the oldest slot (1 read of the feature, 1 write);
  the other roles are re-pointed, never copied;
* skipped step: ``out = sum_j c_j X_j`` (m reads, 1 write); the state does not move.

The scalar coefficients ``c_j`` are computed on the host from the step times, by running
the method's own recursion on *coefficient vectors* (a value is a :data:`Combo` over the
roles ``X0..``) instead of on tensors. A recursion that needs more than the role times
(the times of the skipped steps since the last full one) keeps its vectors in
``Transition.memo``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from .base import FEATURE, Combo, Keep, Method, StepContext, Transition, added, scaled


def secant(a: Combo, ta: float, b: Combo, tb: float) -> dict:
    """(a - b) / (ta - tb)."""
    return added(scaled(a, 1.0 / (ta - tb)), scaled(b, -1.0 / (ta - tb)))


def bdf2_derivative(f_new: Combo, f_k: Combo, f_km1: Combo, h: float, h_prev: float) -> dict:
    """Eq. (6), variable step: [(1+2w)/(1+w) F_{k+1} - (1+w) F_k + w^2/(1+w) F_{k-1}] / h."""
    w = h / h_prev
    return added(scaled(f_new, (1 + 2 * w) / ((1 + w) * h)), scaled(f_k, -(1 + w) / h),
                 scaled(f_km1, w * w / ((1 + w) * h)))


def lagrange(values: Sequence[Combo], times: Sequence[float], t: float) -> dict:
    """The polynomial through (times[j], values[j]) evaluated at t (exact at the nodes)."""
    total: dict = {}
    for j, (v, tj) in enumerate(zip(values, times)):
        w = 1.0
        for i, ti in enumerate(times):
            if i != j:
                w *= (t - ti) / (tj - ti)
        total = added(total, scaled(v, w))
    return total


class RawHistory(Method):
    """Base of the closed-form methods: roles ``X0..X{m-1}``, the last m computed values."""

    def __init__(self, m: int):
        self.roles = tuple(f"X{j}" for j in range(m))
        self.n_slots = m

    def full(self, ctx: StepContext) -> Transition:
        roles: Dict[str, object] = {"X0": {FEATURE: 1.0}}
        for j in range(1, self.n_slots):
            prev = f"X{j - 1}"
            roles[f"X{j}"] = Keep(prev) if ctx.has(prev) else None
        return Transition(roles, memo=self.full_memo(ctx))

    def skip(self, ctx: StepContext) -> Transition:
        out, memo = self.forecast(ctx)
        return Transition({r: Keep(r) for r in self.roles}, out=out, memo=memo)

    def history(self, ctx: StepContext) -> Tuple[list, list]:
        """([{X0: 1}, {X1: 1}, ..], [t0, t1, ..]) of the computed values held now."""
        vals, times = [], []
        for r in self.roles:
            if not ctx.has(r):
                break
            vals.append({r: 1.0})
            times.append(ctx.time(r))
        return vals, times

    def full_memo(self, ctx: StepContext) -> Optional[dict]:
        """What a full step leaves for the skipped steps that follow (default: nothing)."""
        return None

    def forecast(self, ctx: StepContext) -> Tuple[Combo, object]:
        """(coefficients of the forecast over the roles, memo for the next step)."""
        raise NotImplementedError
