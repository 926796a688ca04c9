"""DuCa's token selection and step pattern (foca_kernels/duca, fp32) against the float64
reference (reference/duca.py): scores, bonuses, top-k, fresh-ratio schedule, phases."""

from __future__ import annotations

import pytest
import torch

from foca_kernels.duca import pattern
from foca_kernels.duca.select import add_spatial_bonus_, add_staleness_, fresh_ratio, top_k, v_norm_score
from foca_kernels.hooks import Schedule
from reference import duca as R


def test_v_norm_score(gen):
    v = torch.randn(3, 25, 4 * 8, generator=gen) * 2
    got = v_norm_score(v, heads=4)
    exp = R.v_norm_score(v.double(), heads=4)
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)
    # a token with smaller value norms scores higher (DuCa's 1 - ||v||)
    v2 = v.clone()
    v2[:, 3] *= 0.1
    assert (v_norm_score(v2, 4)[:, 3] > v_norm_score(v2, 4).median(dim=1).values).all()


@pytest.mark.parametrize("grid,size", [((6, 6), 2), ((5, 7), 2), ((8, 8), 4), ((3, 3), 2)])
def test_spatial_bonus(grid, size, gen):
    score = torch.randn(2, grid[0] * grid[1], generator=gen)
    got = add_spatial_bonus_(score.clone(), grid, 0.8, size)
    exp = R.spatial_bonus(score.double(), grid, 0.8, size)
    torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-6)
    assert (got >= score).all()  # a bonus never lowers a score, even a negative one


def test_staleness_and_selection(gen):
    score = torch.randn(4, 64, generator=gen)
    age = torch.randint(0, 6, (4, 64), generator=gen, dtype=torch.int32)
    got = add_staleness_(score.clone(), age, 0.25, 5)
    exp = score.double() + R.staleness_bonus(age, 0.25, 5)
    torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-6)
    for ratio in (0.0, 0.07, 0.175, 0.5, 1.0):
        idx = top_k(got, ratio)
        assert idx.shape == (4, int(ratio * 64 + 1e-9))
        assert torch.equal(idx, R.select(exp, ratio))
        if idx.shape[1]:
            kth = got.gather(1, idx).min(dim=1).values
            rest = got.scatter(1, idx, float("-inf")).max(dim=1).values
            assert (kth >= rest).all()


@pytest.mark.parametrize("schedule,weight", [("constant", 0.0), ("linear", 2.0), ("linear", 0.4), ("exp", 0.9)])
def test_fresh_ratio_schedule(schedule, weight):
    for step in range(50):
        expected = R.fresh_ratio(step, 50, 0.175, schedule, weight)
        assert fresh_ratio(step, 50, 0.175, schedule, weight) == pytest.approx(expected)
    if schedule == "linear" and weight == 2.0:  # DuCa-DiT's step factor: 0 for the first quarter
        assert fresh_ratio(5, 50, 0.175, schedule, weight) == 0.0
        assert fresh_ratio(49, 50, 0.175, schedule, weight) == pytest.approx(0.175 * (1 - 2 + 4 * 49 / 50))


@pytest.mark.parametrize("order", ["code", "alternate"])
@pytest.mark.parametrize("interval,warmup,final", [(2, 1, 0), (3, 2, 0), (4, 2, 1), (5, 2, 0), (6, 3, 2)])
def test_phases(order, interval, warmup, final):
    sched = Schedule(interval, warmup, final)
    full = [c == "F" for c in sched.pattern(30)]
    exp = "".join({"full": "F", "conservative": "c", "aggressive": "a"}[p] for p in R.phases(full, order))
    assert pattern(sched, 30, order) == exp
    if order == "code":  # the skipped step right before a full step is conservative
        assert all(exp[i] == "c" for i in range(len(exp) - 1) if exp[i] != "F" and exp[i + 1] == "F")
