"""Cache contexts: independent caches for the calls a pipeline makes per step.

diffusers pipelines that run classifier-free guidance as two model calls name them with
``with transformer.cache_context("cond"): ...`` / ``("uncond")``; every name gets its own
step counter and its own states. Calls outside any named context go to the default context.
CFG batched into one call needs nothing special: states are elementwise over the whole
tensor, batch dimension included, so each sample (and each CFG half) keeps its own history.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..group import StateGroup, pack_states_
from .rfe import is_relational
from .step_counter import StepCounter
from .stream import StreamGroup


class ContextState:
    """Step counter, cached streams and counts of one context."""

    def __init__(self, name: str, time: str, detect: bool):
        self.name = name
        self.counter = StepCounter(time, detect)
        self.groups: Dict[Tuple[str, int], StreamGroup] = {}
        self.num_steps: Optional[int] = None  # of the current generation, when known
        self.steps_full = 0
        self.steps_skipped = 0
        self.generations = 0  # generations started in this context
        self.inference = False  # whether the last call ran under torch.inference_mode
        self.last_full: Optional[bool] = None  # decision of the latest step
        self.thread: Optional[int] = None  # thread running the current generation
        self.batch = None  # StateGroup of the streams forecast together at skipped steps
        self.batch_key: Optional[tuple] = None  # which states it was built for
        self.batch_ptrs: set = set()  # storages its forecasts live in
        self.schedule_ref = None  # the pipeline scheduler's timesteps when this generation started

    def check_thread(self, me: int) -> None:
        """A generation belongs to the thread that started it: steps from another thread would
        interleave two histories in one cache (and show up as a zero step size)."""
        if self.thread is not None and self.thread != me and self.counter.started:
            raise RuntimeError(
                f"foca cache: this cached model was called from another thread in the middle of a generation "
                f"(context {self.name!r}); concurrent use of one cached model is not supported: give each thread "
                "its own model, serialize whole generations, or call reset_cache(model) to abandon the generation"
            )
        self.thread = me

    def reset(self) -> None:
        """Start over (a new generation): counter and histories; allocations are kept."""
        self.counter.reset()
        self.thread = None
        self.schedule_ref = None
        for g in self.groups.values():
            g.reset()

    def free(self) -> None:
        self.counter.reset()
        self.thread = None
        self.schedule_ref = None
        self.groups.clear()
        self.batch = self.batch_key = None
        self.batch_ptrs = set()

    def forecast_all(self, tau: float, config) -> set:
        """Forecast every ready stream of this context in one grouped call (one launch per
        shared history): the skipped step's cached modules then only collect their outputs.
        A module that is not called this step has its state advanced all the same, as if its
        forecast had been taken and dropped (the next call steps on from tau)."""
        if is_relational(config):  # rfc: per-module path (needs each module's input)
            return set()
        ready = [g for g in self.groups.values() if g.ready]
        if not ready:
            return set()
        streams = [s for g in ready for s in g.streams]
        key = tuple(id(s.state) for s in streams)
        reuse = config.reuse_output_buffers
        batch = self.batch
        if key != self.batch_key:
            # (Re)pack: the states move into shared allocations so the step is one update.
            # (A stream's buffer only changes with its state, so the key covers both.)
            states = [s.state for s in streams]
            batch = self.batch = StateGroup(states, pack_states_(states))
            self.batch_key = key
            self._adopt(streams, batch, reuse)
        elif not reuse:  # new output tensors every step, laid out as the packed ones
            fresh = {}
            outs = []
            for o in batch.outs:
                base = o.untyped_storage()
                if base.data_ptr() not in fresh:
                    fresh[base.data_ptr()] = torch.empty(base.nbytes() // o.element_size(), dtype=o.dtype,
                                                         device=o.device)
                outs.append(fresh[base.data_ptr()].as_strided(o.shape, o.stride(), o.storage_offset()))
            batch = self.batch = StateGroup(batch.states, outs)
            self._adopt(streams, batch, reuse)
        hs = [tau - g.last_tau for g in ready for _ in g.streams]
        self.batch.forecast_(hs, backend=config.backend)
        for g in ready:
            g.last_tau = tau
        return set(ready)

    def _adopt(self, streams, batch, reuse: bool) -> None:
        for s, o in zip(streams, batch.outs):
            s.forecast_target = o
            if reuse:
                s.buffer = o
        self.batch_ptrs = {o.untyped_storage().data_ptr() for o in batch.outs}

    def states(self) -> list:
        return [st for g in self.groups.values() for st in g.states()]

    def state_bytes(self) -> int:
        return sum(st.nbytes for st in self.states())

    def buffer_bytes(self) -> int:
        return sum(g.buffer_bytes() for g in self.groups.values())

    def summary(self) -> dict:
        return {
            "step": self.counter.step,
            "last_full": self.last_full,
            "num_steps": self.num_steps,
            "steps_full": self.steps_full,
            "steps_skipped": self.steps_skipped,
            "generations": self.generations,
            "streams": len(self.states()),
            "state_bytes": self.state_bytes(),
            "buffer_bytes": self.buffer_bytes(),
        }


@dataclass
class ActiveContext:
    name: str
    info: Dict[str, Any]  # what the pipeline told: step_index, num_inference_steps, timestep, sigma


class ContextStack:
    """The context the next model call belongs to (innermost ``cache_context`` wins)."""

    def __init__(self, default: str):
        self.default = default
        self._stack: List[ActiveContext] = []

    @property
    def current(self) -> ActiveContext:
        return self._stack[-1] if self._stack else ActiveContext(self.default, {})

    @contextmanager
    def enter(self, name: str, **info):
        if not isinstance(name, str):
            raise TypeError(f"a cache context name must be a string, got {type(name).__name__}")
        self._stack.append(ActiveContext(name, {k: v for k, v in info.items() if v is not None}))
        try:
            yield
        finally:
            self._stack.pop()
