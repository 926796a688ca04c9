"""Slot bookkeeping of CacheState: each launch moves the minimum number of full-size tensors
for its rule, roles that carry over are re-pointed (never copied), memory accounting agrees,
and dtype= stores the state in another precision than the features."""

from __future__ import annotations

import math

import pytest
import torch

import foca_kernels as fk
from foca_kernels.state import SLOT_ALIGN
from helpers import METHOD_IDS, METHODS, study

BACKEND = "torch"  # bookkeeping is backend-independent; the kernels are tested in test_parity


def planned(buf, full: bool, h: float = 1.0):
    """The launch the next step would run (plan() is pure: nothing changes until commit)."""
    t_new = 0.0 if buf.t is None else buf.t + h
    tr = buf.method.full(buf.context(t_new)) if full else buf.method.skip(buf.context(t_new))
    return buf.plan(tr, t_new)


def step(buf, full, x, h=1.0):
    if full:
        fk.update_(buf, x, h, backend=BACKEND)
        return None
    return fk.forecast(buf, h, backend=BACKEND)


# (reads of state slots, feature read, writes of state slots, out written) per step, with the
# minimum each rule needs:
#   FoCa skip (*):   F_c = (1+r) F - r F_prev + h/2 D_anchor depends on 3 stored tensors;
#                    F_c must be stored (next step's F) and returned: 3 reads + 2 writes.
#   FoCa full, secant: D_anchor = (X - F_full)/g needs X and F_full; X and D_anchor are new:
#                    2 reads + 2 writes (F_prev is the old F re-pointed, F_full = F one slot).
#   FoCa full, bdf2: D_anchor = BDF2(X, F, F_prev): 3 reads + 2 writes.
#   Closed forms (TaylorSeer, FoCa r3/r6/r7): full writes X into the oldest slot and reads
#   nothing; a skip reads the computed values its coefficients use; the state does not move.
#   Reuse skip: only out is written.
# Warm-up steps have less history and so fewer terms.
EXPECTED = {
    "foca-secant": [  # schedule: full, full, skip, skip, full, full, skip
        (0, True, 1, False), (1, True, 2, False), (3, False, 1, True), (3, False, 1, True),
        (1, True, 2, False), (1, True, 2, False), (3, False, 1, True),
    ],
    # closed forms over the last three computed values: a full step writes the feature into the
    # oldest slot and reads nothing; a skip reads the values its coefficients need (r6 after
    # adjacent full steps restarts from the previous computed value: X2's coefficient is 0).
    "foca-r3": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (3, False, 0, True),
    ],
    "foca-r7": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (3, False, 0, True),
    ],
    "foca-r6": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True),
    ],
    # r4 moves what r0 moves: its pull toward the anchored line reads F_full, which is F's
    # slot right after a full step and F_prev's on the next skip
    "foca-r4": [
        (0, True, 1, False), (1, True, 2, False), (3, False, 1, True), (3, False, 1, True),
        (1, True, 2, False), (1, True, 2, False), (3, False, 1, True),
    ],
    "foca-bdf2": [
        (0, True, 1, False), (1, True, 2, False), (3, False, 1, True), (3, False, 1, True),
        (2, True, 2, False), (2, True, 2, False), (3, False, 1, True),
    ],
    # TaylorSeer-m in closed form: the last m+1 computed values; a full step writes one slot,
    # a skip reads the values held (m+1 once enough full steps were seen)
    "taylorseer-1": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True),
    ],
    "taylorseer-2": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (3, False, 0, True),
    ],
    "taylorseer-3": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (4, False, 0, True),
    ],
    # TaylorSeer-2's state; the helpers' weights at (2, 1), (2, 2) and (4, 1) keep every term
    "fitted": [
        (0, True, 1, False), (0, True, 1, False), (2, False, 0, True), (2, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (3, False, 0, True),
    ],
    "reuse": [
        (0, True, 1, False), (0, True, 1, False), (1, False, 0, True), (1, False, 0, True),
        (0, True, 1, False), (0, True, 1, False), (1, False, 0, True),
    ],
}
SCHEDULE = [True, True, False, False, True, True, False]
STEPS = [1.0, 0.5, 1.0, 0.75, 1.5, 1.0, 0.5]


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_tensors_moved_is_the_minimum(method, opts):
    x = torch.randn(4, 5)
    buf = fk.allocate(x, method, **opts)
    expected = EXPECTED[next(i for (m, o), i in zip(METHODS, METHOD_IDS) if (m, o) == (method, opts))]
    for i, (full, h) in enumerate(zip(SCHEDULE, STEPS)):
        launch = planned(buf, full, h)
        got = (len(launch.reads), launch.has_feature, len(launch.writes), launch.has_out)
        assert got == expected[i], f"step {i} ({'full' if full else 'skip'}): {got} != {expected[i]}"
        assert launch.tensors_moved == sum(map(int, expected[i])), f"step {i}"
        # no column and no row is wasted: every slot read is used by some row, and no written
        # row is a plain copy of a stored slot (carrying a value over must be a re-point)
        n_in = len(launch.reads) + int(launch.has_feature)
        rows = [launch.coef[r * n_in:(r + 1) * n_in] for r in range(len(launch.writes) + int(launch.has_out))]
        for c in range(len(launch.reads)):
            assert any(row[c] != 0.0 for row in rows), f"step {i}: slot {launch.reads[c]} read but unused"
        for r, row in enumerate(rows[: len(launch.writes)]):
            nonzero = [c for c, v in enumerate(row) if v != 0.0]
            assert not (len(nonzero) == 1 and nonzero[0] < len(launch.reads) and row[nonzero[0]] == 1.0), \
                f"step {i}: slot {launch.writes[r]} written as a copy of slot {launch.reads[nonzero[0]]}"
        step(buf, full, x + i, h)


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_plan_is_pure(method, opts):
    x = torch.randn(6)
    buf = fk.allocate(x, method, **opts)
    for full in (True, True, False):
        before = (dict(buf._slot_of), dict(buf._time_of), buf.t, buf.n_full, buf.slots.clone())
        a, b = planned(buf, True), planned(buf, True)
        assert a == b
        if buf.ready:
            assert planned(buf, False) == planned(buf, False)
        assert (buf._slot_of, buf._time_of, buf.t, buf.n_full) == before[:4]
        assert torch.equal(buf.slots, before[4])
        step(buf, full, x * 2)


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_only_planned_slots_change_and_kept_roles_are_repointed(method, opts):
    """Run a schedule; at every step the slots the launch does not write are bit-identical
    afterwards, every role that keeps its value keeps its slot (or moves to the slot of the
    role it carries over: F_prev <- F), and no write lands in a slot a kept role holds."""
    g = torch.Generator().manual_seed(0)
    buf = fk.allocate(torch.zeros(3, 7), method, **opts)
    m = buf.method
    for i, (full, h) in enumerate(zip(SCHEDULE * 2, STEPS * 2)):
        t_new = 0.0 if buf.t is None else buf.t + h
        tr = m.full(buf.context(t_new)) if full else m.skip(buf.context(t_new))
        launch = buf.plan(tr, t_new)
        before = buf.slots.clone()
        old_slot = dict(buf._slot_of)
        old_views = {r: buf.role(r) for r in m.roles}
        step(buf, full, torch.randn(3, 7, generator=g), h)
        untouched = [s for s in range(m.n_slots) if s not in launch.writes]
        for s in untouched:
            assert torch.equal(buf.slots[s], before[s]), f"step {i}: slot {s} changed but was not planned"
        kept_slots = set()
        for role, v in tr.roles.items():
            if isinstance(v, fk.methods.Keep):
                assert buf._slot_of[role] == old_slot[v.role], f"step {i}: {role} <- {v.role} moved slots"
                new_view, old_view = buf.role(role), old_views[v.role]
                if old_view is not None:
                    assert new_view.data_ptr() == old_view.data_ptr()
                    assert torch.equal(new_view, before[old_slot[v.role], : buf.numel].view(buf.shape))
                    kept_slots.add(old_slot[v.role])
        assert not kept_slots & set(launch.writes), f"step {i}: a write landed on a kept role's slot"
        # distinct roles live in distinct slots, except FoCa's F_full, which is one tensor with
        # F after a full step and with F_prev after the skip that follows
        by_slot = {}
        for r, s in buf._slot_of.items():
            if s is not None:
                by_slot.setdefault(s, []).append(r)
        for s, rs in by_slot.items():
            if len(rs) > 1:
                assert isinstance(m, fk.FoCa) and m.anchor == "secant" and "F_full" in rs and len(rs) == 2, \
                    f"step {i}: roles {rs} share slot {s}"
                assert len({buf._time_of[r] for r in rs}) == 1, f"step {i}: {rs} share a slot but not a time"


