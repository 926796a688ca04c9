"""Non-finite features (policy in docs/method.md, "Non-finite features").

By default a nan/inf in a computed feature is stored like any other value: the kernels do
not look at the data (a check costs a reduction and a host sync per call). Methods whose
state is rebuilt from computed values only forget it once it has left their history; FoCa r0
and r4 carry their last forecast into the next window (F_prev at the first skip), so on a
periodic schedule the value never leaves. Opt-in checks: ``update_(check_finite=True)`` refuses the
feature (tests/test_refusals.py); ``CacheConfig(check_finite=True)`` resets that module's
cache instead of feeding it, after which every method recovers.

The calibrated reading's fit is the one step that sums over the whole tensor: one bad element
makes its five dot products non-finite. It then takes the reading's fixed weights, r7's
(phi, theta) = (1, 1/2), so the bad value stays in its element (docs/method.md). Checked on
every fit path (the compiled C loop, the PyTorch ops with the C loop off, Triton through the
interpreter), for update_ and update_group_, and sharded (a non-finite sum on another shard
makes this shard fall back too). The features are small integers on an even grid of full
steps, so r7's slope and forecast are exact in fp32: the fallback's results must EQUAL the
float64 reference's, bit for bit, on every path.
"""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.hooks import cache_info, disable_cache, enable_cache
from foca_kernels.ops import cpu_codegen
from foca_kernels.ops import fit as fit_ops
from helpers import assert_close, method_id, study
from reference.foca_calibrated import R7_WEIGHTS, FoCaCalibratedRef
from test_hooks_plain import toy

SHAPE = (4, 8)
INTERVAL = 3
# method, options, full steps after the bad one until forecasts are finite again (None: never)
RECOVERY = [
    ("reuse", {}, 1),
    ("taylorseer", {"order": 1}, 2),
    ("taylorseer", {"order": 2}, 3),
    ("taylorseer", {"order": 3}, 4),
    ("foca", {"anchor": "secant"}, None),
    ("foca", {"anchor": "bdf2"}, None),
    (study("r4"), {}, None),  # carries a forecast across windows, as r0 (a study reading, as a Method)
    # closed forms over the last three computed values
    ("foca", {"reading": "r3"}, 3),
    (study("r6"), {}, 3),
    ("foca", {"reading": "r7"}, 3),
    # the fit falls back to r7's weights while the value is among the X0..X3 it reads (four full
    # steps); on the last of them the slope's own three values are clean, so 3, as r7
    ("foca", {"reading": "calibrated"}, 3),
]


def _forecasts_after_bad_full_step(method, opts, backend, windows=8):
    """Periodic schedule F F s s F s s F ...; one nan in the feature of the third full step.
    Returns, per window after it, whether that window's forecasts were all finite."""
    g = torch.Generator().manual_seed(0)
    buf = fk.allocate(torch.zeros(SHAPE), method, **opts)
    finite = []
    for k in range(3 + windows):
        x = torch.randn(SHAPE, generator=g)
        if k == 2:
            x[1, 3] = float("nan")
        fk.update_(buf, x, backend=backend)
        if k < 1:
            continue
        ys = [fk.forecast(buf, backend=backend) for _ in range(INTERVAL - 1)]
        if k >= 2:
            finite.append(all(bool(torch.isfinite(y).all()) for y in ys))
    return finite


@pytest.mark.parametrize("method,opts,after", RECOVERY,
                         ids=[method_id(m, o) for m, o, _ in RECOVERY])
def test_which_methods_forget_a_nan(method, opts, after, backend):
    finite = _forecasts_after_bad_full_step(method, opts, backend)
    assert finite[0] is False  # the window right after the bad step forecasts from it
    if after is None:
        assert not any(finite), "FoCa carries the value into every later window (documented)"
    else:
        # window w follows full step 2 + w: finite once `after` clean full steps were taken
        assert finite == [w >= after for w in range(len(finite))]


@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse"])
def test_hooks_check_finite_resets_the_module_and_recovers(method):
    """A module whose computed output holds a nan at one computed step (step 4 of F F s s F ...)
    is reset instead of fed; with check_finite=False FoCa's later forecasts would keep the nan."""
    m = toy()
    attn = m.layers[0].attn

    def poison(mod, args):
        if ctl.current.step == 4:
            assert ctl.current.full
            x = args[0].clone()
            x[0, 0, 0] = float("nan")
            return (x,)
        return None

    outs = []
    enable_cache(m, method=method, interval=3, warmup=2, check_finite=True, targets=[r"layers\.\d+\.(attn|mlp)"])
    ctl = m.__dict__["_foca_cache"]
    handle = attn.register_forward_pre_hook(poison)
    recorder = attn.register_forward_hook(lambda mod, a, o: outs.append((ctl.current.step, o.clone())))
    timesteps = torch.linspace(999, 0, 30)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(fk.hooks.FocaCacheWarning, match=r"non-finite .*reset"):
        with torch.no_grad():
            for t in timesteps:
                x = x - 0.05 * torch.nan_to_num(m(x, timestep=t.expand(2)))
    handle.remove()
    recorder.remove()
    assert cache_info(m).calls_forecast > 0
    bad_step = next(s for s, o in outs if not torch.isfinite(o).all())
    later = [o for s, o in outs if s > bad_step + 1]
    assert later and all(torch.isfinite(o).all() for o in later), "a forecast still carries the nan"
    disable_cache(m)


