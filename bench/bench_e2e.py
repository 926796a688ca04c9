"""End to end: sample a class-conditional DiT with and without feature caching, side by side.

    FOCA_BENCH_THREADS=1 python -m pytest bench -k e2e -p no:cacheprovider -q --benchmark-json=bench-e2e.json

(``bench -k e2e``, not ``bench/bench_e2e.py``: bench/conftest.py collects ``bench_*.py`` itself,
and pytest collects a file named on the command line a second time.)

Model: diffusers' DiTTransformer2DModel in the DiT-S/2 configuration (hidden 384 = 6 heads x 64,
12 blocks, patch 2, learned sigma) at 256 px (a 32x32x4 latent: 256 tokens), random weights
(seed 0), class-conditional. Sampler: DDIM (DiT's 1000-step linear betas), 50 steps,
classifier-free guidance 4.0 batched in one model call, 2 class labels (the model sees 4
samples per call), driven exactly as ``DiTPipeline`` drives the transformer (``_generate`` is
its loop without the VAE decode; ``test_driver_matches_ditpipeline`` checks that on a small
model with a tiny VAE).

Configurations (ids):
  uncached                     the model as is (reference output and speed)
  fk-foca-N3/N5/N7             foca_kernels.hooks.enable_cache(model, interval=N): FoCa (the
                               default reading), module granularity (attn1 and ff of each
                               block), warm-up 2, fp32 state
  fk-taylorseer2-N5, fk-reuse-N5   the same hooks with TaylorSeer order 2 / plain reuse
  fk-taylorseer2-dsched        TaylorSeer-2 through the hooks on diffusers' TaylorSeer schedule
                               (a mask), for a like-for-like comparison with the next row
  fk-foca-N5-block             block granularity (granularity="block": each block's residual)
  fk-foca-N5-block-F1          block granularity with block 0 computed at every step
                               (compute_blocks=1, cache-dit's F1B0 layout); skipped with the
                               reason where CacheConfig has no compute_blocks
  diffusers-taylorseer2-N5     diffusers' TaylorSeer hook (cache_interval 5,
                               disable_cache_before_step 2, max_order 2, fp32 factors) on the
                               same modules. DiTTransformer2DModel is not a CacheMixin (no
                               enable_cache) and DiTPipeline sets no cache context, so it is
                               attached with diffusers' apply_taylorseer_cache and each call runs
                               in CacheMixin.cache_context, reset per generation as
                               CacheMixin._reset_stateful_cache does
  cachedit-foca-N5, cachedit-taylorseer2-N5
                               cache-dit (optional extra "peers"; skipped when absent) on the
                               bare transformer: DBCache F1B0 with steps_computation_mask = the
                               N=5 schedule and the "static" policy (a fixed schedule, no
                               threshold), FoCa / TaylorSeer(order 2) calibrator on the residual
                               of blocks 1.. (cache-dit enforces Fn_compute_blocks >= 1, so
                               block 0 runs on every step); cache_dit.refresh_context before
                               each generation
  <row>-compile, <row>-compile-ro   (FOCA_E2E_COMPILE) uncached, fk-foca-N5, fk-foca-N5-block,
                               diffusers-taylorseer2-N5 and cachedit-foca-N5 with the model
                               compiled whole after its cache is attached:
                               torch.compile(model) / torch.compile(model, mode="reduce-overhead")
                               (CUDA graphs; skipped with the reason on a CPU). Their first
                               generation compiles, untimed: its wall-clock is reported as the
                               compile time. A row that cannot compile or run says why in the
                               summary ("rows not run") instead of failing.

Every row marks each generation as new before it starts: foca-kernels rows with
foca_kernels.new_generation(model) (reset_cache where the checkout has no new_generation),
diffusers' hook with _reset_stateful_cache, cache-dit with refresh_context; every pass of every
row must give bit-identical latents (asserted).

Measurement: every test is ONE generation of one configuration; the configurations run in
passes, the second pass in reverse order (ABBA), so the uncached model runs first and last and
a linear drift of the shared machine cancels in the means over passes. Compiled rows run after
the eager ones, each row's passes back to back after torch._dynamo.reset() (its frames are its
own; interleaving would recompile inside a timed pass), and are timed around the model call
with the units each call ran read from the row's schedule (hooks on a compiled model would be
traced). Before the first row the package's CPU C loop is built (once per process); on CUDA
each row first runs one untimed generation (FOCA_E2E_WARMUP), so Triton's first compile of a
kernel specialisation never lands in a timed pass. Per configuration
(benchmark.extra_info of each pass; the aggregates in the last pass's extra_info and in the
markdown table printed at the end):
  seconds per generation (mean over passes), speed-up = mean uncached / mean configuration;
  full / skipped steps and the fraction of block compute skipped (attn1 and ff calls not run,
  counted by forward hooks on their first linear layers; for the foca-kernels rows also
  cache_info's calls_forecast / (calls_computed + calls_forecast), asserted equal); one full
  and one skipped step (every model call is timed; medians over the pooled calls of each
  kind); forecast overhead = (skipped step - stub step) / uncached full step, where the stub
  step is the same model call with the cached parts replaced by free stubs (timed in the
  uncached tests: what a skipped step costs with a zero-cost cache); full-step overhead =
  (cached full step - uncached full step) / uncached full step; cache memory after a
  generation (foca-kernels: cache_info state_bytes / buffer_bytes; peers: the tensors their
  states hold, once per storage); relative L2 error of the final latents against the
  uncached model from the same noise; whether the passes gave bit-identical latents.

Environment:
  FOCA_BENCH_THREADS=N   torch CPU threads (bench/conftest.py; 1 on a shared machine)
  FOCA_E2E_FULL=1        3 passes instead of 2 and extra rows (bf16 cache state, diffusers'
                         TaylorSeer with its default bf16 factors, cache-dit FoCa at N=3 and N=7)
  FOCA_E2E_PASSES=P      passes (overrides the above)
  FOCA_E2E_BATCH=B       class labels per generation (default 2: the model sees 2B samples)
  FOCA_E2E_STEPS=S       sampling steps (default 50)
  FOCA_E2E_MODEL         dit-s2 (default), dit-b2, dit-xl2 (hidden 1152 = 16 x 72, 28 blocks;
                         for a GPU: bench/gpu_check.py), or tiny (a 4-block toy for smoke runs)
  FOCA_E2E_SCHEDULER     ddim (default) or dpm (DPMSolverMultistepScheduler)
  FOCA_E2E_COMPILE       "1" (both modes), "default" or "reduce-overhead": adds the compiled
                         rows (opt-in: on a CPU each first compile costs 10-60 s)
  FOCA_E2E_WARMUP        1/0: one untimed generation per row first (default 1 on CUDA, 0 on CPU)
  FOCA_E2E_DEADLINE      seconds since the epoch: rows (or passes) that would end later are
                         skipped with the reason (bench/gpu_check.py sets it to its time box)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # before cache_dit is imported

import pytest  # noqa: E402
import torch  # noqa: E402

diffusers = pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers (extra 'diffusers')")

import foca_kernels.hooks as fk_hooks  # noqa: E402
from foca_kernels.hooks import CacheConfig, cache_info, disable_cache, enable_cache, reset_cache  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("FOCA_E2E_FULL", "0") == "1"
PASSES = int(os.environ.get("FOCA_E2E_PASSES", "3" if FULL else "2"))
BATCH = int(os.environ.get("FOCA_E2E_BATCH", "2"))
STEPS = int(os.environ.get("FOCA_E2E_STEPS", "50"))
MODEL = os.environ.get("FOCA_E2E_MODEL", "dit-s2")
SCHEDULER = os.environ.get("FOCA_E2E_SCHEDULER", "ddim")
GUIDANCE = 4.0  # DiTPipeline's default
SEED = 0
CLOCK_NAME = "process CPU time" if DEVICE.type == "cpu" else "wall-clock"
STUB_REPS = 8  # stub calls per kind in each uncached test (interleaved)
COMPILE_MODES = ("default", "reduce-overhead")


def _compile_modes() -> List[str]:
    """FOCA_E2E_COMPILE: "1" (both modes), or a comma-separated list of COMPILE_MODES."""
    raw = os.environ.get("FOCA_E2E_COMPILE", "").strip()
    if raw in ("", "0"):
        return []
    modes = list(COMPILE_MODES) if raw == "1" else [m.strip() for m in raw.split(",") if m.strip()]
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        raise ValueError(f"FOCA_E2E_COMPILE: unknown mode(s) {bad}, expected '1' or some of {COMPILE_MODES}")
    return modes


COMPILE = _compile_modes()
# Wall-clock deadline (seconds since the epoch) set by bench/gpu_check.py: a row (or a pass)
# that would not finish before it is skipped with the reason instead of being killed.
DEADLINE = float(os.environ.get("FOCA_E2E_DEADLINE", "0") or 0) or None
NOT_RUN: Dict[str, str] = {}  # id -> why the row did not run (printed in the summary)
# One untimed generation per row before its first timed pass: on CUDA the first use of each
# Triton kernel specialisation (and cuBLAS' first calls) would otherwise land in pass 1.
WARMUP_GENERATION = os.environ.get("FOCA_E2E_WARMUP", "1" if DEVICE.type == "cuda" else "0") == "1"

MODELS = {  # DiT paper configurations (hidden = heads x 64), 256 px -> 32x32 latent
    "dit-s2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=32),
    "dit-b2": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, sample_size=32),
    # 16 x 72 = 1152 (GPU check)
    "dit-xl2": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32),
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=4, sample_size=16),
}
LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample classes


# ---- model, scheduler, the DiTPipeline loop ----------------------------------------------------
def _make_model():
    if MODEL not in MODELS:
        raise ValueError(f"FOCA_E2E_MODEL={MODEL!r}: expected one of {sorted(MODELS)}")
    torch.manual_seed(SEED)
    model = diffusers.DiTTransformer2DModel(
        in_channels=4, out_channels=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
        **MODELS[MODEL],
    )
    return model.eval().to(DEVICE)


def _make_scheduler():
    betas = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    if SCHEDULER == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, **betas)
    if SCHEDULER == "dpm":
        return diffusers.DPMSolverMultistepScheduler(**betas)
    raise ValueError(f"FOCA_E2E_SCHEDULER={SCHEDULER!r}: expected ddim or dpm")


def _labels(batch: int = BATCH) -> List[int]:
    return [LABELS[i % len(LABELS)] for i in range(batch)]


def _noise(model, batch: int, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    size = model.config.sample_size
    return torch.randn((batch, model.config.in_channels, size, size), generator=g).to(DEVICE, model.dtype)


@torch.no_grad()
def _generate(model, scheduler, class_labels: List[int], latents: torch.Tensor, steps: int = STEPS,
              guidance_scale: float = GUIDANCE, call: Optional[Callable] = None) -> torch.Tensor:
    """DiTPipeline.__call__ up to (not including) the VAE decode; returns the final latents.
    ``call(model, *args, **kwargs)`` replaces the plain model call (to enter a cache context)."""
    call = call or (lambda m, *a, **k: m(*a, **k))
    batch_size = len(class_labels)
    latent_channels = model.config.in_channels
    latent_model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
    class_labels = torch.tensor(class_labels, device=DEVICE).reshape(-1)
    class_null = torch.tensor([1000] * batch_size, device=DEVICE)
    class_labels_input = torch.cat([class_labels, class_null], 0) if guidance_scale > 1 else class_labels
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if guidance_scale > 1:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        timesteps = t
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timesteps, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=latent_model_input.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(latent_model_input.device)
        timesteps = timesteps.expand(latent_model_input.shape[0])
        noise_pred = call(model, latent_model_input, timestep=timesteps, class_labels=class_labels_input).sample
        if guidance_scale > 1:
            eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            noise_pred = torch.cat([eps, rest], dim=1)
        if model.config.out_channels // 2 == latent_channels:
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
        else:
            model_output = noise_pred
        latent_model_input = scheduler.step(model_output, t, latent_model_input).prev_sample
    if guidance_scale > 1:
        latents, _ = latent_model_input.chunk(2, dim=0)
    else:
        latents = latent_model_input
    return latents


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _clock() -> float:
    """The clock of step times and speed-ups: on the CPU this process's CPU time (another job
    on a shared machine preempts the benchmark and adds wall-clock time, not CPU time; with
    one torch thread and an idle machine the two agree), on CUDA wall-clock."""
    return time.process_time() if DEVICE.type == "cpu" else time.perf_counter()


# ---- instrumentation ---------------------------------------------------------------------------
def _unit_probes(model) -> List[torch.nn.Module]:
    """The first linear layer of each block's attn1 and ff: it runs iff that module computes."""
    return [m for blk in model.transformer_blocks for m in (blk.attn1.to_q, blk.ff.net[0].proj)]


