"""The FoCa readings (docs/method.md, "Readings"): the curvature weights c(x) the docs quote,
r0's inherited term, the closed forms' independence of older history, and the host-side memo
that a refused call must leave alone. Parity with the references, exactness on lines and the
order of accuracy of every reading are in test_parity.py / test_properties.py (METHODS)."""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.methods import DEFAULT_FOCA_READING, FOCA_READINGS
from reference import make_ref
from reference.trajectories import DEFAULT_READING


def _curvature_weights(method, opts, g=5, n_after=4):
    """c(x) for x = 1..n_after: forecasts of y = (t - 2g)^2 (unit steps, full every g-th step
    from t = 0, skips forecast in between) minus the anchored line X_0 + x A, over d2."""
    ref = make_ref(method, **opts)
    y = lambda t: torch.tensor([(t - 2.0 * g) ** 2], dtype=torch.float64)  # noqa: E731
    cs = []
    for t in range(2 * g + n_after + 1):
        if t % g == 0:
            ref.full(y(t), 1.0)
        elif ref.n_full >= ref.min_full:
            out = ref.forecast(1.0)
            if t > 2 * g:
                x = t - 2 * g
                a = (y(2 * g) - y(g)) / g
                d2 = (y(2 * g) - 2 * y(g) + y(0)) / (2 * g * g)
                cs.append(float((out - (y(2 * g) + x * a)) / d2))
        else:
            ref.full(y(t), 1.0)  # not ready yet: computed (as the hooks do)
    return cs


@pytest.mark.parametrize("method,opts,expected", [
    ("foca", {"reading": "r3"}, [2.5, 3.96, 4.43, 4.41]),
    ("foca", {"reading": "r6"}, [2.0, 3.0, 3.5, 3.75]),
    ("foca", {"reading": "r7"}, [2.5, 5.0, 7.5, 10.0]),
    ("taylorseer", {"order": 1}, [0.0, 0.0, 0.0, 0.0]),
    ("taylorseer", {"order": 2}, [1.0, 4.0, 9.0, 16.0]),
], ids=["r3", "r6", "r7", "ts1", "ts2"])
def test_curvature_weights_quoted_in_the_docs(method, opts, expected):
    assert _curvature_weights(method, opts) == pytest.approx(expected, abs=0.006)


def test_package_gives_the_same_curvature_weights():
    """The closed form (package, float64 bookkeeping through fp32 storage of exact integers)
    reproduces the reference's r3 weights."""
    g = 5
    buf = fk.allocate(torch.zeros(1), "foca", reading="r3")
    y = lambda t: torch.tensor([(t - 2.0 * g) ** 2])  # noqa: E731
    got = []
    for t in range(2 * g + 5):
        if t % g == 0 or not buf.ready:
            fk.update_(buf, y(t), 1.0, backend="torch")
        else:
            out = fk.forecast(buf, 1.0, backend="torch")
            if t > 2 * g:
                x = t - 2 * g
                got.append((float(out) - (0.0 + x * -5.0)) / 1.0)  # X_0 = 0, A = -5, d2 = 1
    assert got == pytest.approx([2.5, 3.958, 4.427, 4.414], abs=2e-3)


def test_r0_inherits_the_previous_windows_last_forecast():
    """r0 on unit steps: F(x) = X_0 + x A + (s_0 - A)(1 - 2^-x), s_0 = X_0 - F_last, with
    F_last the previous window's last forecast (full computes at 0, 1, 5, 9)."""
    ref = make_ref("foca", reading="r0")
    y = lambda t: torch.tensor([0.1 * t ** 3], dtype=torch.float64)  # noqa: E731
    f_last = None
    for t in range(0, 10):
        if t in (0, 1, 5, 9):
            ref.full(y(t), 1.0)
        else:
            f_last = ref.forecast(1.0)
    a = (y(9) - y(5)) / 4  # the anchor: secant of the last two full computes
    s0 = y(9) - f_last
    assert (s0 - a).abs().item() > 1.0, "control: the inherited term is not negligible here"
    for x in range(1, 4):
        got = ref.forecast(1.0)
        assert torch.allclose(got, y(9) + x * a + (s0 - a) * (1 - 2.0 ** -x), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("method,opts,m", [
    ("foca", {"reading": "r3"}, 3), ("foca", {"reading": "r6"}, 3), ("foca", {"reading": "r7"}, 3),
    ("taylorseer", {"order": 2}, 3),
], ids=["r3", "r6", "r7", "ts2"])
def test_closed_forms_ignore_older_history(method, opts, m):
    """What justifies storing only the last m computed values: in the recursive reference,
    perturbing any older computed value (or older forecast) changes no later forecast."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(20)]
    sched = [True, True, False, True, False, False, True, False, True, True, False, False, False,
             True, False, False, True, False, False, False]
    full_idx = [i for i, f in enumerate(sched) if f]

    def run(values):
        ref, outs = make_ref(method, **opts), {}
        for i, f in enumerate(sched):
            if f:
                ref.full(values[i], 1.0)
            else:
                outs[i] = ref.forecast(1.0)
        return outs

    base = run(xs)
    for k in range(len(full_idx) - m):
        old = full_idx[k]
        pert = list(xs)
        pert[old] = xs[old] + 10.0
        outs = run(pert)
        after = full_idx[k + m]  # from here on only newer values are held
        for i in base:
            if i > after:
                assert torch.allclose(outs[i], base[i], rtol=1e-12, atol=1e-12), (old, i)
        changed = [i for i in base if old < i < after and not torch.allclose(outs[i], base[i])]
        assert changed, "control: the perturbed value is used while it is among the last m"


@pytest.mark.parametrize("reading", ["r3", "r6", "r7"])
def test_refused_forecast_leaves_the_memo_alone(reading):
    """The window's coefficient vectors live on the host (Transition.memo); a refused call
    mid-window must not advance them: the next forecasts equal an undisturbed twin's."""
    a = fk.allocate(torch.zeros(6), "foca", reading=reading)
    b = fk.allocate(torch.zeros(6), "foca", reading=reading)
    g = torch.Generator().manual_seed(1)
    for buf in (a, b):
        g.manual_seed(1)
        for _ in range(3):
            fk.update_(buf, torch.randn(6, generator=g), 1.0)
        fk.forecast(buf, 1.0)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        fk.forecast_(a, torch.empty(7), 1.0)  # wrong shape
    with pytest.raises(ValueError):
        fk.forecast_(a, torch.empty(6), -1.0)  # bad step
    assert a._memo == b._memo
    for _ in range(3):
        assert torch.equal(fk.forecast(a, 0.5), fk.forecast(b, 0.5))


def test_readings_and_defaults():
    assert set(FOCA_READINGS) == {"r0", "r3", "r4", "r6", "r7", "calibrated"}
    assert DEFAULT_READING == DEFAULT_FOCA_READING, "reference and package must share the default reading"
    assert fk.allocate(torch.zeros(3), "foca").method.reading == DEFAULT_FOCA_READING
    assert fk.allocate(torch.zeros(3), "foca", anchor="bdf2").method.reading == "r0"
    with pytest.raises(ValueError, match="reading"):
        fk.allocate(torch.zeros(3), "foca", reading="r5")
    with pytest.raises(TypeError):
        fk.allocate(torch.zeros(3), "foca", reading="r3", anchor="bdf2")
    with pytest.raises(TypeError):
        fk.allocate(torch.zeros(3), "foca", reading="r4", anchor="bdf2")
    with pytest.raises(ValueError, match="contraction"):
        fk.allocate(torch.zeros(3), "foca", reading="r4", contraction=1.5)