def test_foca_skip_rotation_in_detail():
    """FoCa skip: the new F goes into the one slot no kept role holds, F_prev becomes the old
    F's slot, D_anchor and F_full stay where they are."""
    x = torch.randn(10)
    buf = fk.allocate(x, "foca", reading="r0")
    fk.update_(buf, x, backend=BACKEND)
    fk.update_(buf, x + 1, backend=BACKEND)
    for k in range(4):  # skips 1-2: F_prev is (still) F_full's slot; from the third: F_prev's slot is free
        s = dict(buf._slot_of)
        free = set(range(4)) - {s["F"], s["D_anchor"], s["F_full"]}
        assert len(free) == (2 if k == 0 else 1)  # right after a full step F is F_full
        launch = planned(buf, False)
        assert launch.writes == (min(free),)
        if k >= 2:
            assert launch.writes == (s["F_prev"],), "in place over F_prev, which the same pass reads"
        assert set(launch.reads) == {s["F"], s["F_prev"], s["D_anchor"]}
        old_f = buf.role("F").clone()
        fk.forecast(buf, backend=BACKEND)
        assert buf._slot_of == {"F": min(free), "F_prev": s["F"], "D_anchor": s["D_anchor"], "F_full": s["F_full"]}
        assert torch.equal(buf.role("F_prev"), old_f)


