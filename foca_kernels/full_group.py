"""Full steps of many cache states at once: ``update_group_``.

A model's cached modules are computed on the same steps, so at a full step their states share a
history (same method, step times and slot assignment) and therefore one plan: the same
coefficients, the same slots, the same fit structure; only their memory and their features
differ. :func:`update_group_` checks every (state, feature) pair, classes the states by history
(as :class:`~foca_kernels.StateGroup` does for skipped steps), plans each class once, and runs
it in a number of launches that does not depend on how many states it holds:

* on Triton (ops/triton_fit.py ``full_group_triton``, the grouped kernel of
  ops/triton_group.py reading one feature per member): one launch for a closed form (the
  feature copy of every state), three for the calibrated reading (pass 1: every state's partial
  dot products; one program per state adding them in a fixed order; pass 2: every state's solve
  and slope, fused with the feature copy). A sharded fit all-reduces every state's five sums in
  one call;
* on the PyTorch path: ``torch._foreach_copy_`` for a copy (one call for the class); other rows
  (FoCa r0/r4, the calibrated reading's first two full steps) and the calibrated fit run per
  state, as update_ runs them (one compiled C call, or the PyTorch ops, per state; a sharded fit
  stacks every state's sums for one all_reduce).

The result is exactly ``update_(state, feature, h)`` for every pair on the same backend, bit for
bit (tests/test_update_group.py).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import torch

from .backend import get_backend
from .group import _same_history, _same_method
from .ops.aliasing import overlaps
from .ops.fit import PARALLEL, flatten as flatten_fit, run_fit_group_torch
from .ops.torch_lincomb import lincomb_torch
from .fp8 import Fp8State, run_full as run_fp8_full
from .rfc.state import RFCState
from .state import CacheState, Launch
from .step import plan_step
from .validation import check_state, check_step, check_tensor, check_writable, next_time


def update_group_(states: Sequence[CacheState], features: Sequence[torch.Tensor], h=1.0, *,
                  backend: Optional[str] = None) -> List[CacheState]:
    """A fully computed step for every state: the same as ``update_(state, feature, h)`` for
    each pair, in O(1) launches per set of states with equal history (module docstring).
    ``h``: one step size, or one per state. Everything is checked for every pair before
    anything is written; a refused call leaves every state as it was."""
    states, features = list(states), list(features)
    n = len(states)
    if len(features) != n:
        raise ValueError(f"update_group_ needs one feature per state, got {n} states and {len(features)} features")
    if not n:
        raise ValueError("update_group_ needs at least one state")
    for i, st in enumerate(states):
        if isinstance(st, RFCState):
            raise TypeError(f"states[{i}] is a method 'rfc' state, whose full step needs the module's input: "
                            "use update_(state, feature, h, input=...)")
        check_state(st)
    if len({id(s) for s in states}) != n:
        raise ValueError("update_group_ got the same state twice")
    for i, (st, f) in enumerate(zip(states, features)):
        check_tensor(st, f, f"features[{i}]")
        check_writable(st)
    _check_aliasing(states, features)
    _run_group(states, features, _step_sizes(h, n), backend)
    return states


def update_group_shared_(states: List[CacheState], features: List[torch.Tensor], hs: List[float], *,
                         backend: Optional[str] = None) -> None:
    """:func:`update_group_` for callers that already guarantee what it checks per pair (the
    hooks: each feature is a fresh module output of its state's shape, dtype and device, held
    by no state; distinct states; every h > 0 by construction), as :func:`~foca_kernels.api.update_shared_`
    is for update_. What can still fail (a coefficient that does not fit float32) is refused
    before anything is written. Per pair it only hands over the feature."""
    _run_group(states, features, hs, backend)


def _run_group(states: List[CacheState], features: List[torch.Tensor], hs: List[float], backend) -> None:
    classes = _classes(states, hs)
    # may refuse: nothing written yet
    launches = [plan_step(states[rep], True, t_new, hs[rep]) for rep, t_new, _ in classes]
    flats = [f if f.is_contiguous() else f.contiguous() for f in features]  # kernels read raw storage
    with torch.no_grad():
        for launch, (rep, _, members) in zip(launches, classes):
            name = get_backend(states[rep].device, backend)
            if len(classes) == 1:
                ss, fs = states, flats
            else:
                ss, fs = [states[i] for i in members], [flats[i] for i in members]
            if isinstance(ss[0], Fp8State):  # anchor + e4m3 increments (fp8.py)
                run_fp8_full(ss, [f.view(-1) for f in fs], name)
            elif name == "triton":
                _run_triton(launch, ss, fs)
            else:
                _run_torch(launch, ss, [f.view(-1) for f in fs])
    for launch, (_, t_new, members) in zip(launches, classes):
        CacheState.commit_all(states if len(classes) == 1 else [states[i] for i in members], launch, t_new, full=True)


# ---- checks ----------------------------------------------------------------------------------------------
def _step_sizes(h, n: int) -> List[float]:
    if isinstance(h, (numbers.Real, torch.Tensor)):
        return [check_step(h)] * n
    hs = list(h)
    if len(hs) != n:
        raise ValueError(f"h: expected one step size or {n}, got {len(hs)}")
    if all(type(x) is float for x in hs) and hs.count(hs[0]) == n:  # the usual case: one check
        return [check_step(hs[0], "h[0]")] * n
    return [check_step(x, f"h[{i}]") for i, x in enumerate(hs)]


def _check_aliasing(states, features) -> None:
    """No feature may share memory with any state's slots: one launch writes them all, so a
    feature another state's update overwrites could be read before or after the write.
    Precise overlap tests only where a feature lives in the storage of some state."""
    storages: dict = {}
    for j, st in enumerate(states):
        storages.setdefault((st.slots.device, st.slots.untyped_storage().data_ptr()), []).append(j)
    for i, f in enumerate(features):
        for j in storages.get((f.device, f.untyped_storage().data_ptr()), ()):
            if overlaps(f, states[j].slots):
                which = "its state's" if i == j else f"states[{j}]'s"
                raise ValueError(f"features[{i}] aliases {which} own storage; pass a separate tensor")


def _classes(states, hs) -> List[tuple]:
    """(representative index, t_new, member indices) per set of states with equal history."""
    first = states[0]
    launch, t, dtype, io_dtype, method = first._launch, first.t, first.dtype, first.io_dtype, first.method
    if launch is not None and hs.count(hs[0]) == len(hs):
        device = first.device
        for s in states:  # (a plain loop: every state of a model, at every full step)
            if not (s._launch is launch and s.t == t and s.dtype is dtype and s.io_dtype is io_dtype
                    and (s.method is method or _same_method(s.method, method)) and s.slots.device == device):
                break
        else:  # one history: one check
            return [(0, next_time(first, hs[0]), range(len(states)))]
    classes: List[list] = []
    for i, (st, hi) in enumerate(zip(states, hs)):
        t_new = next_time(st, hi)
        for c in classes:
            if c[1] == t_new and _same_history(states[c[0]], st):
                c[2].append(i)
                break
        else:
            classes.append([i, t_new, [i]])
    return [tuple(c) for c in classes]


# ---- running one class ----------------------------------------------------------------------------------
def _pure_copy(launch: Launch) -> bool:
    """A closed form's full step (and the calibrated reading's, after its fit): the feature
    copied into one slot."""
    return launch.coef == (1.0,) and launch.has_feature and not launch.reads and not launch.has_out


def _run_triton(launch: Launch, states: List[CacheState], flats: List[torch.Tensor]) -> int:
    from .ops import triton_fit as tf  # imported late: TRITON_INTERPRET must be settled

    spec = None
    if launch.fit is not None:
        inputs, coef, bounds, sharded = flatten_fit(launch.fit)
        spec = tf.fit_spec(launch.fit.slot, tuple(inputs), tuple(coef), tuple(bounds), PARALLEL, sharded)
    return tf.full_group_triton([st.slots for st in states], [st.numel for st in states], flats,
                                launch.reads, launch.has_feature, launch.writes, launch.coef, spec)


def _run_torch(launch: Launch, states: List[CacheState], flats: List[torch.Tensor]) -> int:
    calls = 0
    if launch.fit is not None:  # before the copy: it reads the old values
        inputs, coef, bounds, sharded = flatten_fit(launch.fit)
        calls += run_fit_group_torch([(st.slots, st.numel, f) for st, f in zip(states, flats)], launch.fit.slot,
                                     inputs, coef, bounds, sharded)
    if not (launch.writes or launch.has_out):
        return calls
    if _pure_copy(launch):
        w = launch.writes[0]
        torch._foreach_copy_([st.row(w) for st in states], flats)
        return calls + 1
    # other rows (r0/r4, the calibrated reading's first two full steps): update_'s own call per
    # state, so the result is its bits (the foreach form rounds differently from the C loop)
    for st, f in zip(states, flats):
        lincomb_torch(st.slots, f if launch.has_feature else None, None, st.numel, list(launch.reads),
                      list(launch.writes), list(launch.coef))
    return calls + len(states)