class Recorder:
    """Times every model call (forward pre/post hooks on the transformer, outside any wrapper
    a cache puts on its forward) and counts the cached units (attn1, ff) that really ran."""

    def __init__(self, model):
        self.units_per_call = 2 * len(model.transformer_blocks)
        self.units = 0
        self.calls: List[tuple] = []  # (seconds, units computed in that call)
        self._t0 = 0.0
        self._u0 = 0
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]
        for probe in _unit_probes(model):
            self.handles.append(probe.register_forward_hook(self._count))

    def _count(self, *_):
        self.units += 1

    def _pre(self, *_):
        _sync()
        self._u0 = self.units
        self._t0 = _clock()

    def _post(self, *_):
        _sync()
        self.calls.append((_clock() - self._t0, self.units - self._u0))

    def remove(self):
        for h in self.handles:
            h.remove()

    def split(self):
        """(full-call times, other-call times)."""
        full = [t for t, u in self.calls if u == self.units_per_call]
        other = [t for t, u in self.calls if u < self.units_per_call]
        return full, other

    def wrap(self, call: Optional[Callable]) -> Optional[Callable]:
        return call


class ScheduleRecorder(Recorder):
    """For a compiled model: forward hooks on the model or its layers would be traced into the
    graph (and a hook's Python counter guarded on, recompiling every call), so every model call
    is timed around the call instead, and the units it ran are read from the row's schedule
    (``units_of(step index)``) rather than counted."""

    def __init__(self, model, units_of: Callable[[int], int]):
        self.units_per_call = 2 * len(model.transformer_blocks)
        self.units_of = units_of
        self.calls = []
        self.handles = []
        self.n = 0

    def wrap(self, call: Optional[Callable]) -> Callable:
        inner = call or (lambda m, *a, **k: m(*a, **k))

        def timed(m, *args, **kwargs):
            _sync()
            t0 = _clock()
            out = inner(m, *args, **kwargs)
            _sync()
            self.calls.append((_clock() - t0, self.units_of(self.n % STEPS)))
            self.n += 1
            return out

        return timed


