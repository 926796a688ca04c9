"""A forecaster fitted to one model: TaylorSeer-2's terms with weights fitted per skipped step.

TaylorSeer-2 forecasts a skipped step x after the last full compute as

    F = D0 + D1 x + D2 x^2 / 2                       (D_i: divided differences, taylorseer.py)

Every fixed rule over the last three computed values that is exact on constants is
``D0 + a D1 x + c D2 x^2 / 2`` for some (a, c) at each skipped step: reuse is (0, 0),
TaylorSeer-1 (1, 0), TaylorSeer-2 (1, 1), and FoCa's closed readings are other (1, c). So a
table of (a, c), one pair per skipped step of a schedule, spans them all. ``Fitted`` holds such
a table, fitted once per model and schedule by least squares on one full-compute generation
(``foca_kernels.hooks.calibrate``), and forecasts with it through the same closed-form state
and fused kernels as TaylorSeer-2 (three stored values, three reads and one write per skip).

A skipped step is keyed by ``(n_full, k)``: the full computes seen so far and the skip's place
in its window (1 = the first skip after a full step), so the table does not depend on how time
is measured. A step the table does not hold is forecast as TaylorSeer-2 (a = c = 1).

With ``a = 1`` at every key (the calibration's ``fit="line"``) the forecast is
exact on every trajectory that is linear in time, whatever the c's, because D2 = 0 there.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

from .base import Combo, StepContext, added, scaled
from .taylorseer import TaylorSeer

Key = Tuple[int, int]
TS2_WEIGHTS = (1.0, 1.0)


def _check_weights(weights) -> dict:
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping (n_full, k) -> (a, c), got {type(weights).__name__}")
    out = {}
    for key, val in weights.items():
        if (not isinstance(key, tuple) or len(key) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in key)
                or key[0] < 1 or key[1] < 1):
            raise ValueError(f"weights: a key must be (n_full >= 1, k >= 1) as ints, got {key!r}")
        try:
            a, c = (float(v) for v in val)
        except (TypeError, ValueError):
            raise ValueError(f"weights[{key}]: expected a pair of numbers (a, c), got {val!r}") from None
        if not (abs(a) < 1e6 and abs(c) < 1e6):  # also refuses nan
            raise ValueError(f"weights[{key}]: (a, c) must be finite and below 1e6 in size, got {val!r}")
        out[key] = (a, c)
    return out


class Fitted(TaylorSeer):
    """TaylorSeer-2's closed-form state with a fitted weight pair per skipped step."""

    def __init__(self, weights: Optional[Mapping[Key, Tuple[float, float]]] = None,
                 pattern: Optional[str] = None):
        super().__init__(order=2)
        self.name = "fitted"
        self.weights = _check_weights(weights)
        if pattern is not None and (not isinstance(pattern, str) or set(pattern) - {"F", "s"}):
            raise ValueError(f"pattern must be a string of 'F' (full) and 's' (skipped), got {pattern!r}")
        self.pattern = pattern  # the schedule the weights were fitted on (checked by the hooks)

    def describe(self) -> str:
        return f"fitted({len(self.weights)} steps)"

    def full_memo(self, ctx: StepContext):
        return {"k": 0}

    def key(self, ctx: StepContext) -> Key:
        """(full computes seen, place of this skip in its window)."""
        k = (ctx.memo or {}).get("k", 0) + 1
        return ctx.n_full, k

    def basis(self, ctx: StepContext) -> Tuple[Combo, Combo, Combo]:
        """(D0, D1 x, D2 x^2 / 2) at the skipped step ``ctx.t``, as combinations of the roles;
        the last is empty while fewer than three values are held."""
        factors, t_full = self.factors(ctx)
        x = ctx.t - t_full
        terms = [scaled(d, x**i / (1.0, 1.0, 2.0)[i]) for i, d in enumerate(factors)]
        while len(terms) < 3:
            terms.append({})
        return terms[0], terms[1], terms[2]

    def forecast(self, ctx: StepContext):
        key = self.key(ctx)
        a, c = self.weights.get(key, TS2_WEIGHTS)
        d0, d1, d2 = self.basis(ctx)
        return added(d0, scaled(d1, a), scaled(d2, c)), {"k": key[1]}
