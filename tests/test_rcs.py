"""Schedule "rcs" in the hooks: one decision per model call, shared by every cached module,
by both CFG branches (separate contexts) and every batch row (batched CFG); its limits (warm-up,
max gap) reduce it to the fixed schedule; one host read per decided step; refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from foca_kernels.hooks import CacheConfig, cache_info, disable_cache, enable_cache
from foca_kernels.hooks.apply import _controller

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)

STEPS = 16
model_for = T.model_cache()


def _run(config, cfg="none", batch=2):
    case, m = T.CASES["dit"], model_for("dit")
    enable_cache(m, config)
    try:
        x = T.sample(case, m, steps=STEPS, cfg=cfg, batch=batch)
        return x, cache_info(m), _controller(m).rcs
    finally:
        disable_cache(m)


def _uncached(cfg="none", batch=2):
    case, m = T.CASES["dit"], model_for("dit")
    return T.sample(case, m, steps=STEPS, cfg=cfg, batch=batch)


@pytest.mark.parametrize("method", ["foca", "rfc"])
@pytest.mark.parametrize("cfg", ["none", "batched", "separate"])
def test_one_decision_per_call_for_every_module_and_branch(method, cfg):
    config = CacheConfig(method=method, schedule="rcs", rcs_threshold=2.5, rcs_max_gap=6, num_inference_steps=STEPS)
    _, info, rcs = _run(config, cfg)
    pattern = info.pattern
    assert len(pattern) == STEPS and "s" in pattern and pattern.count("F") > 2
    contexts = ["cond", "uncond"] if cfg == "separate" else ["default"]
    for name in contexts:  # each context took the same decisions (the first one decided them)
        s = info.contexts[name]
        assert s["steps_full"] == pattern.count("F") and s["steps_skipped"] == pattern.count("s")
    estimated = [(c, k) for c, k, e, _ in rcs.log if e is not None]
    assert {c for c, _ in estimated} == {contexts[0]}  # only the first context estimated
    modules = len(_controller_sites())
    n_ctx = len(contexts)
    # every cached module of a call computed, or every one forecast (none forced after warm-up)
    assert info.calls_forced == 0
    assert info.calls_computed == modules * n_ctx * pattern.count("F")
    assert info.calls_forecast == modules * n_ctx * pattern.count("s")


def _controller_sites():
    m = model_for("dit")
    enable_cache(m, CacheConfig())
    try:
        return _controller(m).sites
    finally:
        disable_cache(m)


def test_threshold_zero_computes_every_step():
    config = CacheConfig(method="foca", schedule="rcs", rcs_threshold=0.0, num_inference_steps=STEPS)
    x, info, _ = _run(config, "batched")
    assert info.pattern == "F" * STEPS
    assert torch.equal(x, _uncached("batched"))


@pytest.mark.parametrize("gap", [3, 5])
def test_never_over_threshold_is_the_fixed_schedule_at_max_gap(gap):
    """A threshold never reached leaves the warm-up and the max gap: the fixed schedule with
    interval = rcs_max_gap, and the same samples bit for bit."""
    rcs = CacheConfig(method="foca", schedule="rcs", rcs_threshold=1e9, rcs_max_gap=gap, num_inference_steps=STEPS)
    fixed = CacheConfig(method="foca", interval=gap, num_inference_steps=STEPS)
    x, info, _ = _run(rcs, "separate")
    y, _, _ = _run(fixed, "separate")
    assert info.pattern == fixed.pattern(STEPS)
    assert torch.equal(x, y)


def test_batch_rows_take_one_decision():
    """Batched rows take one decision, from the largest row estimate: two copies of a sample
    decide as that sample alone (a per-row estimate, not diluted by the batch) and get equal
    output rows."""
    config = CacheConfig(method="foca", schedule="rcs", rcs_threshold=2.5, rcs_max_gap=8, num_inference_steps=STEPS)
    case, m = T.CASES["dit"], model_for("dit")
    lat = case.latents(1)
    cond, uncond = case.conds(1)
    enable_cache(m, config)
    try:
        one = T.sample(case, m, steps=STEPS, latents=lat, conds=(cond, uncond))
        p_one = cache_info(m).pattern
        two = T.sample(case, m, steps=STEPS, latents=torch.cat([lat, lat]),
                       conds=(T._cat(cond, cond), T._cat(uncond, uncond)))
        p_two = cache_info(m).pattern
    finally:
        disable_cache(m)
    assert p_one == p_two and "s" in p_one
    assert torch.equal(two[0], two[1]) and one.shape[0] == 1


def test_one_host_read_per_decided_step(monkeypatch):
    from foca_kernels.hooks import controller as controller_mod

    config = CacheConfig(method="foca", schedule="rcs", rcs_threshold=2.5, rcs_max_gap=6, num_inference_steps=STEPS)
    monkeypatch.setattr(controller_mod, "on_host", lambda t: False)  # every tensor a GPU one
    calls = []
    for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist"):
        fn = getattr(torch.Tensor, name)

        def wrapped(t, *a, _fn=fn, _name=name, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("foca_kernels"):
                calls.append((_name, caller))
            return _fn(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    _, info, rcs = _run(config, "separate")
    monkeypatch.undo()
    decided = sum(1 for _, _, e, _ in rcs.log if e is not None)
    assert decided > 0
    assert calls == [("__float__", "foca_kernels.hooks.rcs")] * decided


def test_refusals():
    with pytest.raises(ValueError, match="schedule must be one of"):
        CacheConfig(schedule="adaptive")
    with pytest.raises(ValueError, match="rcs_threshold"):
        CacheConfig(schedule="rcs", rcs_threshold=-1.0)
    with pytest.raises(ValueError, match="rcs_threshold"):
        CacheConfig(schedule="rcs", rcs_threshold=float("nan"))
    with pytest.raises(ValueError, match="rcs_max_gap"):
        CacheConfig(schedule="rcs", rcs_max_gap=0)
    with pytest.raises(ValueError, match="rcs_reduce"):
        CacheConfig(schedule="rcs", rcs_reduce="mean")
    with pytest.raises(ValueError, match="no mask"):
        CacheConfig(schedule="rcs", mask=[True, False])
    with pytest.raises(ValueError, match="duca"):
        CacheConfig(schedule="rcs", method="duca")