def _tensor_bytes(obj, seen: set, depth: int = 0) -> int:
    """Bytes of the tensors reachable from ``obj`` (attributes, dicts, lists), once per storage."""
    if depth > 6 or obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


# ---- schedules ---------------------------------------------------------------------------------
def _fk_mask(interval: int, warmup: int = 2, steps: int = STEPS) -> List[bool]:
    pattern = CacheConfig(interval=interval, warmup=warmup).pattern(steps)
    return [c == "F" for c in pattern]


def _diffusers_mask(interval: int, before: int, steps: int = STEPS) -> List[bool]:
    """diffusers' TaylorSeerCacheHook._measure_should_compute, per step."""
    return [k < before or (k - before - 1) % interval == 0 for k in range(steps)]


# ---- providers ---------------------------------------------------------------------------------
@dataclass
class Setup:
    model: torch.nn.Module
    call: Optional[Callable] = None  # replaces the model call inside the loop
    before: Callable = lambda: None  # before each generation (inside the timed region)
    memory: Callable = lambda: (0, 0)  # (state bytes, buffer bytes) after a generation
    stats: Callable = lambda: {}  # extra numbers after all rounds
    stub: str = "modules"  # what a skipped step does not run: "modules", "blocks" or "blocks1+"
    teardown: Callable = lambda: None
    notes: Dict[str, object] = field(default_factory=dict)
    units_on_skip: int = 0  # attn1/ff calls a skipped step still runs (blocks always computed)
    units_per_target: int = 1  # attn1/ff calls one forecast replaces (2 for a whole block)
    eager: Optional[torch.nn.Module] = None  # the uncompiled model of a compiled row
    compiled: Optional[str] = None  # torch.compile mode of a compiled row
    clear_stats: Callable = lambda: None  # zero the cache's own counters


def _setup_uncached(base):
    return Setup(copy.deepcopy(base), stub="none", notes={"schedule": "F" * STEPS})  # base is copied, never hooked


def _new_generation_fn():
    """(marker, name): foca_kernels' explicit generation boundary where this checkout has it
    (``new_generation(model)``), else ``reset_cache(model)``, which also starts a new one."""
    fn = getattr(fk_hooks, "new_generation", None)
    return (fn, "new_generation") if fn is not None else (reset_cache, "reset_cache")


def _compute_blocks(options) -> tuple:
    k = options.get("compute_blocks", 0)
    return (k, 0) if isinstance(k, int) else tuple(k)


def _setup_fk(base, **options):
    if "compute_blocks" in options and "compute_blocks" not in {f.name for f in dataclasses.fields(CacheConfig)}:
        pytest.skip("not run: CacheConfig has no compute_blocks in this checkout (blocks computed at every step)")
    model = copy.deepcopy(base)
    cfg = CacheConfig(**options)
    enable_cache(model, cfg)
    fresh, marker = _new_generation_fn()
    block = options.get("granularity") == "block"
    first, last = _compute_blocks(options)
    if first == last == 0:
        stub = "blocks" if block else "modules"
    elif block and (first, last) == (1, 0):
        stub = "blocks1+"
    else:
        stub = "none"  # no stub timed for this layout: no forecast-overhead figure

    def memory():
        info = cache_info(model)
        return info.state_bytes, info.buffer_bytes

    def stats():
        info = cache_info(model)
        n = info.calls_computed + info.calls_forecast
        return {
            "cache_info": {k: getattr(info, k) for k in (
                "modules", "streams", "steps_full", "steps_skipped", "calls_computed", "calls_forecast",
                "calls_forced", "shape_resets", "generations")},
            "skipped_fraction_cache_info": info.calls_forecast / n if n else 0.0,
        }

    reset_cache(model, clear_stats=True)
    # Every generation starts fresh: marked explicitly, as a caller driving a bare transformer
    # must (on CUDA the timesteps are device tensors the hooks do not read without a sync).
    return Setup(model, before=lambda: fresh(model), memory=memory, stats=stats, stub=stub,
                 teardown=lambda: disable_cache(model), clear_stats=lambda: reset_cache(model, clear_stats=True),
                 units_on_skip=2 * (first + last),
                 units_per_target=2 if block else 1,
                 notes={"schedule": cfg.pattern(STEPS), "generation_marker": marker})


