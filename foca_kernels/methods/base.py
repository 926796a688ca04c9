"""The vocabulary every forecasting method is written in.

A method never touches tensors. For each fully computed step and each skipped step it
returns a :class:`Transition`: what every named *role* of its state holds afterwards, as a
linear combination of the roles it held before and of the new feature, with scalar
coefficients that depend only on step sizes. ``foca_kernels.state`` turns a transition into
one fused kernel launch; roles that merely rotate (the newest value becomes the previous
value) are re-pointed, never copied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

FEATURE = "<feature>"
"""Key of the freshly computed module output inside a :data:`Combo`."""

Combo = Mapping[str, float]
"""A linear combination: role name (or :data:`FEATURE`) -> coefficient."""


@dataclass(frozen=True)
class Keep:
    """The new role holds, unchanged, the tensor the old role ``role`` held."""

    role: str


@dataclass(frozen=True)
class Same:
    """The new role holds the same *new* tensor as new role ``role`` (no second copy)."""

    role: str


@dataclass(frozen=True)
class Fit:
    """Role ``role`` (kept in its slot) is overwritten with ``phi * U + theta * V``, where
    (phi, theta) is the least-squares fit of ``r ~ phi u + theta q`` over the whole tensor,
    solved on the device (no host sync) and clipped to ``phi_range`` / ``theta_range``; when u
    and q are (nearly) parallel only phi is fitted and theta = 1/2; when one of the five sums is
    not finite (a nan or inf in some element of r, u or q) the fit is not made and (phi, theta)
    = ``fixed``, the method's fixed weights, so that the bad element stays the only non-finite
    one of the slope. All five are combinations of the roles *before* the step (and
    :data:`FEATURE`). The one data-dependent update in the package: FoCa's reading
    "calibrated" (methods/foca_calibrated.py)."""

    role: str
    r: Combo
    u: Combo
    q: Combo
    U: Combo
    V: Combo
    phi_range: tuple
    theta_range: tuple
    fixed: tuple  # (phi, theta) when a sum is not finite
    # the tensor is one shard of the whole (tokens split over the default process group): the
    # five dot products are all-reduced (summed) first, so every shard fits the unsharded pair
    sharded: bool = False


RoleValue = Union[Combo, Keep, Same, None]
"""What a role holds after a transition; ``None`` marks it undefined (not enough history)."""


@dataclass(frozen=True)
class Transition:
    """Effect of one step on the state, plus the value written to the caller's ``out``."""

    roles: Mapping[str, RoleValue]
    out: Optional[Combo] = None
    # Time stamp of each new role; roles left out take the step's time (Combo/Same) or keep
    # their old time (Keep).
    times: Mapping[str, float] = field(default_factory=dict)
    # Host-side scalars the method keeps until its next step (e.g. the coefficient vectors of
    # a recursion over stored raw values); adopted with the rest of the step, so a refused
    # call leaves it untouched. Never a tensor.
    memo: Any = None
    # A role refitted from the data at this step (full steps only; the role must be Keep'd).
    fit: Optional[Fit] = None


class StepContext:
    """What a method may know when it plans a step: which roles hold values, and when."""

    def __init__(self, t_new: float, times: Mapping[str, Optional[float]], n_full: int,
                 t_prev: Optional[float] = None, memo: Any = None):
        self.t = t_new  # time of the step being planned
        self._times = times
        self.n_full = n_full  # fully computed steps seen so far (this one excluded)
        self.t_prev = t_prev  # time of the latest step (computed or not); None before the first
        self.memo = memo  # what the method's previous transition left in Transition.memo

    def has(self, role: str) -> bool:
        return self._times.get(role) is not None

    def time(self, role: str) -> float:
        t = self._times.get(role)
        if t is None:
            raise KeyError(f"role {role!r} holds no value yet")
        return t


class Method(ABC):
    """A forecasting rule on cached features, stated as transitions over named roles."""

    name: str
    roles: tuple  # role names, in a stable order
    n_slots: int  # full-size tensors the state allocates (enough for every transition)
    min_full: int  # fully computed steps needed before the first forecast

    @abstractmethod
    def full(self, ctx: StepContext) -> Transition:
        """Transition for a fully computed step whose output is :data:`FEATURE`."""

    @abstractmethod
    def skip(self, ctx: StepContext) -> Transition:
        """Transition for a skipped step; its ``out`` is the forecast."""

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"<{type(self).__name__} {self.describe()}>"


def scaled(combo: Combo, c: float) -> dict:
    return {k: v * c for k, v in combo.items()}


def added(*combos: Combo) -> dict:
    total: dict = {}
    for combo in combos:
        for k, v in combo.items():
            total[k] = total.get(k, 0.0) + v
    return total
