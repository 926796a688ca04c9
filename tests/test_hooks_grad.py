"""Caching is for inference, but a model called with grad enabled (no torch.no_grad) must still
work: cache writes record no autograd history, so nothing grows from one generation to the
next, and forecasts returned on skipped steps carry no graph."""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from helpers import assert_close
from foca_kernels.hooks import cache_info, cache_states, disable_cache, enable_cache
from test_hooks_plain import TIMESTEPS, sample, toy

CONFIGS = {
    "modules": dict(interval=3),  # generic defaults: layers.N.attn / layers.N.mlp outputs
    "block-residuals": dict(interval=3, targets=[(r"layers\.\d+", "residual")]),
}


def _generate(m):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    for t in TIMESTEPS:
        x = x - 0.05 * m(x, timestep=t.expand(2))
    return x


@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_forty_generations_with_grad_enabled(cfg, method):
    m = toy()
    assert torch.is_grad_enabled() and all(p.requires_grad for p in m.parameters())
    ref = sample(m)  # no_grad, uncached
    # backend "torch": the path whose in-place ops recorded history (Triton writes raw memory)
    enable_cache(m, method=method, backend="torch", **CONFIGS[cfg])
    ctl = m.__dict__["_foca_cache"]
    forecasts = []

    def pre(mod, args):
        mod._n = ctl.calls_forecast

    def post(mod, args, out):
        if ctl.calls_forecast > mod._n:  # this call was a forecast: the module did not run
            forecasts.append(out)

    handles = [s.module.register_forward_pre_hook(pre) for s in ctl.sites]
    handles += [s.module.register_forward_hook(post) for s in ctl.sites]
    nbytes = None
    for gen in range(40):
        forecasts.clear()
        x = _generate(m)
        assert x.grad_fn is not None  # computed steps keep the model's own graph, as uncached
        assert forecasts, "no step was forecast"
        for y in forecasts:
            assert not y.requires_grad and y.grad_fn is None, "a forecast carries autograd history"
        states = cache_states(m)
        assert states and all(not s.slots.requires_grad and s.slots.grad_fn is None for s in states)
        if nbytes is None:
            nbytes = cache_info(m).total_bytes
            with torch.no_grad():
                cached_no_grad = _generate(m)
            assert torch.equal(x.detach(), cached_no_grad), "grad mode changed the cached result"
        assert cache_info(m).total_bytes == nbytes
    for h in handles:
        h.remove()
    disable_cache(m)
    assert torch.equal(sample(m), ref)


def test_update_with_a_feature_that_requires_grad_records_nothing(backend):
    x = torch.randn(3, 4, requires_grad=True)
    buf = fk.allocate(x.detach(), "foca")
    fk.update_(buf, x * 2, backend=backend)
    fk.update_(buf, x * 3, backend=backend)
    assert not buf.slots.requires_grad and buf.slots.grad_fn is None
    y = fk.forecast(buf, backend=backend)
    assert not y.requires_grad and y.grad_fn is None
    assert_close(y, (x * 4).detach(), torch.float32, name="forecast of a straight line")