def _setup_diffusers(base, interval: int, before: int, order: int, dtype):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.models.cache_utils import CacheMixin

    model = copy.deepcopy(base)
    if hasattr(model, "enable_cache"):  # a diffusers version where DiT is a CacheMixin
        raise AssertionError("DiTTransformer2DModel gained enable_cache: use it here")
    cfg = TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=before, max_order=order, taylor_factors_dtype=dtype,
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"],  # the modules the fk rows cache
    )
    apply_taylorseer_cache(model, cfg)
    hooked = [m for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
              and "taylorseer_cache" in m._diffusers_hook.hooks]
    assert len(hooked) == 2 * len(model.transformer_blocks), len(hooked)

    def call(m, *args, **kwargs):  # what CacheMixin.cache_context does for a CacheMixin model
        with CacheMixin.cache_context(m, "cond"):
            return m(*args, **kwargs)

    def memory():
        seen: set = set()
        total = 0
        for m in hooked:
            hook = m._diffusers_hook.hooks["taylorseer_cache"]
            for state in hook.state_manager._state_cache.values():
                total += _tensor_bytes(state.taylor_factors, seen)
        return total, 0

    return Setup(
        model, call=call, before=lambda: CacheMixin._reset_stateful_cache(model), memory=memory,
        notes={"schedule": "".join("F" if f else "s" for f in _diffusers_mask(interval, before)),
               "config": repr(cfg)},
    )


def _setup_cachedit(base, calibrator: str, mask: List[bool], warmup: int = 2):
    cache_dit = pytest.importorskip("cache_dit", reason="cache-dit (optional extra 'peers') not installed")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from cache_dit import DBCacheConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    model = copy.deepcopy(base)
    cal = FoCaCalibratorConfig() if calibrator == "foca" else TaylorSeerCalibratorConfig(taylorseer_order=2)
    cfg = DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup, num_inference_steps=STEPS,
        steps_computation_mask=[int(f) for f in mask], steps_computation_policy="static",
        enable_separate_cfg=False,  # DiT batches cond and uncond in one call
    )
    cache_dit.enable_cache(model, cache_config=cfg, calibrator_config=cal)
    manager = model._context_manager
    names = list(model._context_names)

    def contexts():
        return [manager.get_context(n) for n in names]

    def memory():
        seen: set = set()
        state = buffers = 0
        for ctx in contexts():
            for c in (ctx.calibrator, ctx.encoder_calibrator, ctx.cfg_calibrator, ctx.cfg_encoder_calibrator):
                if c is not None:
                    state += _tensor_bytes(c.states, seen)
            buffers += _tensor_bytes(ctx.buffers, seen)
        return state, buffers

    def stats():
        ctx = contexts()[0]
        return {"cache_dit_cached_steps": list(ctx.get_cached_steps())}

    # cache-dit's transformer-only context refreshes itself only once a call finds the step
    # count already past num_inference_steps, i.e. one call into the next generation (whose
    # first step would then be served from the previous generation's cache): refresh
    # explicitly before each generation, as cache_dit.refresh_context's docs do per request.
    return Setup(
        model, before=lambda: cache_dit.refresh_context(model), memory=memory, stats=stats, stub="blocks1+",
        units_on_skip=2,
        notes={"schedule": "".join("F" if f else "s" for f in mask), "config": cfg.strify() + "+" + cal.strify()},
    )


def _setup_compiled(base, inner: str, mode: str):
    """The row ``inner`` (its cache attached first, as each library asks), then the model
    compiled whole: ``torch.compile(model, mode=...)``. The first generation compiles; the
    test runs it untimed (its wall-clock is the row's compile time) before the timed passes."""
    if mode == "reduce-overhead" and DEVICE.type != "cuda":
        pytest.skip("not run: mode='reduce-overhead' is CUDA graphs; on a CPU it compiles as the default mode")
    _, _, setup_fn, options = CONFIGS[inner]
    s = setup_fn(base, **options)
    import torch._dynamo

    torch._dynamo.reset()  # this row's frames are its own (a DiT block's code is shared by every row)
    s.eager = s.model
    s.model = torch.compile(s.eager, mode=None if mode == "default" else mode)
    s.compiled = mode
    s.stub = "none"  # the stubs are timed eagerly: no forecast-overhead figure for a compiled row
    return s


COMPILE_ROWS = [  # (inner row, label) compiled under each mode of FOCA_E2E_COMPILE
    ("uncached", "uncached"),
    ("fk-foca-N5", "foca-kernels FoCa N=5"),
    ("fk-foca-N5-block", "foca-kernels FoCa N=5, block residuals"),
    ("diffusers-taylorseer2-N5", "diffusers TaylorSeer hook, order 2, interval 5"),
    ("cachedit-foca-N5", "cache-dit FoCa calibrator, F1B0, N=5 mask"),
]


def _compiled_id(inner: str, mode: str) -> str:
    return f"{inner}-compile" + ("-ro" if mode == "reduce-overhead" else "")


