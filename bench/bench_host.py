"""Host time of one skipped step through the hooks, side by side with diffusers' TaylorSeer hook.

    FOCA_BENCH_THREADS=1 python -m pytest bench -k host -p no:cacheprovider -q -s

Model: diffusers' DiTTransformer2DModel with DiT-XL/2's depth (28 blocks, so 56 cached modules:
attn1 and ff of every block) but tiny width (2 heads x 8, 4 tokens, batch 2): the arithmetic
is negligible and a step's time is host work (Python, dispatch, launches).

Rows (each one 50-step generation per round, rounds interleaved so drift cancels):
  stub                attn1/ff replaced by free stubs returning a preallocated tensor: what a
                      skipped step costs with a zero-cost cache (the floor)
  fk-<method>         foca_kernels.hooks.enable_cache(model, interval=5, method=...)
  diffusers-ts2       diffusers' TaylorSeer hook (cache_interval 5, disable_cache_before_step 2,
                      max_order 2) on the same modules, each call in CacheMixin.cache_context
Per row: 10th percentile and median time of a skipped-step model call (process CPU time on
CPU, wall-clock on CUDA), and cache overhead per cached module = (skipped call - stub call) / 56,
at each quantile. The table printed at the end gives each row's overhead relative to diffusers'
hook. Nothing is asserted.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from foca_kernels.hooks import CacheConfig, disable_cache, enable_cache  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS, STEPS, INTERVAL, WARMUP = 28, 50, 5, 2
ROUNDS = 6
FK_METHODS = ("foca", "taylorseer", "reuse")


def _model():
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=LAYERS,
        sample_size=4, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    )
    return m.eval().to(DEVICE)


def _clock() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def _skipped_mask() -> List[bool]:
    """Steps both caches skip: after the warm-up, off the every-5th full step."""
    return [s >= WARMUP and (s - WARMUP) % INTERVAL != 0 for s in range(STEPS)]


@torch.no_grad()
def _generation(model, call: Callable, times: List[float]) -> None:
    x = torch.randn(2, 4, 4, 4, device=DEVICE)
    labels = torch.tensor([1, 2], device=DEVICE)
    skipped = _skipped_mask()
    for s, t in enumerate(torch.linspace(999, 0, STEPS).round().long().tolist()):
        ts = torch.full((2,), t, device=DEVICE)
        t0 = _clock()
        call(model, x, timestep=ts, class_labels=labels)
        t1 = _clock()
        if skipped[s]:
            times.append(t1 - t0)


def _plain(m, *a, **k):
    return m(*a, **k)


def _stub(base):
    model = copy.deepcopy(base)
    for blk in model.transformer_blocks:
        for name in ("attn1", "ff"):
            mod = getattr(blk, name)
            out = torch.zeros(2, 4, 16, device=DEVICE)
            mod.forward = (lambda o: (lambda *a, **k: o))(out)
    return model, _plain, lambda: None


def _fk(base, method):
    model = copy.deepcopy(base)
    enable_cache(model, CacheConfig(interval=INTERVAL, warmup=WARMUP, method=method, num_inference_steps=STEPS))
    return model, _plain, lambda: None  # a new generation is detected from the step count


def _diffusers(base):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.models.cache_utils import CacheMixin

    model = copy.deepcopy(base)
    apply_taylorseer_cache(model, TaylorSeerCacheConfig(
        cache_interval=INTERVAL, disable_cache_before_step=WARMUP, max_order=2,
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"]))

    def call(m, *a, **k):
        with CacheMixin.cache_context(m, "cond"):
            return m(*a, **k)

    def reset():
        CacheMixin._reset_stateful_cache(model)

    return model, call, reset


def _quantile(xs: List[float], q: float) -> float:
    """A low quantile is the steadier figure on a shared machine: other jobs only add time."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def test_host_skipped_step(benchmark):
    base = _model()
    rows: Dict[str, tuple] = {"stub": _stub(base)}
    for m in FK_METHODS:
        rows[f"fk-{m}"] = _fk(base, m)
    rows["diffusers-ts2"] = _diffusers(base)
    times: Dict[str, List[float]] = {k: [] for k in rows}

    def run():
        for r in range(ROUNDS):
            order = list(rows) if r % 2 == 0 else list(reversed(rows))
            for name in order:
                model, call, reset = rows[name]
                reset()
                _generation(model, call, times[name])

    benchmark.pedantic(run, rounds=1, iterations=1)
    n_mod = 2 * LAYERS
    stats = {}
    for q, name in ((0.1, "p10"), (0.5, "median")):
        at = {k: _quantile(v, q) for k, v in times.items()}
        per_mod = {k: (at[k] - at["stub"]) / n_mod for k in at}
        stats[name] = {"call_s": at, "overhead_per_module_s": per_mod}
    lines = ["| row | skipped call p10 / median (ms) | overhead per module p10 / median (us) | "
             "vs diffusers' hook p10 / median |", "|---|---|---|---|"]
    for k in times:
        lo, mid = stats["p10"], stats["median"]
        ratio = ("-" if k == "stub" else
                 f"{lo['overhead_per_module_s'][k] / lo['overhead_per_module_s']['diffusers-ts2']:.2f} / "
                 f"{mid['overhead_per_module_s'][k] / mid['overhead_per_module_s']['diffusers-ts2']:.2f}")
        lines.append(f"| {k} | {lo['call_s'][k] * 1e3:.2f} / {mid['call_s'][k] * 1e3:.2f} | "
                     f"{lo['overhead_per_module_s'][k] * 1e6:.1f} / {mid['overhead_per_module_s'][k] * 1e6:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(f"\nhost time per skipped step, {LAYERS} blocks ({n_mod} cached modules), {DEVICE}, "
          f"{len(times['stub'])} skipped calls per row:\n{table}")
    benchmark.extra_info.update({"stats": stats, "table": table})
    for name in FK_METHODS:
        disable_cache(rows[f"fk-{name}"][0])