# ---- the calibrated fit: a non-finite sum falls back to r7's weights -----------------------------------
INTERP_WARNINGS = "ignore:invalid value encountered:RuntimeWarning"  # the interpreter's numpy, on inf
BADS = {"inf": float("inf"), "nan": float("nan"), "-inf": float("-inf")}
GAP = 2.0  # full steps 2 apart (F s F s ...): every slope coefficient is a dyadic fraction
N_FULL = 10
BAD_AT = 4  # the bad feature's full step (fits run from full step 3 on: four values)
# full steps whose fit meets the bad value (in the feature, X0, X1 or X2 of the step) and falls back
FALLBACK = range(BAD_AT, BAD_AT + 4)
SHAPES = [(3, 5), (7,), (2, 2, 3)]  # the streams of a group; the bad value goes into stream 1
BAD_STREAM, BAD_INDEX = 1, 4


def _features(shape, seed):
    """Small integers: differences, halves and their sums are exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-8, 9, shape, generator=g).float() for _ in range(N_FULL)]


def _poison(xs, bad):
    xs = [x.clone() for x in xs]
    xs[BAD_AT].view(-1)[BAD_INDEX] = bad
    return xs


@pytest.fixture(params=["c", "torch-ops", "triton"])
def fit_path(request, monkeypatch):
    """(backend for the API, the compiled fit's results so far): the compiled C loop, the PyTorch
    ops with the C loop switched off (FOCA_KERNELS_CPU_CODEGEN=0), or Triton (interpreter)."""
    name = request.param
    if name == "c" and cpu_codegen.load() is None:
        pytest.skip(f"compiled CPU code unavailable: {cpu_codegen.status()}")
    if name == "torch-ops":
        monkeypatch.setenv(cpu_codegen.ENV, "0")
    if name == "triton" and fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    used, real = [], fit_ops.fit_cpu
    monkeypatch.setattr(fit_ops, "fit_cpu", lambda *a: used.append(real(*a)) or used[-1])
    yield ("triton" if name == "triton" else "torch"), used
    # the path under test really ran the fits
    if name == "c":
        assert used and all(used)
    else:
        assert not any(used)


def _same_bits(a, b) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _h(k: int) -> float:
    """The step before full step k: full steps GAP apart, each but the first followed by a skip."""
    return 1.0 if k == 0 else GAP if k == 1 else GAP - 1.0


def _reference(xs):
    """float64 reference along the schedule: (forecast, (phi, theta)) after each full step."""
    ref, out = FoCaCalibratedRef(), []
    for k, x in enumerate(xs):
        ref.full(x.double(), _h(k))
        out.append((ref.forecast(1.0) if k else None, (ref.phi, ref.theta)))
    return out


def _drive(xs_per_stream, backend, grouped):
    """The package along F s F s ...: each stream's forecast at the skipped step after each full step."""
    states = [fk.allocate(xs[0], "foca") for xs in xs_per_stream]
    outs = [[] for _ in states]
    for k in range(N_FULL):
        h = _h(k)
        feats = [xs[k] for xs in xs_per_stream]
        if grouped:
            fk.update_group_(states, feats, h, backend=backend)
        else:
            for st, f in zip(states, feats):
                fk.update_(st, f, h, backend=backend)
        for st, o in zip(states, outs):
            o.append(fk.forecast(st, 1.0, backend=backend) if k else None)
    return outs, states


def _check_bad_stream(outs, xs, name):
    """The stream that got the bad value, against the float64 reference (which falls back too)."""
    exp = _reference(xs)
    bad = torch.zeros(xs[0].shape, dtype=torch.bool)
    bad.view(-1)[BAD_INDEX] = True
    for k in range(1, N_FULL):
        got, (ref_out, weights) = outs[k], exp[k]
        if k in FALLBACK:
            assert weights == R7_WEIGHTS, f"{name} step {k}: the reference falls back to r7's weights"
            # the control: before the fallback the fit's weights were nan (PyTorch ops: every element
            # non-finite) or a clipped nan (C, Triton: finite, but not r7's): either fails below
            assert torch.isfinite(got[~bad]).all(), f"{name} step {k}: the bad value spread"
            assert torch.equal(got[~bad], ref_out[~bad].float()), (
                f"{name} step {k}: not r7's exact forecast\n{got}\n{ref_out}")
            # the bad element keeps its own value while it is in the slope's three values
            if k < BAD_AT + 3:
                assert not torch.isfinite(got[bad]).any(), f"{name} step {k}: the bad element was cleaned"
            else:
                assert torch.equal(got, ref_out.float()), f"{name} step {k}"
        else:
            assert k < 3 or weights != R7_WEIGHTS  # a real fit (the data are not a line)
            assert torch.isfinite(got).all()
            assert_close(got, ref_out, torch.float32, name=f"{name} step {k}")


@pytest.mark.filterwarnings(INTERP_WARNINGS)
@pytest.mark.parametrize("bad", list(BADS))
def test_calibrated_fit_keeps_a_nonfinite_value_local(bad, fit_path):
    """update_ (one stream): every other element of every later forecast is finite and is r7's
    forecast exactly while the fit meets the bad value; before and after, the fit's."""
    backend, _ = fit_path
    xs = _poison(_features(SHAPES[0], 0), BADS[bad])
    (outs,), _ = _drive([xs], backend, grouped=False)
    _check_bad_stream(outs, xs, f"{backend} {bad}")


@pytest.mark.filterwarnings(INTERP_WARNINGS)
@pytest.mark.parametrize("bad", list(BADS))
def test_calibrated_group_keeps_a_nonfinite_value_in_its_stream(bad, fit_path):
    """update_group_ (three streams, one class): the bad stream as with update_ (and bit-identical
    to its own update_ run), the other streams bit-identical to a run without the bad value."""
    backend, _ = fit_path
    clean = [_features(s, 10 + i) for i, s in enumerate(SHAPES)]
    dirty = [_poison(xs, BADS[bad]) if i == BAD_STREAM else xs for i, xs in enumerate(clean)]
    got, got_states = _drive(dirty, backend, grouped=True)
    ref, ref_states = _drive(clean, backend, grouped=True)
    alone, _ = _drive([dirty[BAD_STREAM]], backend, grouped=False)
    _check_bad_stream(got[BAD_STREAM], dirty[BAD_STREAM], f"{backend} {bad} grouped")
    for k in range(1, N_FULL):
        assert _same_bits(got[BAD_STREAM][k], alone[0][k]), f"step {k}: grouped != update_"
        for i in range(len(SHAPES)):
            if i != BAD_STREAM:
                assert torch.equal(got[i][k], ref[i][k]), f"stream {i} step {k}: changed by stream {BAD_STREAM}"
    for i, (a, b) in enumerate(zip(got_states, ref_states)):
        if i != BAD_STREAM:
            assert torch.equal(a.slots, b.slots), f"stream {i}: state changed by stream {BAD_STREAM}"


@pytest.mark.parametrize("grouped", [False, True], ids=["update_", "update_group_"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_sharded_fit_falls_back_when_another_shard_is_nonfinite(backend_name, grouped, monkeypatch):
    """``sharded=True``: the five sums are all-reduced before the solve, so a nan on another shard
    reaches this one's sums and every shard takes r7's weights alike. Stand-in all_reduce: a second
    shard identical to this one, except that at the bad step stream 1's u.u there is nan. This
    shard's data are clean: its stream 1 forecast after that step is r7's exactly (finite), later
    ones and the other streams are bit-identical to the run where no shard is bad. (The compiled C
    fit does not take a sharded fit: the PyTorch ops do.)"""
    if backend_name == "triton" and fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    poison = {"on": False}

    def all_reduce(t, *a, **k):
        other = t.clone()
        if poison["on"]:
            other.view(-1, 5)[BAD_STREAM if grouped else 0, 0] = float("nan")
        t.add_(other)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    streams = [_features(s, 20 + i) for i, s in enumerate(SHAPES)]
    if not grouped:
        streams = [streams[BAD_STREAM]]

    def run(poisoned):
        states = [fk.allocate(xs[0], "foca", sharded=True) for xs in streams]
        outs = [[] for _ in states]
        for k in range(N_FULL):
            poison["on"] = poisoned and k == BAD_AT
            h, feats = _h(k), [xs[k] for xs in streams]
            if grouped:
                fk.update_group_(states, feats, h, backend=backend_name)
            else:
                fk.update_(states[0], feats[0], h, backend=backend_name)
            for st, o in zip(states, outs):
                o.append(fk.forecast(st, 1.0, backend=backend_name) if k else None)
        return outs

    got, clean = run(True), run(False)
    target = BAD_STREAM if grouped else 0
    ref = FoCaCalibratedRef()  # this shard's stored values at the bad step (GAP apart) ...
    for k, x in enumerate(streams[target][:BAD_AT + 1]):
        ref.full(x.double(), GAP if k else 1.0)
    a, d = ref._slopes([c[0] for c in ref.computed], [c[1] for c in ref.computed])
    phi, theta = R7_WEIGHTS  # ... and r7's weights: the forecast one step on, exact in fp32
    r7 = (ref.computed[0][0] + (phi * a + theta * (d - a))).float()
    assert torch.equal(got[target][BAD_AT], r7), "not r7's exact forecast"
    assert not torch.equal(clean[target][BAD_AT], r7)  # the clean run did fit (its weights are not r7's)
    for k in range(1, N_FULL):
        for i in range(len(streams)):
            if i != target or k != BAD_AT:
                assert torch.equal(got[i][k], clean[i][k]), f"stream {i} step {k}"