# (id, label, setup, options)
def _configs():
    fk5 = _fk_mask(5)
    rows = [
        ("uncached", "uncached", _setup_uncached, {}),
        ("fk-foca-N3", "foca-kernels FoCa N=3", _setup_fk, dict(interval=3, method="foca")),
        ("fk-foca-N5", "foca-kernels FoCa N=5", _setup_fk, dict(interval=5, method="foca")),
        ("fk-foca-N7", "foca-kernels FoCa N=7", _setup_fk, dict(interval=7, method="foca")),
        ("fk-taylorseer2-N5", "foca-kernels TaylorSeer-2 N=5", _setup_fk,
         dict(interval=5, method="taylorseer", method_options={"order": 2})),
        ("fk-reuse-N5", "foca-kernels reuse N=5", _setup_fk, dict(interval=5, method="reuse")),
        ("fk-taylorseer2-dsched", "foca-kernels TaylorSeer-2, diffusers' schedule", _setup_fk,
         dict(mask=_diffusers_mask(5, 2), method="taylorseer", method_options={"order": 2})),
        ("fk-foca-N5-block", "foca-kernels FoCa N=5, block residuals", _setup_fk,
         dict(interval=5, method="foca", granularity="block")),
        ("fk-foca-N5-block-F1", "foca-kernels FoCa N=5, block residuals, block 0 always computed", _setup_fk,
         dict(interval=5, method="foca", granularity="block", compute_blocks=1)),
        ("diffusers-taylorseer2-N5", "diffusers TaylorSeer hook, order 2, interval 5, fp32 factors",
         _setup_diffusers, dict(interval=5, before=2, order=2, dtype=torch.float32)),
        ("cachedit-foca-N5", "cache-dit FoCa calibrator, F1B0, N=5 mask", _setup_cachedit,
         dict(calibrator="foca", mask=fk5)),
        ("cachedit-taylorseer2-N5", "cache-dit TaylorSeer-2 calibrator, F1B0, N=5 mask", _setup_cachedit,
         dict(calibrator="taylorseer", mask=fk5)),
    ]
    if FULL:
        rows += [
            ("fk-foca-N5-bf16state", "foca-kernels FoCa N=5, bf16 state", _setup_fk,
             dict(interval=5, method="foca", state_dtype=torch.bfloat16)),
            ("diffusers-taylorseer2-N5-bf16", "diffusers TaylorSeer hook, order 2, interval 5, bf16 factors (default)",
             _setup_diffusers, dict(interval=5, before=2, order=2, dtype=torch.bfloat16)),
            ("cachedit-foca-N3", "cache-dit FoCa calibrator, F1B0, N=3 mask", _setup_cachedit,
             dict(calibrator="foca", mask=_fk_mask(3))),
            ("cachedit-foca-N7", "cache-dit FoCa calibrator, F1B0, N=7 mask", _setup_cachedit,
             dict(calibrator="foca", mask=_fk_mask(7))),
        ]
    for mode in COMPILE:
        for inner, label in COMPILE_ROWS:
            rows.append((_compiled_id(inner, mode), f"{label}, torch.compile mode {mode}", _setup_compiled,
                         dict(inner=inner, mode=mode)))
    return rows


CONFIGS = {c[0]: c for c in _configs()}


def _is_compiled(cid: str) -> bool:
    return CONFIGS[cid][2] is _setup_compiled


def _params():
    """Eager rows: pass 1 in order, pass 2 reversed, ... (ABBA: the uncached model runs first and
    last). Compiled rows after them, each row's passes back to back (dynamo is reset for each
    compiled row, so interleaving them would recompile inside a timed pass)."""
    eager = [c for c in CONFIGS if not _is_compiled(c)]
    out = []
    for p in range(PASSES):
        for cid in (eager if p % 2 == 0 else eager[::-1]):
            out.append(pytest.param(cid, p, id=f"{cid}-p{p + 1}"))
    for cid in (c for c in CONFIGS if _is_compiled(c)):
        for p in range(PASSES):
            out.append(pytest.param(cid, p, id=f"{cid}-p{p + 1}"))
    return out


# ---- session state -----------------------------------------------------------------------------
def _warm_package():
    """Build what the package builds once per process before any row is timed: on the CPU the
    compiled C loop of the fused path (``ops/cpu_codegen``, ~1.5 s, else paid inside the first
    cached row's first pass); on CUDA nothing here (WARMUP_GENERATION covers the Triton
    specialisations of each row)."""
    import foca_kernels as fk

    if DEVICE.type != "cpu":
        return
    x = torch.ones((4, 16))
    st = fk.allocate(x, "foca")
    for i in range(4):
        fk.update_(st, x * (1 + 0.1 * i), 1.0)
    fk.forecast_(st, torch.empty_like(x), 1.0)


