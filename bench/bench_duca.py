"""Time DuCa's conservative-step cache update (the token-wise refresh) per provider.

    python -m pytest bench/bench_duca.py -p no:cacheprovider

Providers (B samples x N tokens x C channels, k = floor(0.175 N) fresh tokens per sample):
  fused     foca_kernels.duca.refresh_tokens_: the Triton kernel on CUDA, the PyTorch path on
            CPU. One pass: reads the kept cached rows and the fresh rows, writes the output and
            the fresh rows of the state, and the int32 row map / staleness counters.
  eager     what DuCa's public code does: scatter the fresh rows into the cache, then hand a
            copy of the cache to the model (scatter_ + clone), counters updated separately
  select    the token choice before it: v-norm score + staleness + 2x2 spatial bonus + top-k
            (host-heavy: several small launches; its time is mostly host time at these sizes)
  copy_floor  a plain copy of the bytes the fused refresh must move (its memory-bound floor)

bytes moved (fused): (N - k + k) rows read + (N + k) rows written, of C elements, per sample,
plus 4 bytes x (map + counter read + counter write) per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench_kernels import DEVICE, ROUND_BUDGET_S, _copy_fn, _plan, _seconds, _SyncEvery
from foca_kernels.duca import TokenCache, refresh_tokens_
from foca_kernels.duca.select import add_spatial_bonus_, add_staleness_, square_grid, top_k, v_norm_score

SIZES = {"dit-xl2-256px": (2, 256, 1152), "flux-1024px": (1, 4096, 3072)}  # (B, N, C); FLUX: image tokens
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RATIO = 0.175
PROVIDERS = ("fused", "eager", "select", "copy_floor")


def _bytes_moved(b, n, c, k, esize):
    return b * ((n + n + k) * c * esize + 3 * 4 * n)  # read N rows, write N + k rows; 3 int32 per token


def _setup(size, dtype):
    b, n, c = SIZES[size]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(b, n, c, generator=g, device=DEVICE).to(dtype)
    cache = TokenCache.allocate(x).fill_(x)
    k = int(RATIO * n)
    index = torch.stack([torch.randperm(n, generator=g, device=DEVICE)[:k] for _ in range(b)])
    fresh = torch.randn(b, k, c, generator=g, device=DEVICE).to(dtype)
    return cache, fresh, index, (b, n, c, k)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
def test_conservative_step(benchmark, size, dtype, provider, foca_bench_rows):
    cache, fresh, index, (b, n, c, k) = _setup(size, DTYPES[dtype])
    nbytes = _bytes_moved(b, n, c, k, cache.value.element_size())
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    if provider == "fused":
        out = torch.empty_like(cache.value)
        fn = lambda: refresh_tokens_(cache, out, fresh, index, backend=backend, check_indices=False)  # noqa: E731
    elif provider == "eager":
        value, age = cache.value, cache.age
        idx3 = index.unsqueeze(-1).expand(-1, -1, c)

        def fn():
            value.scatter_(1, idx3, fresh)
            age.add_(1).scatter_(1, index, 0)
            return value.clone()
    elif provider == "select":
        v = torch.randn(b, n, c, device=DEVICE, dtype=DTYPES[dtype])
        grid = square_grid(n)

        def fn():
            s = v_norm_score(v, 16)
            add_staleness_(s, cache.age, 0.25, 5)
            add_spatial_bonus_(s, grid, 0.8, 2)
            return top_k(s, RATIO)
    else:
        fn = _copy_fn(nbytes)

    iterations, rounds = _plan(fn)
    benchmark.group = f"duca conservative {size} {dtype}"
    benchmark.pedantic(_SyncEvery(fn, iterations), rounds=rounds, iterations=iterations, warmup_rounds=1)
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    floor = min(_seconds(_copy_fn(nbytes), ROUND_BUDGET_S / 2))
    info = {
        "device": str(DEVICE), "backend": backend if provider == "fused" else provider, "numel": math.prod((b, n, c)),
        "fresh_tokens": b * k, "bytes_moved": nbytes, "min_s": stats.min, "median_s": stats.median,
        "gb_per_s": nbytes / stats.min / 1e9, "copy_floor_s": floor, "fraction_of_copy_floor": floor / stats.min,
        "page_faults_per_call": 0.0,
    }
    benchmark.extra_info.update(info)
    foca_bench_rows.append({"op": "duca_conservative", "size": size, "dtype": dtype, "provider": provider, **info})
