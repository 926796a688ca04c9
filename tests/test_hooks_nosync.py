"""The per-step path makes no host-device sync by default (issue 8, item 3).

On a GPU a tensor read as a Python number (``float(t)``, ``t.item()``, ``bool(t)``, ...) waits
for every kernel queued before it. Without a GPU the test makes every tensor count as a device
tensor (``hooks.device_like()``) and records each tensor-to-Python conversion made from
foca_kernels' own frames during a whole cached generation: there must be none, full steps and
skipped steps alike, and the samples must equal those of the default (CPU-reading) run. With
a GPU, ``torch.cuda.set_sync_debug_mode("error")`` checks the real thing.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from foca_kernels.hooks import CacheConfig, FocaCacheWarning, cache_info, device_like, disable_cache, enable_cache

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)

STEPS = 20
CONVERSIONS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist")
HOST_RESULTS = ("equal", "allclose", "is_nonzero")  # torch functions that hand a tensor's value to Python

model_for = T.model_cache()


class _Recorder:
    """Wraps tensor-to-Python conversions; records those called from foca_kernels code."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        for name in HOST_RESULTS:
            monkeypatch.setattr(torch, name, self._wrap(name, getattr(torch, name)))

    def _wrap(self, name, fn):
        calls = self.calls

        def wrapped(t, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("foca_kernels"):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return fn(t, *a, **k)

        return wrapped


@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse", "rfc", "duca", "foca-calibrated"])
@pytest.mark.parametrize("cfg", ["batched", "separate"])
def test_no_tensor_is_read_on_the_host_during_a_generation(method, cfg, monkeypatch):
    """(foca-calibrated: its weights are fitted from the data at every full step, on the device.)"""
    case, m = T.CASES["dit"], model_for("dit")
    name, _, reading = method.partition("-")
    config = CacheConfig(interval=3, method=name, method_options={"reading": reading} if reading else {},
                         num_inference_steps=STEPS)
    enable_cache(m, config)
    expected = T.sample(case, m, steps=STEPS, cfg=cfg)  # CPU tensors: reading them is free
    disable_cache(m)

    enable_cache(m, config)
    with device_like():  # every tensor a GPU one
        rec = _Recorder(monkeypatch)
        got = T.sample(case, m, steps=STEPS, cfg=cfg)
        again = T.sample(case, m, steps=STEPS, cfg=cfg)  # the next generation is found by counting
        monkeypatch.undo()
    assert cache_info(m).host_syncs == 0
    disable_cache(m)
    assert rec.calls == []
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_time_timesteps_without_a_host_source_syncs_only_where_allowed():
    """time="timesteps" on a bare model needs each call's timestep: sync=None (default) reads
    it with one counted sync per call and warns once; sync=False refuses; sync=True reads
    without a warning."""
    case, m = T.CASES["dit"], model_for("dit")
    with device_like():
        enable_cache(m, CacheConfig(interval=3, time="timesteps", num_inference_steps=STEPS, sync=False))
        with pytest.raises(ValueError, match="sync=True"):
            T.sample(case, m, steps=STEPS)
        disable_cache(m)
        enable_cache(m, CacheConfig(interval=3, time="timesteps", num_inference_steps=STEPS))
        with pytest.warns(FocaCacheWarning, match="one host-device sync per model call"):
            T.sample(case, m, steps=STEPS)
        assert cache_info(m).host_syncs == STEPS
        disable_cache(m)
        enable_cache(m, CacheConfig(interval=3, time="timesteps", num_inference_steps=STEPS, sync=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FocaCacheWarning)
            T.sample(case, m, steps=STEPS)
        assert cache_info(m).host_syncs == STEPS
        disable_cache(m)


def test_sync_must_be_none_or_a_bool():
    with pytest.raises(TypeError, match="sync must be None or a bool"):
        CacheConfig(sync=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generation_makes_no_sync():
    case, m = T.CASES["dit"], T.CASES["dit"].make().cuda()
    enable_cache(m, CacheConfig(interval=3, num_inference_steps=STEPS))
    steps = {"n": 0}

    def guard(mod, args, kwargs):  # sync debugging on inside the model calls only
        torch.cuda.set_sync_debug_mode("error")
        steps["n"] += 1

    def unguard(mod, args, kwargs, out):
        torch.cuda.set_sync_debug_mode("default")

    h1 = m.register_forward_pre_hook(guard, with_kwargs=True)
    h2 = m.register_forward_hook(unguard, with_kwargs=True)
    try:
        case_latents = case.latents(1).cuda()
        conds = tuple(c.cuda() if isinstance(c, torch.Tensor) else c for c in case.conds(1))
        T.sample(case, m, steps=STEPS, latents=case_latents, conds=conds)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        h1.remove()
        h2.remove()
        disable_cache(m)
    assert steps["n"] == STEPS