def test_foca_full_step_rotation_in_detail():
    x = torch.randn(10)
    buf = fk.allocate(x, "foca", reading="r0")
    fk.update_(buf, x, backend=BACKEND)
    fk.update_(buf, x + 1, backend=BACKEND)
    fk.forecast(buf, backend=BACKEND)
    s = dict(buf._slot_of)
    old_f = buf.role("F").clone()
    launch = planned(buf, True)
    assert set(launch.reads) == {s["F_full"]} and launch.has_feature
    assert s["F"] not in launch.writes, "the old F becomes F_prev: it must not be overwritten"
    fk.update_(buf, x + 2, backend=BACKEND)
    assert buf._slot_of["F_prev"] == s["F"]
    assert torch.equal(buf.role("F_prev"), old_f)
    assert buf._slot_of["F_full"] == buf._slot_of["F"]
    assert torch.equal(buf.role("F"), x + 2)


@pytest.mark.parametrize("method,opts,n_slots", [
    ("foca", {"anchor": "secant"}, 4), ("foca", {"anchor": "bdf2"}, 3), ("taylorseer", {"order": 1}, 2),
    ("taylorseer", {"order": 2}, 3), ("taylorseer", {"order": 3}, 4), ("reuse", {}, 1),
])
@pytest.mark.parametrize("shape", [(1,), (7,), (64,), (65,), (3, 5, 4), (2, 4097)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_nbytes(method, opts, n_slots, shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    buf = fk.allocate(x, method, **opts)
    padded = -(-math.prod(shape) // SLOT_ALIGN) * SLOT_ALIGN
    expected = n_slots * padded * x.element_size()
    assert buf.method.n_slots == n_slots
    assert buf.slots.shape == (n_slots, padded) and buf.slots.is_contiguous()
    assert buf.slots.stride(0) % SLOT_ALIGN == 0
    assert buf.nbytes == expected
    assert fk.state_nbytes(x, method, **opts) == expected
    assert fk.state_nbytes(shape, method, dtype=dtype, **opts) == expected
    assert fk.state_nbytes(torch.Size(shape), method, dtype=dtype, **opts) == expected
    assert fk.state_nbytes(buf) == expected
    # and the nbytes of a state kept in another dtype
    half = fk.allocate(x.float(), method, dtype=torch.bfloat16, **opts)
    assert half.nbytes == fk.state_nbytes(x.float(), method, dtype=torch.bfloat16, **opts) == n_slots * padded * 2


def test_state_nbytes_default_dtype_for_shapes():
    # fp32 unless told; default FoCa (calibrated): 3 values, 1 slope
    assert fk.state_nbytes((10,), "foca") == 4 * 64 * 4
    assert fk.state_nbytes((10,), "foca", reading="r7") == 3 * 64 * 4  # the closed forms keep 3 values
    assert fk.state_nbytes((10,), "foca", reading="r0") == 4 * 64 * 4


def test_dtype_option_stores_bf16_with_fp32_features():
    x = torch.randn(3, 70)
    buf = fk.allocate(x, "foca", reading="r0", dtype=torch.bfloat16)
    assert buf.slots.dtype == torch.bfloat16 and buf.dtype == torch.bfloat16
    assert buf.io_dtype == torch.float32
    fk.update_(buf, x, backend=BACKEND)
    fk.update_(buf, x * 2, backend=BACKEND)
    assert buf.role("F").dtype == torch.bfloat16
    assert torch.equal(buf.role("F"), (x * 2).bfloat16())  # stored once, rounded to nearest
    assert torch.equal(buf.role("F_prev"), x.bfloat16())
    y = fk.forecast(buf, backend=BACKEND)
    assert y.dtype == torch.float32 and y.shape == x.shape
    out = torch.empty_like(x)
    assert fk.forecast_(buf, out, backend=BACKEND) is out
    assert buf.nbytes == fk.allocate(x, "foca", reading="r0").nbytes // 2


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_counters_and_clock(method, opts):
    x = torch.randn(5)
    buf = fk.allocate(x, method, **opts)
    assert (buf.t, buf.n_full, buf.n_skip, buf.n_steps, buf.ready) == (None, 0, 0, 0, False)
    t = 0.0
    n_full = n_skip = 0
    for i, (full, h) in enumerate(zip(SCHEDULE, STEPS)):
        step(buf, full, x * i, h)
        t = 0.0 if i == 0 else t + h
        n_full += full
        n_skip = 0 if full else n_skip + 1
        assert (buf.t, buf.n_full, buf.n_skip, buf.n_steps) == (t, n_full, n_skip, i + 1)
        assert buf.ready == (n_full >= buf.method.min_full)
    assert "n_full=4" in repr(buf) and buf.method.describe() in repr(buf)


def test_update_leaves_feature_untouched_and_returns_state():
    x = torch.randn(4, 4)
    keep = x.clone()
    buf = fk.allocate(x)  # the default method (FoCa r7: closed form, X0 the newest value)
    assert fk.update_(buf, x, backend=BACKEND) is buf
    fk.update_(buf, x, backend=BACKEND)
    fk.forecast(buf, backend=BACKEND)
    fk.update_(buf, x, backend=BACKEND)
    assert torch.equal(x, keep)
    assert buf.role(buf.method.roles[0]).data_ptr() != x.data_ptr(), "the state keeps its own copy of the feature"


@pytest.mark.parametrize("method,opts", [
    ("foca", {"reading": "r7"}), ("foca", {"reading": "r3"}), (study("r6"), {}),
    ("taylorseer", {"order": 1}), ("taylorseer", {"order": 2}), ("taylorseer", {"order": 3}),
])
def test_rotation_plan_is_the_generic_plan(method, opts):
    """update_ plans a closed form's full step directly (CacheState.plan_rotation); it must be
    the launch the generic planner makes from the method's transition, bookkeeping included
    (slot order, times, memo), from the first full step on, over random schedules and steps."""
    import random

    rng = random.Random(0)
    buf = fk.allocate(torch.zeros(5), method, **opts)
    compared = 0
    for i in range(60):
        h = rng.choice([1.0, 0.5, 2.0, 0.3, 7.0])
        full = i < 2 or rng.random() < 0.4
        t = 0.0 if buf.t is None else buf.t + h
        if full:
            fast = buf.plan_rotation(t)
            slow = buf.plan(buf.method.full(buf.context(t)), t)
            assert fast == slow and list(fast.slot_of.items()) == list(slow.slot_of.items())
            assert list(fast.time_of.items()) == list(slow.time_of.items())
            compared += 1
            fk.update_(buf, torch.randn(5), h)
            assert buf._launch == slow
        else:
            fk.forecast(buf, h)
    assert compared >= 20
