"""The FoCa readings (docs/method.md, "Readings"): the curvature weights c(x) the docs quote,
r0's inherited term, the closed forms' independence of older history, and the host-side memo
that a refused call must leave alone. Parity with the references, exactness on lines and the
order of accuracy of every reading are in test_parity.py / test_properties.py (METHODS)."""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.methods import DEFAULT_FOCA_READING, FOCA_READINGS, FOCA_STUDY_READINGS, FoCa, FoCaClosed, make_foca
from helpers import foca_reading, study
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
    method, opts = foca_reading(reading)  # r6: a study reading, as its Method
    a = fk.allocate(torch.zeros(6), method, **opts)
    b = fk.allocate(torch.zeros(6), method, **opts)
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
    assert set(FOCA_READINGS) == {"r0", "r3", "r7", "calibrated"}
    assert set(FOCA_STUDY_READINGS) == {"r4", "r6"}
    assert DEFAULT_READING == DEFAULT_FOCA_READING, "reference and package must share the default reading"
    assert fk.allocate(torch.zeros(3), "foca").method.reading == DEFAULT_FOCA_READING
    assert fk.allocate(torch.zeros(3), "foca", anchor="bdf2").method.reading == "r0"
    with pytest.raises(ValueError, match="reading"):
        fk.allocate(torch.zeros(3), "foca", reading="r5")
    with pytest.raises(TypeError):
        fk.allocate(torch.zeros(3), "foca", reading="r3", anchor="bdf2")
    with pytest.raises(TypeError):
        make_foca(reading="r4", anchor="bdf2")
    with pytest.raises(ValueError, match="contraction"):
        make_foca(reading="r4", contraction=1.5)
    with pytest.raises(TypeError, match="contraction"):
        fk.allocate(torch.zeros(3), "foca", reading="r0", contraction=0.5)


STUDY_REFUSAL = r"FoCa reading 'r[46]' is a study reading: .*no measured reason.*\('r0', 'r3', 'r7', 'calibrated'\)"


@pytest.mark.parametrize("reading", ["r4", "r6"])
def test_the_public_api_refuses_the_study_readings_by_name(reading):
    """r4 and r6 have no measured reason to choose them (docs/method.md, "Which reading to
    choose"): every call that takes a method by name refuses them with an error that names the
    public readings and the way to build them for a study; nothing is allocated or hooked."""
    from foca_kernels.hooks import cache_info, enable_cache
    from test_hooks_plain import toy

    x = torch.zeros(4, 3)
    calls = [
        lambda: fk.make_method("foca", reading=reading),
        lambda: fk.allocate(x, "foca", reading=reading),
        lambda: fk.state_nbytes(x, "foca", reading=reading),
        lambda: fk.CacheConfig(method="foca", method_options={"reading": reading}),
        lambda: fk.CacheConfig.build(method="foca", reading=reading),
        lambda: fk.make_method("rfc", base="foca", reading=reading),
        lambda: fk.allocate(x, "rfc", input=x, reading=reading),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=STUDY_REFUSAL) as e:
            call()
        assert f"make_foca(reading='{reading}')" in str(e.value)
    model = toy()
    with pytest.raises(ValueError, match=STUDY_REFUSAL):
        enable_cache(model, method="foca", reading=reading)
    with pytest.raises(ValueError, match=STUDY_REFUSAL):
        enable_cache(model, method="foca", method_options={"reading": reading})
    assert not cache_info(model).enabled, "a refused enable_cache leaves the model unhooked"


@pytest.mark.parametrize("reading,cls", [("r4", FoCa), ("r6", FoCaClosed)])
def test_make_foca_builds_the_study_readings(reading, cls):
    """The study readings are built as Methods and accepted wherever a method is: the state,
    its size, a cache configuration and RFC's base."""
    m = make_foca(reading=reading)
    assert isinstance(m, cls) and m.reading == reading and m is not make_foca(reading=reading)
    assert study(reading).describe() == m.describe()
    x = torch.zeros(4, 3)
    st = fk.allocate(x, m)
    assert st.method is m and fk.state_nbytes(x, m) == st.nbytes
    assert fk.make_method(m) is m
    cfg = fk.CacheConfig(method=m, interval=3)
    assert cfg.make_method() is m and cfg.method_spec is None
    if isinstance(m, FoCaClosed):  # a closed form: RFC's base, and the fp8 state
        assert fk.allocate(x, "rfc", input=x, base=m).method.base is m
        assert fk.CacheConfig(method=m, state_dtype=torch.float8_e4m3fn).make_method() is m
    with pytest.raises(TypeError, match="Method instance"):
        fk.allocate(x, m, reading=reading)
    from foca_kernels.hooks import cache_info, disable_cache, enable_cache
    from test_hooks_plain import sample, toy

    model = toy()
    enable_cache(model, method=m, interval=3)
    try:
        sample(model)
        info = cache_info(model)
        assert info.method == m.describe() and info.calls_forecast > 0
    finally:
        disable_cache(model)
