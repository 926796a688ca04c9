"""Skipped steps of many cache states at once: one launch per set of states that share a history.

A model's cached modules all see the same step times, so at a skipped step every one of their
states has the same coefficients and the same slot assignment; only their memory differs.
:class:`StateGroup` validates a fixed list of (state, out) pairs once (shapes, dtypes,
devices, strides, aliasing), and then each :meth:`StateGroup.forecast_` does only what can
change between steps (readiness, the clock, the plan) and runs

* on Triton: one launch of ``ops/triton_group.py`` per class of states with equal history,
  reading a per-program table (built once) and a small device tensor of coefficients and slot
  indices (uploaded once per step, never read back: no host-device sync);
* on the PyTorch path: a few ``torch._foreach_*`` calls per class (``ops/torch_group.py``).

The result is exactly ``forecast_(state, out, h)`` for every pair, in order (tests/test_group.py).
"""

from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence

import torch

from .api import _plan, _run
from .backend import get_backend
from .ops.pattern import row_pattern
from .ops.aliasing import overlaps
from .state import CacheState, Launch
from .validation import (
    check_no_alias, check_no_overlap, check_out_grad_free, check_ready, check_state, check_step, check_tensor,
    check_writable, next_time,
)

TABLE_COLS = 6


class _Member:
    __slots__ = ("state", "out", "flat", "numel", "slots", "slot_views", "aligned", "index")

    def __init__(self, index: int, state: CacheState, out: torch.Tensor):
        self.index = index
        self.state = state
        self.out = out  # the caller's tensor
        self.numel = state.numel
        self.slots = state.slots
        self.slot_views = [state.slots[s, : state.numel] for s in range(state.slots.shape[0])]
        self.flat = out.view(-1) if out.is_contiguous() else None
        # The grouped kernel addresses members from the first one's pointers with 16-byte
        # alignment hints: a member it cannot address that way runs on its own launch.
        self.aligned = self.flat is not None and out.data_ptr() % 16 == 0 and state.slots.data_ptr() % 16 == 0


def _same_method(a, b) -> bool:
    return a is b or (type(a) is type(b) and vars(a) == vars(b))


def _same_history(a: CacheState, b: CacheState) -> bool:
    return (
        _same_method(a.method, b.method) and a.t == b.t and a.n_full == b.n_full and a.dtype == b.dtype
        and a.io_dtype == b.io_dtype and a.device == b.device and a._slot_of == b._slot_of
        and a._time_of == b._time_of and (a._memo is b._memo or a._memo == b._memo)
    )


