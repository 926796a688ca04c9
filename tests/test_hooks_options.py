"""Method options are keyword arguments in enable_cache / cached, as in allocate()."""

from __future__ import annotations

import pytest
import torch

from foca_kernels.hooks import CacheConfig, cache_states, cached, disable_cache, enable_cache
from test_hooks_plain import sample, toy


@pytest.mark.parametrize("kw,described", [
    (dict(anchor="bdf2"), "foca(reading=r0, anchor=bdf2)"),
    (dict(method="taylorseer", order=3), "taylorseer(order=3)"),
    (dict(method="foca", method_options={"anchor": "bdf2"}), "foca(reading=r0, anchor=bdf2)"),
    (dict(method_options={"anchor": "secant"}, anchor="bdf2"), "foca(reading=r0, anchor=bdf2)"),  # keyword wins
])
def test_method_options_as_keywords(kw, described):
    m = toy()
    enable_cache(m, interval=3, **kw)
    a = sample(m)
    assert {st.method.describe() for st in cache_states(m)} == {described}
    disable_cache(m)
    opts = {k: v for k, v in kw.items() if k not in ("method", "method_options")}
    cfg = CacheConfig(interval=3, method=kw.get("method", "foca"), method_options={**kw.get("method_options", {}), **opts})
    enable_cache(m, cfg)
    assert torch.equal(sample(m), a)
    disable_cache(m)


def test_options_on_top_of_a_config_and_in_cached():
    m = toy()
    with cached(m, CacheConfig(interval=3, method="taylorseer"), order=1):
        sample(m)
        assert {st.method.describe() for st in cache_states(m)} == {"taylorseer(order=1)"}


@pytest.mark.parametrize("kw,exc,match", [
    (dict(nosuch=1), TypeError, r"unknown option\(s\) \['nosuch'\]: neither CacheConfig fields nor options of method 'foca'"),
    (dict(method="reuse", anchor="bdf2"), TypeError, r"reuse takes no options"),
    (dict(anchor="bdf3"), ValueError, r"FoCa anchor must be one of"),
    (dict(method="taylorseer", order=True), TypeError, r"order must be an int"),
])
def test_bad_method_keywords(kw, exc, match):
    m = toy()
    with pytest.raises(exc, match=match):
        enable_cache(m, **kw)
    assert not hasattr(m, "_foca_cache") and "forward" not in m.__dict__