class Baseline:
    """The seeded model and inputs, the uncached reference latents, the uncached step times and
    the stub timings (pooled over the uncached tests)."""

    def __init__(self):
        _warm_package()
        self.model = _make_model()
        self.scheduler = _make_scheduler()
        self.labels = _labels()
        self.noise = _noise(self.model, len(self.labels))
        self.latents: Optional[torch.Tensor] = None
        self.stub_s: Dict[str, List[float]] = {"modules": [], "blocks1+": [], "blocks": []}

    def ensure_reference(self):
        """One uncached generation if no uncached test has run yet (``-k`` without it)."""
        if self.latents is None:
            self.latents = _generate(self.model, self.scheduler, self.labels, self.noise)
        if not self.stub_s["modules"]:
            self.time_stubs()

    @torch.no_grad()
    def time_stubs(self, reps: int = STUB_REPS):
        """Time model calls with the cached parts replaced by free stubs: what a skipped step
        still runs. "modules": attn1 and ff of every block return a preallocated tensor (the
        module-granularity rows); "blocks1+": blocks 1.. return their input (cache-dit F1B0);
        "blocks": every block returns its input (block granularity). Mid-trajectory input,
        the kinds interleaved, the first call of each dropped."""
        m = self.model
        n = 2 * len(self.labels)
        size = m.config.sample_size
        x = torch.randn((n, m.config.in_channels, size, size), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        t = torch.full((n,), 500, dtype=torch.int64, device=DEVICE)
        y = torch.tensor(self.labels + [1000] * len(self.labels), device=DEVICE)
        tokens = (size // m.config.patch_size) ** 2
        zeros = torch.zeros((n, tokens, m.inner_dim), device=DEVICE, dtype=m.dtype)

        def stub_modules():
            for blk in m.transformer_blocks:
                blk.attn1.forward = blk.ff.forward = lambda *a, **k: zeros

        def stub_blocks(first: int):
            for blk in list(m.transformer_blocks)[first:]:
                blk.forward = lambda hidden_states, *a, **k: hidden_states

        def restore():
            for mod in m.modules():
                mod.__dict__.pop("forward", None)

        for i in range(reps + 1):
            for kind, patch in (("modules", stub_modules), ("blocks1+", lambda: stub_blocks(1)),
                                ("blocks", lambda: stub_blocks(0))):
                patch()
                try:
                    _sync()
                    t0 = _clock()
                    m(x, timestep=t, class_labels=y)
                    _sync()
                    if i:
                        self.stub_s[kind].append(_clock() - t0)
                finally:
                    restore()


@dataclass
class Row:
    cid: str
    label: str
    setup: Optional[Setup] = None
    rec: Optional[Recorder] = None
    passes: List[int] = field(default_factory=list)
    gen_s: List[float] = field(default_factory=list)  # wall-clock per generation
    gen_clock: List[float] = field(default_factory=list)  # _clock() per generation (CPU time on CPU)
    calls: List[tuple] = field(default_factory=list)  # (_clock() seconds, units run), pooled over passes
    first: Optional[torch.Tensor] = None  # final latents of the first pass
    repeatable: bool = True
    memory: tuple = (0, 0)
    stub: str = "none"
    notes: Dict[str, object] = field(default_factory=dict)
    stats: Dict[str, object] = field(default_factory=dict)
    extra: Optional[dict] = None  # the last pass's benchmark.extra_info (aggregates go there)
    compiled: Optional[str] = None  # torch.compile mode, for a compiled row
    agg: Dict[str, object] = field(default_factory=dict)


_BASE: Optional[Baseline] = None
ROWS: Dict[str, Row] = {}  # in order of first appearance


@pytest.fixture(scope="module")
def base():
    global _BASE
    if _BASE is None:
        _BASE = Baseline()
    return _BASE


@pytest.fixture(scope="module", autouse=True)
def _session_rows(request):
    """Registers the summary printer (a test module cannot define pytest hooks itself), and
    after the module's last test computes the aggregates, puts them into the last pass's
    extra_info (pytest-benchmark writes its JSON after this) and releases the models."""
    pm = request.config.pluginmanager
    if pm.get_plugin("foca_e2e_summary") is None:
        pm.register(_Summary(), "foca_e2e_summary")
    yield
    for row in ROWS.values():
        _release(row)
    if _BASE is not None and "uncached" in ROWS:
        for row in ROWS.values():
            if not row.passes:
                continue
            row.agg = _aggregate(row)
            if row.extra is not None:
                row.extra["aggregate"] = row.agg


def _release(row: Row):
    if row.rec is not None:
        row.rec.remove()
        row.rec = None
    if row.setup is not None:
        row.setup.teardown()
        row.setup = None


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the driver is DiTPipeline's loop --------------------------------------------------------
def test_driver_matches_ditpipeline():
    """``_generate`` + decode equals DiTPipeline on a small DiT with a tiny random VAE."""
    torch.manual_seed(SEED)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    ).eval().to(DEVICE)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    ).eval().to(DEVICE)
    pipe = diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=_make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = [1, 2]
    g = torch.Generator(device="cpu").manual_seed(3)
    images = pipe(class_labels=labels, generator=g, num_inference_steps=6, output_type="pt").images
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator(device="cpu").manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        latents = _generate(model, _make_scheduler(), labels, noise, steps=6)
        samples = vae.decode(1 / vae.config.scaling_factor * latents).sample  # as DiTPipeline
    torch.testing.assert_close((samples / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=0)


# ---- the benchmark ---------------------------------------------------------------------------
@pytest.mark.parametrize("cid,pass_index", _params())
def _not_run(cid: str, reason: str):
    NOT_RUN.setdefault(cid, reason)
    row = ROWS.pop(cid, None)
    if row is not None:
        _release(row)
    pytest.skip(reason)


def _generation_estimate_s() -> float:
    """The longest wall-clock generation so far (0 before the first)."""
    return max((t for r in ROWS.values() for t in r.gen_s), default=0.0)


def _check_deadline(cid: str, first_pass: bool):
    """Skip (with the reason) a row, or one more pass of it, that would end after DEADLINE."""
    if DEADLINE is None:
        return
    left = DEADLINE - time.time()
    gen = _generation_estimate_s()
    need = 1.2 * gen
    if first_pass and _is_compiled(cid):
        compiles = [r.notes["compile_s"] for r in ROWS.values() if "compile_s" in r.notes]
        need += (max(compiles) if compiles else max(30.0, 3 * gen)) + 1.2 * gen * (PASSES - 1)
    if left < max(need, 1.0):
        why = f"not run: the time box ({left:.0f} s left, about {need:.0f} s needed)"
        if first_pass:
            _not_run(cid, why)
        row = ROWS[cid]
        row.notes["passes_not_run"] = row.notes.get("passes_not_run", 0) + 1
        pytest.skip(why)


def _first_pass(row: Row, setup_fn, options, base):
    """Set the row up. A compiled row then runs its compile generation (untimed; its wall-clock
    is the row's compile time), and with WARMUP_GENERATION every row runs one untimed
    generation; its latents are the ones every timed pass must repeat."""
    from torch._dynamo.utils import counters

    row.setup = s = setup_fn(base.model, **options)
    row.stub, row.notes, row.compiled = s.stub, dict(s.notes), s.compiled
    if s.compiled is not None or WARMUP_GENERATION:
        g0, b0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        t0 = time.perf_counter()
        s.before()
        row.first = _generate(s.model, base.scheduler, base.labels, base.noise, call=s.call)
        _sync()
        row.notes["warmup_generation_s"] = time.perf_counter() - t0
        if s.compiled is not None:
            row.notes["compile_s"] = row.notes["warmup_generation_s"]
            row.notes["graphs_compiled"] = counters["stats"]["unique_graphs"] - g0
            row.notes["graph_breaks"] = sum(counters["graph_break"].values()) - b0
        s.clear_stats()  # cache_info counts the timed passes only
    if s.compiled is None:
        row.rec = Recorder(s.model)
        return
    sched = s.notes["schedule"]
    row.rec = ScheduleRecorder(s.eager, lambda i: 2 * len(s.eager.transformer_blocks) if sched[i] == "F"
                               else s.units_on_skip)


@pytest.mark.parametrize("cid,pass_index", _params())
def test_e2e(benchmark, base, cid, pass_index):
    from torch._dynamo.utils import counters

    _, label, setup_fn, options = CONFIGS[cid]
    if cid in NOT_RUN:
        pytest.skip(NOT_RUN[cid])
    first_pass = cid not in ROWS
    _check_deadline(cid, first_pass)
    if cid != "uncached":
        base.ensure_reference()
    if first_pass:
        row = ROWS[cid] = Row(cid, label)
        try:
            _first_pass(row, setup_fn, options, base)
        except pytest.skip.Exception as e:
            _not_run(cid, str(e.msg) if hasattr(e, "msg") else str(e))
        except Exception as e:  # noqa: BLE001 - a compiled row that cannot run says why
            if not _is_compiled(cid):
                raise
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _not_run(cid, f"not run: {type(e).__name__}: {first_line}"[:300])
    row = ROWS[cid]
    s, rec = row.setup, row.rec
    n0 = len(rec.calls)
    result = {}
    call = rec.wrap(s.call)

    def one_generation():
        _sync()
        t0, c0 = time.perf_counter(), _clock()
        s.before()
        out = _generate(s.model, base.scheduler, base.labels, base.noise, call=call)
        _sync()
        result["s"], result["clock_s"] = time.perf_counter() - t0, _clock() - c0
        result["out"] = out
        result["memory"] = s.memory()

    benchmark.group = f"e2e {MODEL} {SCHEDULER} {STEPS} steps batch {BATCH}"
    g0 = counters["stats"]["unique_graphs"]
    try:
        benchmark.pedantic(one_generation, rounds=1, iterations=1, warmup_rounds=0)
    except Exception as e:  # noqa: BLE001
        if not _is_compiled(cid):
            raise
        _not_run(cid, f"not run: {type(e).__name__} in a timed pass: {str(e).strip()[:200]}")
    if s.compiled is not None:  # a compile inside a timed pass would be timed: recorded
        row.notes["graphs_compiled_in_timed_passes"] = (row.notes.get("graphs_compiled_in_timed_passes", 0)
                                                        + counters["stats"]["unique_graphs"] - g0)
    calls = rec.calls[n0:]
    out = result["out"]
    row.passes.append(pass_index)
    row.gen_s.append(result["s"])
    row.gen_clock.append(result["clock_s"])
    row.calls += calls
    row.memory = result["memory"]
    if row.first is None:
        row.first = out
    elif not torch.equal(out, row.first):
        row.repeatable = False
    if cid == "uncached":
        if base.latents is None:
            base.latents = out
        base.time_stubs()
    assert row.repeatable, f"{cid}: this generation differs from the first one (state not reset?)"
    if len(row.passes) == sum(1 for p in _params() if p.values[0] == cid):  # its last pass
        row.stats = s.stats()
        _release(row)

    units = sum(u for _, u in calls)
    full = [t for t, u in calls if u == rec.units_per_call]
    other = [t for t, u in calls if u < rec.units_per_call]
    info = {
        "label": label,
        "pass": pass_index + 1,
        "model": MODEL,
        "scheduler": SCHEDULER,
        "steps": STEPS,
        "batch": BATCH,
        "cfg_batched": True,
        "device": str(DEVICE),
        "threads": torch.get_num_threads() if DEVICE.type == "cpu" else None,
        "generation_s": result["s"],
        "generation_clock_s": result["clock_s"],
        "clock": "process CPU time" if DEVICE.type == "cpu" else "wall",
        "steps_full": len(full),
        "steps_skipped": len(other),
        "skipped_fraction": 1.0 - units / (len(calls) * rec.units_per_call),
        "full_step_median_s": statistics.median(full) if full else None,
        "skip_step_median_s": statistics.median(other) if other else None,
        "state_bytes": row.memory[0],
        "buffer_bytes": row.memory[1],
        "rel_l2_error": _rel_l2(out, base.latents),
        **row.notes,
        **row.stats,
    }
    if "cache_info" in row.stats:  # cache_info counts the same calls (all timed passes)
        not_run = sum(rec.units_per_call - u for _, u in row.calls)
        forecasts = row.stats["cache_info"]["calls_forecast"]
        assert forecasts * s.units_per_target == not_run, (cid, row.stats, not_run)
    benchmark.extra_info.update(info)
    row.extra = benchmark.extra_info


def _med(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _aggregate(row: Row) -> dict:
    u = ROWS["uncached"]
    per_call = 2 * len(_BASE.model.transformer_blocks)
    full = [t for t, n in row.calls if n == per_call]
    other = [t for t, n in row.calls if n < per_call]
    full0 = _med([t for t, n in u.calls if n == per_call])
    stub = _med(_BASE.stub_s.get(row.stub, []))
    skip = _med(other)
    fullc = _med(full)
    units = sum(n for _, n in row.calls)
    npass = max(1, len(row.passes))
    mean, mean_clock = statistics.fmean(row.gen_s), statistics.fmean(row.gen_clock)
    # The free-forecast limit: the uncached generation with every skipped step costing only the
    # stub step (a cache whose forecasts and bookkeeping were free).
    u_mean = statistics.fmean(u.gen_clock)
    limit = None
    if stub is not None and full0 is not None and row.cid != "uncached":
        limit = u_mean / (u_mean - (len(other) / npass) * (full0 - stub))
    # A compiled row's yardstick is the uncached model compiled the same way.
    yard = ROWS.get(_compiled_id("uncached", row.compiled)) if row.compiled else None
    yard = yard if (yard is not None and yard is not row and yard.passes) else None
    yard_full = _med([t for t, n in yard.calls if n == per_call]) if yard else None
    full_ref = yard_full if row.compiled else full0
    is_yard = row.cid == "uncached" or (row.compiled is not None and row.cid == _compiled_id("uncached", row.compiled))
    return {
        "passes": len(row.passes),
        "generation_s": list(row.gen_s),
        "generation_clock_s": list(row.gen_clock),
        "mean_s": mean,
        "mean_clock_s": mean_clock,
        "speedup": statistics.fmean(u.gen_clock) / mean_clock,
        "speedup_wall": statistics.fmean(u.gen_s) / mean,
        "speedup_limit": limit,
        "fraction_of_limit": (u_mean / mean_clock) / limit if limit else None,
        "speedup_per_pass": [a / b for a, b in zip(u.gen_clock, row.gen_clock)] if row.cid != "uncached" else None,
        "steps_full": len(full) / npass,
        "steps_skipped": len(other) / npass,
        "skipped_fraction": 1.0 - units / (len(row.calls) * per_call),
        "full_step_s": fullc,
        "skip_step_s": skip,
        "uncached_full_step_s": full0,
        "stub_kind": row.stub,
        "stub_s": stub if row.cid != "uncached" else None,
        "forecast_overhead": (skip - stub) / full0 if (skip is not None and stub is not None) else None,
        "full_step_overhead": None if (is_yard or fullc is None or full_ref is None) else (fullc - full_ref) / full_ref,
        "compiled": row.compiled,
        "speedup_vs_compiled_uncached": statistics.fmean(yard.gen_clock) / mean_clock if yard else None,
        "state_bytes": row.memory[0],
        "buffer_bytes": row.memory[1],
        "rel_l2_error": _rel_l2(row.first, _BASE.latents),
        "repeatable": row.repeatable,
    }


# ---- summary -----------------------------------------------------------------------------------
def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _fmt_bytes(b: Optional[int]) -> str:
    return "0" if not b else f"{b / 2**20:.1f} MiB"


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        rows = [r for r in ROWS.values() if r.agg]
        if not rows:
            if NOT_RUN:
                terminalreporter.section("foca-kernels end-to-end summary")
                for cid, why in NOT_RUN.items():
                    terminalreporter.write_line(f"{cid}: {why}")
            return
        tr = terminalreporter
        tr.section("foca-kernels end-to-end summary")
        threads = f", {torch.get_num_threads()} torch threads" if DEVICE.type == "cpu" else ""
        tr.write_line(
            f"{MODEL} ({SCHEDULER}, {STEPS} steps, {BATCH} labels x 2 CFG in one call), device {DEVICE}{threads}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, {PASSES} passes (ABBA order)"
        )
        tr.write_line(
            f"times: {CLOCK_NAME} unless marked wall; per generation = mean over passes; "
            "speed-up = mean uncached / mean; skipped = attn1+ff calls not run; step times = medians over calls; "
            "forecast overhead = (skipped step - stub step) / uncached full step; "
            "limit = speed-up if skipped steps cost only the stub step (free forecasts); "
            "full-step overhead = (full step - uncached full step) / uncached full step; "
            "error = relative L2 of the final latents vs uncached"
        )
        tr.write_line("")
        tr.write_line(
            "| configuration | full / skipped steps | block compute skipped | per generation | speed-up | "
            "limit (% reached) | per generation (wall) | speed-up (wall) | full step | skipped step | "
            "forecast overhead | full-step overhead | cache state | buffers | rel. L2 error |"
        )
        tr.write_line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            a = r.agg
            unc = r.cid == "uncached" or (r.compiled is not None and r.cid == _compiled_id("uncached", r.compiled))
            note = "" if a["repeatable"] else " (passes differ)"
            limit = ("-" if a["speedup_limit"] is None
                     else f"{a['speedup_limit']:.2f}x ({_fmt_pct(a['fraction_of_limit'])})")
            tr.write_line(
                f"| {r.cid} | {a['steps_full']:g} / {a['steps_skipped']:g} | {_fmt_pct(a['skipped_fraction'])} | "
                f"{_fmt_s(a['mean_clock_s'])} | {a['speedup']:.2f}x | "
                f"{limit} | "
                f"{_fmt_s(a['mean_s'])} | {a['speedup_wall']:.2f}x | "
                f"{_fmt_s(a['full_step_s'])} | "
                f"{_fmt_s(a['skip_step_s'])} | {'-' if unc else _fmt_pct(a['forecast_overhead'])} | "
                f"{'-' if unc else _fmt_pct(a['full_step_overhead'])} | "
                f"{'-' if unc else _fmt_bytes(a['state_bytes'])} | {'-' if unc else _fmt_bytes(a['buffer_bytes'])} | "
                f"{'-' if unc else format(a['rel_l2_error'], '.2e')}{note} |"
            )
        tr.write_line("")
        u = ROWS["uncached"]
        tr.write_line(
            "uncached generation per pass: "
            + ", ".join(f"{_fmt_s(c)} ({_fmt_s(w)} wall)" for c, w in zip(u.gen_clock, u.gen_s))
            + "; stub steps (median): " + ", ".join(f"{k} {_fmt_s(_med(v))}" for k, v in _BASE.stub_s.items())
        )
        for r in rows:
            if r.cid != "uncached":
                tr.write_line(
                    f"{r.cid}: per pass {', '.join(_fmt_s(t) for t in r.gen_clock)}, speed-up per pass "
                    f"{', '.join(f'{x:.2f}' for x in r.agg['speedup_per_pass'])}; "
                    f"schedule {r.notes.get('schedule', '')}"
                    + (f"; {r.notes['passes_not_run']} pass(es) not run (time box)"
                       if r.notes.get("passes_not_run") else "")
                )
        compiled = [r for r in rows if r.compiled]
        if compiled:
            tr.write_line("")
            tr.write_line("torch.compile rows (whole model, compiled after the cache is attached; the untimed first "
                          "generation compiles; speed-ups above are against the eager uncached model):")
            for r in compiled:
                a = r.agg
                vs = a["speedup_vs_compiled_uncached"]
                tr.write_line(
                    f"- {r.cid}: compile (first generation, wall) {_fmt_s(r.notes.get('compile_s'))}, "
                    f"{r.notes.get('graphs_compiled', '?')} graphs, {r.notes.get('graph_breaks', '?')} graph breaks, "
                    f"graphs compiled during timed passes "
                    f"{r.notes.get('graphs_compiled_in_timed_passes', '?')}; "
                    f"speed-up vs eager uncached {a['speedup']:.2f}x"
                    + (f", vs the uncached model compiled the same way {vs:.2f}x" if vs else ""))
        if NOT_RUN:
            tr.write_line("")
            tr.write_line("rows not run:")
            for cid, why in NOT_RUN.items():
                tr.write_line(f"- {cid}: {why}")
