"""The fitted forecaster (methods/fitted.py) and its calibration (hooks/calibration.py).

A model whose cached module returns a polynomial in the timestep lets every property be
checked exactly: the calibration generation is the uncached one; on lines both fits keep
a = 1 and the fitted forecasts are exact, bit for bit, on the compiled C loop, the PyTorch ops
and Triton; on quadratics the fit finds TaylorSeer-2 (a = c = 1); on a cubic it forecasts
better than TaylorSeer-2. Parity with the float64 reference (fp32/fp16/bf16, odd sizes, unequal
steps) runs with every other method in test_parity.py / test_group.py (tests/helpers.py METHODS).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import foca_kernels as fk
from foca_kernels.hooks import (
    CacheConfig, FocaCacheWarning, Schedule, cache_info, calibrate, device_like, disable_cache, enable_cache,
    load_calibration,
)
from foca_kernels.hooks import calibration as calibrate_mod
from foca_kernels.hooks.calibration import A_RANGE, C_RANGE, _solve
from foca_kernels.registry import make_method
from foca_kernels.ops import cpu_codegen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 20


class Poly(nn.Module):
    """Returns sum_i coef[i] * t^i (t: the timestep), whatever its input."""

    def __init__(self, coefs):
        super().__init__()
        self.register_buffer("coefs", torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in coefs]))

    def forward(self, x, t):
        powers = torch.stack([t**i for i in range(len(self.coefs))]).reshape(-1, *([1] * x.dim()))
        return (self.coefs * powers).sum(0).expand_as(x)


class Model(nn.Module):
    def __init__(self, coefs):
        super().__init__()
        self.poly = Poly(coefs)

    def forward(self, x, timestep):
        return x + self.poly(x, timestep.float())


def model(kind: str, shape=(3, 5)) -> Model:
    g = torch.Generator().manual_seed(7)
    if kind == "line":  # integers: every forecast of a line-exact rule is exact in fp32
        coefs = [torch.randint(-8, 8, shape, generator=g).float() for _ in range(2)]
    elif kind == "quadratic":
        coefs = [torch.randn(shape, generator=g) for _ in range(2)] + [0.05 * torch.randn(shape, generator=g)]
    else:  # cubic: neither TaylorSeer-2 nor any fixed rule is exact
        coefs = [torch.randn(shape, generator=g) for _ in range(2)] + [
            0.05 * torch.randn(shape, generator=g), 0.004 * torch.randn(shape, generator=g)]
    return Model(coefs)


def generate(m: nn.Module, steps: int = STEPS, shape=(3, 5)) -> list:
    x = torch.zeros(shape)
    return [m(x, torch.tensor(float(s))) for s in range(steps)]


CFG = dict(interval=4, warmup=2, targets=["poly"], num_inference_steps=STEPS)


def calibrated(m, fit="line", **cfg):
    with calibrate(m, CacheConfig(**{**CFG, **cfg}), fit=fit) as cal:
        outs = generate(m)
    return cal, outs


# ---- the method ----------------------------------------------------------------------------
def test_empty_table_is_taylorseer2():
    x = [torch.randn(4, 7) for _ in range(9)]
    a, b = fk.allocate(x[0], "fitted"), fk.allocate(x[0], "taylorseer", order=2)
    oa, ob = torch.empty(4, 7), torch.empty(4, 7)
    for i, (h, full) in enumerate([(1, 1), (1, 1), (2, 1), (1, 0), (0.5, 0), (1, 1), (0.5, 0), (1, 1), (1, 0)]):
        if full:
            fk.update_(a, x[i], h)
            fk.update_(b, x[i], h)
        else:
            fk.forecast_(a, oa, h)
            fk.forecast_(b, ob, h)
            assert torch.equal(oa, ob)


def test_weights_apply_at_their_step_only():
    x = [torch.randn(4, 7) for _ in range(8)]
    w = {(3, 2): (0.5, -1.0)}
    a, b = fk.allocate(x[0], "fitted", weights=w), fk.allocate(x[0], "taylorseer", order=2)
    oa, ob = torch.empty(4, 7), torch.empty(4, 7)
    differs = []
    for i, full in enumerate([1, 1, 1, 0, 0, 0, 1, 0]):
        if full:
            fk.update_(a, x[i], 1.0)
            fk.update_(b, x[i], 1.0)
        else:
            fk.forecast_(a, oa, 1.0)
            fk.forecast_(b, ob, 1.0)
            differs.append(not torch.equal(oa, ob))
    assert differs == [False, True, False, False]  # only the 2nd skip after the 3rd full compute


@pytest.mark.parametrize("bad, match", [
    ({(0, 1): (1.0, 1.0)}, "key"), ({(2, 0): (1.0, 1.0)}, "key"), ({(2,): (1.0, 1.0)}, "key"),
    ({(2, 1.0): (1.0, 1.0)}, "key"), ({(2, 1): (1.0,)}, "pair"), ({(2, 1): "ab"}, "pair"),
    ({(2, 1): (float("nan"), 1.0)}, "finite"), ({(2, 1): (1.0, float("inf"))}, "finite"),
    ([(2, 1, 1.0, 1.0)], "mapping"),
])
def test_bad_weights_are_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_method("fitted", weights=bad)


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="weights= and pattern="):
        make_method("fitted", order=2)
    with pytest.raises(ValueError, match="pattern"):
        make_method("fitted", pattern="FFxs")


def test_solve_clips_and_falls_back():
    assert _solve("line", 1.0, 0.0, 1.0, 0.0, 0.0) == (1.0, 1.0)  # no curvature: TaylorSeer-2's c
    assert _solve("free", 0.5, 0.0, 1.0, 0.0, 0.0) == (0.5, 1.0)  # a alone
    a, c = _solve("free", 1.0, 100.0, 1.0, 0.0, 1.0)
    assert (a, c) == (1.0, C_RANGE[1])
    a, c = _solve("free", -5.0, 0.0, 1.0, 0.0, 1.0)
    assert a == A_RANGE[0]


# ---- calibration through the hooks ----------------------------------------------------------
def test_calibration_generation_is_the_uncached_one():
    m = model("cubic")
    plain = generate(m)
    cal, outs = calibrated(m, fit="free")
    assert all(torch.equal(a, b) for a, b in zip(plain, outs))
    assert not fk.hooks.is_cache_enabled(m)
    assert cal.pattern == Schedule(4, 2, 0).pattern(STEPS)
    skips = cal.pattern.count("s")
    assert cal.observed == skips and len(cal.weights) == skips


@pytest.mark.parametrize("fit", ["line", "free"])
def test_lines_keep_a_at_one(fit):
    cal, _ = calibrated(model("line"), fit=fit)
    assert cal.weights and all(abs(a - 1.0) < 1e-6 and c == 1.0 for a, c in cal.weights.values()), cal.weights


@pytest.mark.parametrize("fit", ["line", "free"])
def test_quadratics_give_the_exact_weights(fit, monkeypatch):
    """TaylorSeer-2's backward differences are not exact on a quadratic: with full computes a
    gap g apart, Y - D0 - D1 x = c2 (x^2 + g x) and D2 x^2/2 = c2 x^2 in every element, so
    (a, c) = (1, 1 + g/x) is exact and both fits must find it (clip range widened)."""
    monkeypatch.setattr(calibrate_mod, "C_RANGE", (-100.0, 100.0))
    cal, _ = calibrated(model("quadratic"), fit=fit)
    even = {k: v for k, v in cal.weights.items() if k[0] >= 4}  # X0, X1, X2 equally spaced (g = 4)
    assert even and all(abs(a - 1.0) < 1e-4 and abs(c - (1 + 4 / k)) < 1e-3 for (_, k), (a, c) in even.items()), even


def _paths():
    out = [("c", "torch", "1"), ("torch-ops", "torch", "0")]
    if fk.get_backend("cpu") == "triton":
        out.append(("triton", "triton", None))
    return out


@pytest.mark.parametrize("fit", ["line", "free"])
def test_fitted_is_exact_on_lines_and_bit_identical_across_backends(fit, monkeypatch):
    m = model("line")
    plain = generate(m)
    cal, _ = calibrated(m, fit=fit)
    runs = {}
    for name, backend, codegen in _paths():
        if codegen is not None:
            monkeypatch.setenv(cpu_codegen.ENV, codegen)
        if name == "c" and cpu_codegen.load() is None:
            continue
        enable_cache(m, cal.config, backend=backend)
        try:
            runs[name] = generate(m)
            assert cache_info(m).calls_forecast == cal.pattern.count("s")
        finally:
            disable_cache(m)
    assert len(runs) >= 2, runs.keys()
    for name, outs in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, plain)), name  # exact: lines


def test_fitted_beats_taylorseer2_on_a_cubic():
    m = model("cubic")
    plain = generate(m)
    cal, _ = calibrated(m, fit="free")

    def error(config):
        with fk.hooks.cached(m, config):
            outs = generate(m)
        return sum(float((a - b).double().pow(2).sum()) for a, b in zip(outs, plain))

    fitted, ts2 = error(cal.config), error(CacheConfig(**CFG))
    assert fitted < 0.5 * ts2, (fitted, ts2)


def test_calibration_under_device_like():
    m = model("cubic")
    with device_like():
        cal, _ = calibrated(m, fit="free")
    ref, _ = calibrated(m, fit="free")
    assert cal.weights == ref.weights


def test_save_and_load(tmp_path):
    m = model("cubic")
    cal, _ = calibrated(m, fit="free")
    path = tmp_path / "weights.json"
    cal.save(path)
    opts = load_calibration(path)
    assert opts["method"] == "fitted" and opts["pattern"] == cal.pattern and opts["weights"] == cal.weights
    enable_cache(m, CacheConfig(**CFG), **opts)
    try:
        loaded = generate(m)
    finally:
        disable_cache(m)
    with fk.hooks.cached(m, cal.config):
        direct = generate(m)
    assert all(torch.equal(a, b) for a, b in zip(loaded, direct))
    path.write_text(json.dumps({"method": "fitted", "weights": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match=r"\[n_full, k, a, c\]"):
        load_calibration(path)
    path.write_text(json.dumps({"method": "taylorseer"}))
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(path)


def test_weights_for_another_schedule_are_refused():
    m = model("cubic")
    cal, _ = calibrated(m)
    enable_cache(m, cal.config, interval=3)
    try:
        with pytest.raises(ValueError, match="calibrate again for this schedule"):
            generate(m)
    finally:
        disable_cache(m)


def test_weights_without_a_step_count_warn():
    m = model("cubic")
    cal, _ = calibrated(m)
    enable_cache(m, cal.config, num_inference_steps=None)
    try:
        with pytest.warns(FocaCacheWarning, match="cannot be checked"):
            generate(m)
    finally:
        disable_cache(m)


def test_calibrate_refuses_what_it_cannot_fit():
    m = model("cubic")
    with pytest.raises(ValueError, match="fitted"):
        with calibrate(m, CacheConfig(**CFG, method="foca")):
            pass
    with pytest.raises(ValueError, match="fixed schedule"):
        with calibrate(m, CacheConfig(**CFG, schedule="rcs")):
            pass
    assert not fk.hooks.is_cache_enabled(m)
    with calibrate(m, CacheConfig(**CFG)) as cal:
        pass  # no generation
    with pytest.raises(RuntimeError, match="no skipped step"):
        cal.config


def test_check_keeps_the_fit_only_where_it_holds_in_closed_loop():
    m = model("cubic")
    cal, ref = calibrated(m, fit="free")
    cfg = cal.check(m, lambda: generate(m), torch.stack(ref))
    assert cal.choice == "fitted" and cfg.method == "fitted"  # the cubic: the fit is better (above)
    assert cal.check_scores["fitted"] > cal.check_scores["taylorseer"]
    assert not fk.hooks.is_cache_enabled(m)
    # weights that are worse than TaylorSeer-2 in closed loop are not kept
    bad = {k: (0.0, 0.0) for k in cal.weights}  # reuse at every skip
    cal.weights = bad
    cfg = cal.check(m, lambda: generate(m), torch.stack(ref))
    assert cal.choice == "taylorseer" and cfg.method == "taylorseer" and cfg.method_options == {"order": 2}
    with pytest.raises(ValueError, match="repeat the calibration generation"):
        cal.check(m, lambda: generate(m)[:-1], torch.stack(ref))
    assert not fk.hooks.is_cache_enabled(m)


def test_confident_check_needs_the_difference_above_its_noise():
    """keep="confident": the fit only if the one-sided 95% lower bound of the paired per-sample
    difference is above zero. Outputs that favour the fit on average by less than their spread
    keep TaylorSeer-2 under it (and the fit under keep="mean")."""
    m = model("cubic")
    cal, ref = calibrated(m, fit="free")
    cfg = cal.check(m, lambda: generate(m), torch.stack(ref), keep="confident")  # a clear win holds
    assert cal.choice == "fitted" and cfg.method == "fitted" and cal.check_difference[1] > 0
    # per-sample log10 errors: the fit 3 dB better on two samples, 2 dB worse on two (mean +0.5)
    ref4 = torch.zeros(4, 8, dtype=torch.float64)
    err_fit = torch.tensor([10 ** -0.3, 10 ** 0.2, 10 ** -0.3, 10 ** 0.2], dtype=torch.float64).sqrt()
    outs = {"fitted": ref4 + err_fit[:, None], "taylorseer": ref4 + 1.0}
    calls = []

    def gen():
        calls.append("taylorseer" if fk.hooks.cache_info(m).method.startswith("taylorseer") else "fitted")
        return outs[calls[-1]]

    picks = {}
    for keep in ("mean", "confident"):
        cal.check(m, gen, ref4, keep=keep)
        picks[keep] = cal.choice
    mean, low = cal.check_difference
    assert calls == ["fitted", "taylorseer"] * 2
    assert mean == pytest.approx(0.5, abs=1e-9)
    se = (torch.tensor([3.0, -2.0, 3.0, -2.0]).std().item()) / 2
    assert low == pytest.approx(0.5 - 2.353363 * se, abs=1e-5)  # t(0.95, 3 df) = 2.353363
    assert picks == {"mean": "fitted", "confident": "taylorseer"}
    with pytest.raises(ValueError, match="keep must be one of"):
        cal.check(m, gen, ref4, keep="median")
    with pytest.raises(ValueError, match=">= 2 samples"):
        cal.check(m, lambda: ref4[0], ref4[0].reshape(-1)[:1].reshape(()), keep="confident")
    assert not fk.hooks.is_cache_enabled(m)


@pytest.mark.parametrize("df,quantile", [(1, 6.313752), (3, 2.353363), (7, 1.894579), (30, 1.697261)])
def test_t_quantile_95(df, quantile):
    assert calibrate_mod.t_quantile_95(df) == pytest.approx(quantile, abs=2e-6)
