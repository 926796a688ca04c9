"""update_shared_: a full step planned once for every state that shares a history (the hooks'
full steps) equals update_ per state, and falls back to update_ whenever the history differs."""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
import foca_kernels.api as api
import foca_kernels.step as step


@pytest.mark.parametrize("method,opts", [("foca", {}), ("foca", {"reading": "r0"}), ("taylorseer", {"order": 2}),
                                         ("reuse", {})])
def test_shared_full_steps_equal_update_and_plan_once(method, opts, monkeypatch):
    shapes = [(3, 7), (2, 16), (5, 5)]
    a = [fk.allocate(torch.empty(s), method, **opts) for s in shapes]  # reference: update_/forecast_
    b = [fk.allocate(torch.empty(s), method, **opts) for s in shapes]  # shared plans + StateGroup
    group = fk.StateGroup(b, fk.pack_states_(b))
    outs_a = [torch.empty(s) for s in shapes]
    plans_made = {"n": 0}
    real_plan = step.plan_step

    def counting(*args, **kwargs):
        plans_made["n"] += 1
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(step, "plan_step", counting)
    planned = []
    for k, kind in enumerate("FFFssFsssFsF"):
        h = 1.0 + 0.25 * (k % 3)
        if kind == "F":
            plans: dict = {}  # one per step, as the hooks keep it
            before = plans_made["n"]
            for x, y, s in zip(a, b, shapes):
                f = torch.randn(s)
                fk.update_(x, f, h)
                api.update_shared_(y, f, h, plans)
            planned.append(plans_made["n"] - before - len(a))  # plans made for b this step
        else:
            group.forecast_(h)
            for x, o in zip(a, outs_a):
                fk.forecast_(x, o, h)
            assert all(torch.equal(o, p) for o, p in zip(outs_a, group.outs))
        for x, y in zip(a, b):
            assert torch.equal(x.slots, y.slots) and x._time_of == y._time_of and x.t == y.t
    # A full step right after a grouped skip (shared launch) plans once for all three states;
    # the first full steps (fresh states, each with its own launch) plan per state.
    assert planned[0] == len(shapes) and planned[-1] == 1


def test_shared_plan_is_not_used_for_a_state_with_another_history():
    x, y = (fk.allocate(torch.empty(4, 4), "foca") for _ in range(2))
    group = fk.StateGroup([x, y], fk.pack_states_([x, y]))
    f = torch.randn(4, 4)
    for st in (x, y):
        fk.update_(st, f, 1.0)
        fk.update_(st, f + 1, 1.0)
    group.forecast_(1.0)  # x and y now share their last launch
    twin = fk.allocate(torch.empty(4, 4), "foca")
    for g in (f, f + 1):
        fk.update_(twin, g, 1.0)
    fk.forecast_(twin, torch.empty(4, 4), 1.0)
    fk.update_(twin, f + 3, 1.0)  # twin: one more full step than y will have shared
    plans: dict = {}
    api.update_shared_(x, f + 2, 1.0, plans)
    fk.update_(x, f + 3, 1.0)  # x moves on alone: its history now differs from y's
    api.update_shared_(y, f + 3, 1.0, plans)  # y's last launch is not the cached one's any more? it is:
    # y was committed by the same grouped launch as x before x's first update, so the cache hit
    # is legitimate for y; the result must equal a plain update_ on an identical twin.
    ref = fk.allocate(torch.empty(4, 4), "foca")
    for g in (f, f + 1):
        fk.update_(ref, g, 1.0)
    fk.forecast_(ref, torch.empty(4, 4), 1.0)
    fk.update_(ref, f + 3, 1.0)
    assert torch.equal(ref.role("X0"), y.role("X0")) and ref._time_of == y._time_of
