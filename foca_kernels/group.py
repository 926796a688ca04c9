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

from .backend import get_backend
from .ops.pattern import row_pattern
from .ops.aliasing import _extent, overlaps
from .fp8 import Fp8State, run_skip as run_fp8_skip
from .state import CacheState, Launch
from .step import plan_step, run_into
from .validation import (
    check_no_alias, check_no_overlap, check_out_grad_free, check_ready, check_state, check_step, check_tensor,
    check_writable, next_time,
)


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


def _continues(a, b) -> bool:
    """Whether member b's slots and output start right where member a's columns end."""
    sa, sb = a.slots, b.slots
    return (
        sa.untyped_storage().data_ptr() == sb.untyped_storage().data_ptr() and sa.stride(0) == sb.stride(0)
        and sb.data_ptr() == sa.data_ptr() + sa.shape[1] * sa.element_size()
        and b.flat.data_ptr() == a.flat.data_ptr() + sa.shape[1] * a.flat.element_size()
        and a.flat.untyped_storage().data_ptr() == b.flat.untyped_storage().data_ptr()
    )


class _Span:
    """Consecutive packed members as one: slots ``[n_slots, columns]``, out over the same columns."""

    __slots__ = ("members", "index", "numel", "slots", "slot_views", "flat", "aligned")

    def __init__(self, members: list):
        first, last = members[0], members[-1]
        self.members = members
        self.index = first.index
        cols = (last.slots.data_ptr() - first.slots.data_ptr()) // first.slots.element_size()
        self.numel = cols + last.numel
        self.slots = first.slots.as_strided((first.slots.shape[0], self.numel), first.slots.stride())
        self.slot_views = [self.slots[s] for s in range(self.slots.shape[0])]
        self.flat = first.flat.as_strided((self.numel,), (1,))
        self.aligned = True


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
        self._merges: Dict[tuple, list] = {}  # member indices -> members after merging packed runs
        self._consts: Dict[tuple, torch.Tensor] = {}  # step values -> a device tensor (eager launches)
        self._split = None  # (unaligned, merged aligned) for the class of all members
        self._stamp = None  # CacheState.stamp after this group's last commit (see _classes)
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
        self._check_current()
        classes = self._classes(hs)
        # may refuse: nothing written yet
        launches = [(plan_step(c[0].state, False, c[1], hs[c[0].index]), c) for c in classes]
        for launch, (rep, t_new, members) in launches:
            self._run(launch, members, backend)
        self._commit(launches)
        return self.outs

    def _commit(self, launches) -> None:
        for launch, (rep, t_new, members) in launches:
            CacheState.commit_all([m.state for m in members], launch, t_new, full=False)
        # nothing else changed any state since: the next step may skip the O(states) checks
        self._stamp = CacheState.stamp if len(launches) == 1 and launches[0][1][2] is self.members else None

    def _check_current(self) -> None:
        if self._inference and not torch.is_inference_mode_enabled():
            for m in self.members:
                check_writable(m.state, m.out)
        if self._stamp == CacheState.stamp:  # unchanged since this group's last step
            return
        for m in self.members:
            if m.state.slots is not m.slots:
                raise RuntimeError(
                    f"stale StateGroup: state {m.index} was moved (pack_states_/move_to_) after the group was "
                    "built; build a new StateGroup"
                )

    def _steps_sizes(self, h) -> List[float]:
        if isinstance(h, (numbers.Real, torch.Tensor)):
            return [check_step(h)] * len(self.members)
        hs = list(h)
        if len(hs) != len(self.members):
            raise ValueError(f"h: expected one step size or {len(self.members)}, got {len(hs)}")
        if all(type(x) is float for x in hs) and hs.count(hs[0]) == len(hs):  # the usual case: one check
            return [check_step(hs[0], "h[0]")] * len(hs)
        return [check_step(x, f"h[{i}]") for i, x in enumerate(hs)]

    def _classes(self, hs: List[float]) -> List[list]:
        """[representative member, t_new, members] per set of states with equal history."""
        first = self.members[0].state
        if first._launch is not None and hs.count(hs[0]) == len(hs) and (self._stamp == CacheState.stamp or all(
                m.state._launch is first._launch and m.state.t == first.t for m in self.members)):
            # every state was last committed by the same launch (this group's last step, and no
            # state changed since, or checked here): one history, one check
            check_ready(first)
            return [[self.members[0], next_time(first, hs[0]), self.members]]
        classes: List[list] = []
        for m, hm in zip(self.members, hs):
            check_ready(m.state)
            t_new = next_time(m.state, hm)
            for c in classes:
                if c[1] == t_new and _same_history(c[0].state, m.state):
                    c[2].append(m)
                    break
            else:
                classes.append([m, t_new, [m]])
        return classes

    # ---- running one class of states ----------------------------------------------------------
    def _run(self, launch: Launch, members: list, backend: Optional[str]) -> None:
        for call in self._prepare(launch, members, backend):
            call.fn()
            self.launches += 1

    def _prepare(self, launch: Launch, members: list, backend: Optional[str], graph: bool = False) -> list:
        """The launches of one class, ready to run (device-side inputs already uploaded)."""
        rep = members[0].state
        name = get_backend(rep.device, backend)
        if isinstance(rep, Fp8State):  # anchor + e4m3 increments (fp8.py): one launch for the class on Triton
            if graph:
                raise RuntimeError("fp8 states are not captured in CUDA graphs; use group.forecast_")
            return [_Call(lambda: _run_fp8(launch, members, name), None)]
        if members is self.members and self._split is not None:  # the usual class: all of them
            unaligned, grouped = self._split
        else:
            unaligned = [m for m in members if not m.aligned]
            grouped = [m for m in members if m.aligned]
            grouped = self._merged(grouped) if grouped else grouped
            if members is self.members:
                self._split = (unaligned, grouped)
        calls = [_Call(lambda m=m: self._run_single(launch, m, name), None)  # own launch, as forecast_
                 for m in unaligned]
        if not grouped:
            return calls
        pattern = row_pattern(launch.coef, len(launch.writes) + int(launch.has_out), len(launch.reads))
        if name == "torch":
            from .ops.torch_group import group_torch

            calls.append(_Call(lambda: group_torch(grouped, list(launch.reads), list(launch.writes), launch.has_out,
                                                   list(launch.coef), pattern), None))
        else:
            calls.append(self._prepare_triton(launch, grouped, pattern, graph))
        return calls

    def _run_single(self, launch: Launch, m: _Member, backend: str) -> None:
        run_into(m.state, launch, m.out, backend)

    def _prepare_triton(self, launch: Launch, members: list, pattern, graph: bool = False) -> "_Call":
        from .ops import triton_group as tg

        block, num_warps = tg.block_size(max(m.numel for m in members))
        table, n_programs = self._table(members, block)
        values = (*pattern.flat, *map(float, launch.reads), *map(float, launch.writes))
        device = members[0].slots.device
        if graph:  # a captured graph reads one fixed tensor: the values are copied into it
            key = (len(values), members[0].index)
            step = self._steps.get(key)
            if step is None:
                step = self._steps[key] = torch.empty(len(values), dtype=torch.float32, device=device)
            # From pageable host memory: copied to a staging buffer at once, no device sync.
            step.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
        else:  # eager: a method's skipped steps repeat a few coefficient vectors, each uploaded once
            step = self._consts.get(values)
            if step is None:
                if len(self._consts) >= 64:
                    self._consts.clear()
                step = self._consts[values] = torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
        nr, nw, ho = len(launch.reads), len(launch.writes), launch.has_out

        def fn():
            with torch.no_grad():
                tg.group_triton(members[0].slots, members[0].flat, table, step, n_programs, pattern,
                                nr, nw, ho, block, num_warps)

        # What a captured graph of this launch depends on besides the uploaded step tensor.
        return _Call(fn, (tuple(m.index for m in members), pattern.key, nr, nw, ho, block))

    # ---- CUDA graphs -------------------------------------------------------------------------
    def cuda_graph(self) -> "GraphedForecast":
        """A skipped step as a CUDA graph replay: see :class:`GraphedForecast`."""
        return GraphedForecast(self)

    def _merged(self, members: list) -> list:
        """Members whose slots and outputs continue each other's columns in one allocation
        (pack_states_) merged into one: an update over the merged range touches the padding
        between them too, which nobody reads."""
        key = tuple(m.index for m in members)
        hit = self._merges.get(key)
        if hit is None:
            hit, run = [], [members[0]]
            for m in members[1:]:
                if _continues(run[-1], m) and not self._gap_holds_an_out(run[-1], m):
                    run.append(m)
                else:
                    hit.append(_Span(run))
                    run = [m]
            hit.append(_Span(run))
            hit = self._merges[key] = [r.members[0] if len(r.members) == 1 else r for r in hit]
        return hit

    def _gap_holds_an_out(self, a, b) -> bool:
        """Whether another member's out lies in the padding between a's and b's outputs (a
        merged update writes that padding)."""
        g0 = a.flat.data_ptr() + a.numel * a.flat.element_size()
        g1 = b.flat.data_ptr()
        for m in self.members:
            if m is a or m is b or m.out.device != b.flat.device:
                continue
            m0 = m.out.data_ptr()
            m1 = m0 + _extent(m.out) * m.out.element_size()
            if m0 < g1 and g0 < m1:
                return True
        return False

    def _table(self, members: list, block: int):
        from .ops.triton_group import table_rows

        key = (tuple(m.index for m in members), block)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        s0, o0 = members[0].slots, members[0].flat
        se, oe = s0.element_size(), o0.element_size()
        rows, _ = table_rows([(m.slots.data_ptr() - s0.data_ptr()) // se for m in members],
                             [(m.flat.data_ptr() - o0.data_ptr()) // oe for m in members],
                             [m.slots.stride(0) for m in members], [m.numel for m in members], block)
        # non_blocking: from pageable memory the copy is staged at once, without waiting for the device
        table = torch.tensor(rows, dtype=torch.int64).to(s0.device, non_blocking=True)
        hit = self._tables[key] = (table, len(rows))
        return hit


def _run_fp8(launch: Launch, members: list, backend: str) -> None:
    flats = [m.flat if m.flat is not None else torch.empty(m.numel, dtype=m.out.dtype, device=m.out.device)
             for m in members]
    run_fp8_skip(launch, [m.state for m in members], flats, backend)
    for m, f in zip(members, flats):
        if m.flat is None:  # a non-contiguous out: written contiguously, then scattered
            m.out.copy_(f.view(m.out.shape))


class _Call:
    """One launch ready to run; ``graph_key`` is None when it cannot be captured in a CUDA
    graph (its coefficients are baked into the launch arguments)."""

    __slots__ = ("fn", "graph_key")

    def __init__(self, fn, graph_key):
        self.fn = fn
        self.graph_key = graph_key


class GraphedForecast:
    """``group.forecast_(h)`` with the launches replayed from a captured CUDA graph.

    Per call, the host plans the step (checks, coefficients) and uploads the coefficients and
    slot indices into the group's device tensors (a copy, no sync); the kernels then run as
    one graph replay, which reads them there. A graph is captured the first time a step
    structure is seen (the set of history classes, their row structure and launch shape: a
    method's skipped steps share one) and replayed afterwards; the first call of a structure
    runs eagerly. Needs the Triton backend on CUDA and members the grouped kernel can address
    (contiguous, 16-byte aligned outs)."""

    def __init__(self, group: "StateGroup"):
        self.group = group
        self.graphs: Dict[tuple, object] = {}
        self.replays = 0

    def __call__(self, h=1.0) -> List[torch.Tensor]:
        g = self.group
        dev = g.members[0].state.device
        if dev.type != "cuda":
            raise RuntimeError(f"CUDA graphs need CUDA tensors; this group's states are on {dev}")
        hs = g._steps_sizes(h)
        g._check_current()
        classes = g._classes(hs)
        launches = [(plan_step(c[0].state, False, c[1], hs[c[0].index]), c) for c in classes]
        calls = [call for launch, c in launches for call in g._prepare(launch, c[2], "triton", graph=True)]
        if any(call.graph_key is None for call in calls):
            raise RuntimeError("a member of this group cannot be captured (non-contiguous or misaligned out); "
                               "use group.forecast_ instead")
        key = tuple(call.graph_key for call in calls)
        graph = self.graphs.get(key)
        if graph is None:
            for call in calls:  # eager (also compiles the kernel before capture)
                call.fn()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # captured on a side stream, nothing runs
                for call in calls:
                    call.fn()
            self.graphs[key] = graph
        else:
            graph.replay()
            self.replays += 1
        g.launches += len(calls)
        g._commit(launches)
        return g.outs


def pack_states_(states: Sequence[CacheState]) -> List[torch.Tensor]:
    """Move states that can share launches into common allocations and return, for each state,
    an output tensor laid out like its slots (contiguous, its feature's shape and dtype).

    States with the same slot count, dtypes and device get one ``[n_slots, total]`` allocation
    (each state a 64-aligned column range) and their outputs one ``[total]`` tensor at the same
    columns. A :class:`StateGroup` over such states and outputs runs a step of all of them as
    ONE contiguous update (ops see one tensor per slot, not one per state)."""
    states = list(states)
    if len({id(s) for s in states}) != len(states):
        raise ValueError("pack_states_ got the same state twice")
    kinds: Dict[tuple, list] = {}
    outs: List[Optional[torch.Tensor]] = [None] * len(states)
    for i, st in enumerate(check_state(s) for s in states):
        if isinstance(st, Fp8State):  # keeps its own allocation (anchor, increments, scales)
            outs[i] = torch.empty(st.shape, dtype=st.io_dtype, device=st.device)
            continue
        kinds.setdefault((st.slots.shape[0], st.dtype, st.io_dtype, st.device), []).append(i)
    for (n_slots, dtype, io_dtype, device), idx in kinds.items():
        cols = [states[i].slots.shape[1] for i in idx]
        total = sum(cols)
        arena = torch.empty(n_slots, total, dtype=dtype, device=device)
        out_arena = torch.empty(total, dtype=io_dtype, device=device)
        off = 0
        for i, c in zip(idx, cols):
            st = states[i]
            st.move_to_(arena[:, off: off + c])
            outs[i] = out_arena[off: off + st.numel].view(st.shape)
            off += c
    return outs


def forecast_group_(states: Sequence[CacheState], outs: Sequence[torch.Tensor], h=1.0, *,
                    backend: Optional[str] = None) -> List[torch.Tensor]:
    """``forecast_(state, out, h)`` for every pair, in one launch per set of states that share
    a history. Validates everything each call; keep a :class:`StateGroup` to validate once."""
    return StateGroup(states, outs).forecast_(h, backend=backend)
