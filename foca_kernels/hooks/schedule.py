"""The full/skip decision for a step: a fixed interval with warm-up and final full steps, or an
explicit per-step mask. Pure function of (step, num_steps): every rank, context and
generation takes the same decision (multi-GPU safe by construction)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union


class Schedule:
    def __init__(
        self,
        interval: int = 1,
        warmup: int = 1,
        final: int = 0,
        mask: Optional[Union[Sequence[bool], Callable[[int, Optional[int]], bool]]] = None,
    ):
        self.interval = interval
        self.warmup = warmup
        self.final = final
        self.mask = mask

    @classmethod
    def from_config(cls, config) -> "Schedule":
        return cls(config.interval, config.warmup, config.final, config.mask)

    @property
    def needs_num_steps(self) -> bool:
        return self.mask is None and self.final > 0

    def is_full(self, step: int, num_steps: Optional[int] = None) -> bool:
        """Whether step ``step`` (0-based) is computed fully."""
        if self.mask is not None:
            if callable(self.mask):
                return bool(self.mask(step, num_steps))
            return step >= len(self.mask) or self.mask[step]
        if step < self.warmup:
            return True
        if num_steps is not None and step >= num_steps - self.final:
            return True
        return (step - self.warmup + 1) % self.interval == 0

    def skips_after(self, step: int, num_steps: Optional[int] = None) -> bool:
        """Whether any step after ``step`` may be skipped (if not, a full step need not update
        the cache: nothing will be forecast from it)."""
        if self.mask is None and self.interval == 1:
            return False
        if self.mask is not None and callable(self.mask):
            return True
        if self.mask is not None:
            return not all(self.mask[step + 1 :])
        if num_steps is None:
            return True
        return any(not self.is_full(j, num_steps) for j in range(step + 1, num_steps))

    def pattern(self, num_steps: int) -> str:
        return "".join("F" if self.is_full(k, num_steps) else "s" for k in range(num_steps))

    def __repr__(self) -> str:
        if self.mask is not None:
            return f"Schedule(mask={self.mask!r})"
        return f"Schedule(interval={self.interval}, warmup={self.warmup}, final={self.final})"
