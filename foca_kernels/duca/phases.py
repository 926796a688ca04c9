"""Full / conservative / aggressive: the kind of each step under DuCa, from the package's
full/skip schedule (a pure function of the step, like the schedule itself)."""

from __future__ import annotations

from typing import Optional

LOOKAHEAD = 4096  # a callable mask with no full step this far ahead: count the end as one


def phase(schedule, step: int, num_steps: Optional[int], order: str = "code") -> str:
    if schedule.is_full(step, num_steps):
        return "full"
    if order == "code":  # DuCa's code: odd distance to the next full step -> conservative
        d = 1
        while (d < LOOKAHEAD and not (num_steps is not None and step + d >= num_steps)
               and not schedule.is_full(step + d, num_steps)):
            d += 1
    else:  # conservative right after a full step, then alternate
        d = 1
        while step - d >= 0 and not schedule.is_full(step - d, num_steps):
            d += 1
    return "conservative" if d % 2 == 1 else "aggressive"


def pattern(schedule, num_steps: int, order: str = "code") -> str:
    """'F' full, 'c' conservative, 'a' aggressive per step, e.g. 'FFacFacF'."""
    return "".join(phase(schedule, s, num_steps, order)[0].replace("f", "F") for s in range(num_steps))