class StateGroup:
    """A fixed list of cache states and the tensors their forecasts go to."""

    def __init__(self, states: Sequence[CacheState], outs: Sequence[torch.Tensor]):
        states, outs = list(states), list(outs)
        if len(states) != len(outs):
            raise ValueError(f"a StateGroup needs one out per state, got {len(states)} states and {len(outs)} outs")
        if not states:
            raise ValueError("a StateGroup needs at least one state")
        for i, (st, out) in enumerate(zip(states, outs)):
            check_state(st)
            what = f"out[{i}]"
            check_tensor(st, out, what)
            check_no_overlap(out, what)
            check_out_grad_free(out)
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a StateGroup lists the same state twice")
        # No out may alias any state's slots or another out: one launch writes them all.
        for i, out in enumerate(outs):
            for st in states:
                check_no_alias(st, out, f"out[{i}]")
            for j in range(i):
                if overlaps(out, outs[j]):
                    raise ValueError(f"out[{i}] and out[{j}] share memory; every state needs its own out")
        self.members = [_Member(i, st, out) for i, (st, out) in enumerate(zip(states, outs))]
        self.outs = outs
        self._inference = any(m.slots.is_inference() or m.out.is_inference() for m in self.members)
        self._tables: Dict[tuple, tuple] = {}  # member indices, block -> (table, n_programs)
        self._steps: Dict[tuple, torch.Tensor] = {}  # launch structure -> device step tensor
        self.launches = 0  # kernel launches (or grouped PyTorch updates) so far

    def __len__(self) -> int:
        return len(self.members)

    @property
    def states(self) -> List[CacheState]:
        return [m.state for m in self.members]

    # ---- one skipped step ----------------------------------------------------------------
    def forecast_(self, h=1.0, *, backend: Optional[str] = None) -> List[torch.Tensor]:
        """A skipped step for every state (``h`` one float, or one per state): the same as
        ``forecast_(state, out, h)`` for each pair, checked for all before any is written."""
        hs = self._steps_sizes(h)
        if self._inference and not torch.is_inference_mode_enabled():
            for m in self.members:
                check_writable(m.state, m.out)
        classes: List[list] = []  # [rep member, t_new, [members]]
        for m, hm in zip(self.members, hs):
            check_ready(m.state)
            t_new = next_time(m.state, hm)
            for c in classes:
                if c[1] == t_new and _same_history(c[0].state, m.state):
                    c[2].append(m)
                    break
            else:
                classes.append([m, t_new, [m]])
        launches = [(_plan(c[0].state, False, c[1], hs[c[0].index]), c) for c in classes]  # may refuse: nothing written yet
        for launch, (rep, t_new, members) in launches:
            self._run(launch, members, backend)
        for launch, (rep, t_new, members) in launches:
            for m in members:
                m.state.commit(launch, t_new, full=False)
        return self.outs

    def _steps_sizes(self, h) -> List[float]:
        if isinstance(h, (numbers.Real, torch.Tensor)):
            return [check_step(h)] * len(self.members)
        hs = list(h)
        if len(hs) != len(self.members):
            raise ValueError(f"h: expected one step size or {len(self.members)}, got {len(hs)}")
        return [check_step(x, f"h[{i}]") for i, x in enumerate(hs)]

    # ---- running one class of states ----------------------------------------------------------
    def _run(self, launch: Launch, members: list, backend: Optional[str]) -> None:
        rep = members[0].state
        name = get_backend(rep.device, backend)
        grouped = [m for m in members if m.aligned]
        for m in members:
            if not m.aligned:  # own launch, exactly as forecast_
                self._run_single(launch, m, name)
        if not grouped:
            return
        num_in = len(launch.reads)
        pattern = row_pattern(launch.coef, len(launch.writes) + int(launch.has_out), num_in)
        with torch.no_grad():
            if name == "torch":
                from .ops.torch_group import group_torch

                group_torch(grouped, list(launch.reads), list(launch.writes), launch.has_out, list(launch.coef), pattern)
            else:
                self._run_triton(launch, grouped, pattern)
        self.launches += 1

    def _run_single(self, launch: Launch, m: _Member, backend: str) -> None:
        if m.flat is not None:
            _run(m.state, launch, None, m.flat, backend)
        else:
            tmp = torch.empty(m.state.shape, dtype=m.out.dtype, device=m.out.device)
            _run(m.state, launch, None, tmp.view(-1), backend)
            m.out.copy_(tmp)
        self.launches += 1

    def _run_triton(self, launch: Launch, members: list, pattern) -> None:
        from .ops import triton_group as tg

        block, num_warps = tg.block_size(max(m.numel for m in members))
        table, n_programs = self._table(members, block)
        values = list(pattern.flat) + [float(r) for r in launch.reads] + [float(w) for w in launch.writes]
        key = (len(values), members[0].index)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = torch.empty(len(values), dtype=torch.float32, device=members[0].slots.device)
        # From pageable host memory: copied to a staging buffer at once, no device sync.
        step.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
        tg.group_triton(members[0].slots, members[0].flat, table, step, n_programs, pattern,
                        len(launch.reads), len(launch.writes), launch.has_out, block, num_warps)

    def _table(self, members: list, block: int):
        key = (tuple(m.index for m in members), block)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        s0, o0 = members[0].slots, members[0].flat
        se, oe = s0.element_size(), o0.element_size()
        rows = []
        for m in members:
            slot_off = (m.slots.data_ptr() - s0.data_ptr()) // se
            out_off = (m.flat.data_ptr() - o0.data_ptr()) // oe
            stride = m.slots.stride(0)
            n = m.numel
            body = n - n % 16
            for start in range(0, max(body, 1), block):
                rows.append((slot_off, out_off, stride, start, body, n))
        table = torch.tensor(rows, dtype=torch.int64).to(s0.device)
        hit = self._tables[key] = (table, len(rows))
        return hit


def forecast_group_(states: Sequence[CacheState], outs: Sequence[torch.Tensor], h=1.0, *,
                    backend: Optional[str] = None) -> List[torch.Tensor]:
    """``forecast_(state, out, h)`` for every pair, in one launch per set of states that share
    a history. Validates everything each call; keep a :class:`StateGroup` to validate once."""
    return StateGroup(states, outs).forecast_(h, backend=backend)
