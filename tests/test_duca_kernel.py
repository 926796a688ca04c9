"""The token-wise refresh of DuCa's conservative step (Triton through the interpreter, and the
PyTorch path) against the float64 reference (reference/duca.py), and its refusals.

The refresh only moves rows, so with the state stored in the features' dtype both paths must
equal the reference exactly; with a 16-bit state and fp32 features the fresh rows are rounded
once into the state, judged by the bf16 rule (at most twice plain torch's own rounding error).
"""

from __future__ import annotations

import pytest
import torch

from foca_kernels.duca import TokenCache, refresh_tokens_
from foca_kernels.duca import refresh_tokens_ as _refresh
from foca_kernels.duca.select import top_k
from helpers import assert_low_precision_rule, round_to, rounding_mode
from reference.duca import refresh_tokens as refresh_ref

SHAPES = [(1, 7, 9), (2, 13, 41), (3, 16, 48), (2, 33, 5)]  # odd token counts and hidden sizes
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(shape, dtype, k, gen, state_dtype=None, device="cpu"):
    b, n, c = shape
    cache = TokenCache.allocate(torch.empty(shape, dtype=dtype, device=device), dtype=state_dtype)
    cache.fill_(torch.randn(shape, generator=gen).to(device, dtype))
    cache.age.copy_(torch.randint(0, 5, (b, n), generator=gen, dtype=torch.int32))
    index = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)]).to(device)
    fresh = torch.randn(b, k, c, generator=gen).to(device, dtype)
    return cache, fresh, index


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_refresh_matches_reference_exactly(backend, device, dtype, shape, gen):
    for k in (0, 1, shape[1] // 3, shape[1]):
        cache, fresh, index = _case(shape, dtype, k, gen, device=device)
        exp_out, exp_val, exp_age = refresh_ref(cache.value.cpu(), cache.age.cpu(), fresh.cpu(), index.cpu())
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        assert refresh_tokens_(cache, out, fresh, index, backend=backend) is out
        assert torch.equal(out.cpu().double(), exp_out), f"k={k}: output rows differ"
        assert torch.equal(cache.value.cpu().double(), exp_val), f"k={k}: cached rows differ"
        assert torch.equal(cache.age.cpu().long(), exp_age), f"k={k}: staleness counters differ"


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=["bf16state", "fp16state"])
def test_low_precision_state_with_fp32_features(backend, device, state_dtype, gen):
    shape = (2, 37, 72)
    cache, fresh, index = _case(shape, torch.float32, 12, gen, state_dtype=state_dtype, device=device)
    before = cache.value.cpu().double()
    out = torch.empty(shape, dtype=torch.float32, device=device)
    refresh_tokens_(cache, out, fresh, index, backend=backend)
    _, exp_val, _ = refresh_ref(before, cache.age.cpu(), fresh.cpu().double(), index.cpu())
    plain = before.to(state_dtype).clone()  # plain torch: index_put in the state dtype
    for b in range(shape[0]):
        plain[b, index[b].cpu()] = fresh[b].cpu().to(state_dtype)
    mode = rounding_mode(backend, state_dtype, device)
    assert_low_precision_rule(cache.value, exp_val, {"torch": plain, "storage": round_to(exp_val, state_dtype, mode)},
                              name="state after refresh")
    # the output reads kept rows from the 16-bit state (exact widening) and fresh rows as given
    exp_out = cache.value.cpu().double().clone()
    for b in range(shape[0]):
        exp_out[b, index[b].cpu()] = fresh[b].cpu().double()
    assert torch.equal(out.cpu().double(), exp_out)


def _bad_calls(cache, fresh, index, out, backend):
    b, n, c = cache.shape

    def refresh_tokens_(*args):
        return _refresh(*args, backend=backend)

    yield "out of range", IndexError, lambda: refresh_tokens_(cache, out, fresh, index.clone().fill_(n))
    yield "out of range", IndexError, lambda: refresh_tokens_(cache, out, fresh, index.clone().fill_(-1))
    dup = index.clone()
    dup[:, 1] = dup[:, 0]
    yield "twice", ValueError, lambda: refresh_tokens_(cache, out, fresh, dup)
    yield "fresh must hold", ValueError, lambda: refresh_tokens_(cache, out, fresh[:, :-1], index)
    yield "index must be", ValueError, lambda: refresh_tokens_(cache, out, fresh, index[0])
    yield "int32 or int64", TypeError, lambda: refresh_tokens_(cache, out, fresh, index.float())
    yield "dtype", TypeError, lambda: refresh_tokens_(cache, out, fresh.half(), index)
    yield "out has shape", ValueError, lambda: refresh_tokens_(cache, out[:, :-1], fresh, index)
    yield "out has dtype", TypeError, lambda: refresh_tokens_(cache, out.double(), fresh, index)
    yield "aliases", ValueError, lambda: refresh_tokens_(cache, cache.value, fresh, index)
    strided = out.transpose(0, 1).contiguous().transpose(0, 1)
    yield "contiguous", ValueError, lambda: refresh_tokens_(cache, strided, fresh, index)
    too_many = torch.zeros(b, n + 1, c), torch.zeros(b, n + 1, dtype=torch.long)
    yield "only", ValueError, lambda: refresh_tokens_(cache, out, *too_many)


def test_bad_input_is_refused_and_state_unchanged(backend, gen):
    cache, fresh, index = _case((2, 9, 10), torch.float32, 3, gen)
    out = torch.zeros(cache.shape)
    value, age = cache.value.clone(), cache.age.clone()
    for words, exc, call in _bad_calls(cache, fresh, index, out, backend):
        with pytest.raises(exc, match=words):
            call()
        assert torch.equal(cache.value, value) and torch.equal(cache.age, age), \
            f"state changed by a refused call ({words})"
        assert not out.any(), f"out written by a refused call ({words})"


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_fresh_ratio_outside_unit_interval_is_refused(ratio):
    from foca_kernels.duca import DucaOptions

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        top_k(torch.rand(2, 16), ratio)
    with pytest.raises(ValueError, match=r"fresh_ratio must be in \[0, 1\]"):
        DucaOptions(fresh_ratio=ratio)


def test_token_cache_refuses_bad_state():
    with pytest.raises(ValueError, match="batch, tokens, channels"):
        TokenCache(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="dtype"):
        TokenCache(torch.zeros(1, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        TokenCache(torch.zeros(4, 2, 5).transpose(0, 1))
    cache = TokenCache.allocate(torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        cache.fill_(torch.zeros(1, 4, 6))
