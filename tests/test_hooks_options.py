"""Method options are keyword arguments in enable_cache / cached, as in allocate(); the
``compute_blocks`` option (blocks computed at every step)."""

from __future__ import annotations

import pytest
import torch

from foca_kernels.hooks import CacheConfig, cache_info, cache_states, cached, disable_cache, enable_cache
from foca_kernels.hooks.targets import block_position, select_sites
from test_hooks_plain import Toy, sample, toy


@pytest.mark.parametrize("kw,described", [
    (dict(method="foca", anchor="bdf2"), "foca(reading=r0, anchor=bdf2)"),
    (dict(method="taylorseer", order=3), "taylorseer(order=3)"),
    (dict(method="foca", method_options={"anchor": "bdf2"}), "foca(reading=r0, anchor=bdf2)"),
    # the keyword wins
    (dict(method="foca", method_options={"anchor": "secant"}, anchor="bdf2"), "foca(reading=r0, anchor=bdf2)"),
])
def test_method_options_as_keywords(kw, described):
    m = toy()
    enable_cache(m, interval=3, **kw)
    a = sample(m)
    assert {st.method.describe() for st in cache_states(m)} == {described}
    disable_cache(m)
    opts = {k: v for k, v in kw.items() if k not in ("method", "method_options")}
    cfg = CacheConfig(interval=3, method=kw.get("method", "foca"),
                      method_options={**kw.get("method_options", {}), **opts})
    enable_cache(m, cfg)
    assert torch.equal(sample(m), a)
    disable_cache(m)


def test_options_on_top_of_a_config_and_in_cached():
    m = toy()
    with cached(m, CacheConfig(interval=3, method="taylorseer"), order=1):
        sample(m)
        assert {st.method.describe() for st in cache_states(m)} == {"taylorseer(order=1)"}


@pytest.mark.parametrize("kw,exc,match", [
    (dict(nosuch=1), TypeError,
     r"unknown option\(s\) \['nosuch'\]: neither CacheConfig fields nor options of method 'taylorseer'"),
    (dict(anchor="bdf2"), TypeError,
     r"unknown option\(s\) \['anchor'\]: neither CacheConfig fields nor options of method 'taylorseer'"),
    (dict(method="reuse", anchor="bdf2"), TypeError, r"reuse takes no options"),
    (dict(method="foca", anchor="bdf3"), ValueError, r"FoCa anchor must be one of"),
    (dict(method="taylorseer", order=True), TypeError, r"order must be an int"),
])
def test_bad_method_keywords(kw, exc, match):
    m = toy()
    with pytest.raises(exc, match=match):
        enable_cache(m, **kw)
    assert not hasattr(m, "_foca_cache") and "forward" not in m.__dict__


# ---- compute_blocks: the first k (and last j) blocks of each block list computed every step ----
def toy4():
    torch.manual_seed(0)
    return Toy(n=4).eval()


def _sites(model, **kw):
    return [s.name for s in select_sites(model, CacheConfig(**kw))]


def _block(name):
    return int(name.split(".")[1])  # layers.<i>[.attn|.mlp]


@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("compute_blocks,kept", [
    (0, [0, 1, 2, 3]), (1, [1, 2, 3]), ((1, 0), [1, 2, 3]), ((0, 1), [0, 1, 2]), ((1, 1), [1, 2]), ((3, 0), [3]),
    ([0, 2], [0, 1]),
])
def test_compute_blocks_leaves_the_first_and_last_blocks_uncached(granularity, compute_blocks, kept):
    m = toy4()
    every = _sites(m, granularity=granularity)
    got = _sites(m, granularity=granularity, compute_blocks=compute_blocks)
    assert got == [n for n in every if _block(n) in kept]
    assert len(every) == 4 * (2 if granularity == "module" else 1)


def test_compute_blocks_normalised_and_validated():
    assert CacheConfig().compute_blocks == (0, 0)
    assert CacheConfig(compute_blocks=2).compute_blocks == (2, 0)
    assert CacheConfig(compute_blocks=[1, 3]).compute_blocks == (1, 3)
    for bad in (-1, True, 1.0, "1", (1,), (1, 2, 3), (1, -1), (True, 0), None):
        with pytest.raises(ValueError, match="compute_blocks must be"):
            CacheConfig(compute_blocks=bad)


def test_compute_blocks_refuses_when_meaningless():
    with pytest.raises(ValueError, match="lies in a block list"):
        enable_cache(toy4(), targets=[r"head"], compute_blocks=1)
    with pytest.raises(ValueError, match="nothing is left to cache"):
        enable_cache(toy4(), compute_blocks=(2, 2))
    m = toy4()  # a target outside the block lists stays cached
    assert _sites(m, targets=[r"head", r"layers\.\d+\.attn"], compute_blocks=(0, 3)) == ["layers.0.attn", "head"]


def test_block_position_is_the_outermost_block_list():
    m = toy4()
    assert block_position(m, "layers.2") == ("layers", 2, 4)
    assert block_position(m, "layers.2.mlp.0") == ("layers", 2, 4)  # not the nn.Sequential inside the block
    assert block_position(m, "head") is None


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_computed_blocks_run_every_step_and_match_explicit_targets(granularity):
    """compute_blocks=1 is the same cache as targets naming blocks 1.. only: bit for bit; and block 0's
    feed-forward runs at every step while block 1's runs on computed steps only."""
    m = toy4()
    calls = {0: 0, 1: 0}
    hooks = [m.layers[i].mlp[0].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in (0, 1)]
    with cached(m, interval=3, granularity=granularity, compute_blocks=1):
        got = sample(m)
        info = cache_info(m)
    for h in hooks:
        h.remove()
    steps = 10  # test_hooks_plain.TIMESTEPS
    assert calls[0] == steps
    assert calls[1] == info.steps_full < steps
    assert info.modules == 3 * (2 if granularity == "module" else 1)
    regex = r"layers\.[1-3]\.(attn|mlp)" if granularity == "module" else r"layers\.[1-3]"
    with cached(m, interval=3, granularity=granularity, targets=[regex]):
        assert torch.equal(sample(m), got)
