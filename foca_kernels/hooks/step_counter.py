"""Steps of one cache context: which sampling step a model call is, its time coordinate, and
whether it starts a new generation.

One model call is one step. The step index comes from the pipeline when it says so
(diffusers' ``cache_context(name, step_index=...)``), else from counting calls. A new
generation starts (the caller then resets the states) when
  - the pipeline's step index does not move forward,
  - the count reaches the known number of steps,
  - (``detect`` on) the generation's first timestep is seen again, the timesteps turn
    back against the direction they were running in, or they jump ahead by more than
    ``JUMP`` times their latest nonzero spacing (a generation abandoned mid-way followed by
    one that starts in mid-schedule: img2img).
Facts the counter cannot see (an explicit new_generation, a pipeline call) are the
controller's (hooks/controller.py).
The time coordinate ``tau`` is the step index for time="step", else the accumulated
|difference| of the chosen time values (timesteps or sigmas), so differences of ``tau``
between any two steps are the h the forecasts use.
"""

from __future__ import annotations

from typing import Optional

# A timestep step this many times the latest nonzero spacing starts a new generation. Sampling
# schedules change their spacing smoothly: from one step to the next by at most ~1.5x at 10 or
# more steps (Karras, shifted flow-matching sigmas); a false alarm only costs a warm-up.
JUMP = 2.5

class StepCounter:
    def __init__(self, time: str = "step", detect: bool = True):
        self.time = time
        self.detect = detect
        self.reset()

    def reset(self) -> None:
        self.step = -1  # index of the current step (-1: none yet)
        self.tau: Optional[float] = None
        self._first_t: Optional[float] = None
        self._prev_t: Optional[float] = None
        self._direction = 0
        self._spacing: Optional[float] = None  # latest nonzero |timestep difference|
        self._prev_value: Optional[float] = None

    @property
    def started(self) -> bool:
        return self.step >= 0

    def is_new_generation(self, timestep: Optional[float], step_index: Optional[int], num_steps: Optional[int]) -> bool:
        """Whether a call with these facts starts a new generation (reads, changes nothing)."""
        if self.step < 0:
            return False
        if step_index is not None:
            return step_index <= self.step
        if num_steps is not None and self.step + 1 >= num_steps:
            return True
        if self.detect and timestep is not None and self._prev_t is not None:
            if timestep == self._first_t:
                return True
            delta = timestep - self._prev_t
            if self._direction and delta * self._direction < 0:
                return True
            if self._spacing is not None and abs(delta) > JUMP * self._spacing:
                return True
        return False

    def advance(self, timestep: Optional[float], step_index: Optional[int]) -> int:
        """Move to the next step (call :meth:`reset` first on a new generation)."""
        self.step = step_index if step_index is not None else self.step + 1
        if timestep is not None:
            if self._first_t is None:
                self._first_t = timestep
            elif timestep != self._prev_t:
                if not self._direction:
                    self._direction = 1 if timestep > self._prev_t else -1
                self._spacing = abs(timestep - self._prev_t)
            self._prev_t = timestep
        return self.step

    def set_time(self, value: Optional[float]) -> float:
        """Time coordinate of the current step, from the time value (None for time="step")."""
        if self.time == "step":
            self.tau = float(self.step)
            return self.tau
        if value is None:
            raise ValueError(f"time={self.time!r}: no {self.time[:-1]} value available for step {self.step}")
        if self._prev_value is None or self.tau is None:
            self.tau = 0.0
        else:
            h = abs(value - self._prev_value)
            if not h > 0.0:
                raise ValueError(
                    f"time={self.time!r}: step {self.step} has the same {self.time[:-1]} as the previous call "
                    f"({value}); second-order samplers call the model twice per value. Use time='step'."
                )
            self.tau += h
        self._prev_value = value
        return self.tau
