"""Public entry points: enable / disable the cache on a model or a diffusers pipeline, reset
it, name contexts, and read its counters and memory."""

from __future__ import annotations

import warnings
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .config import CacheConfig, FocaCacheWarning
from .controller import CacheController
from .duca import PartialCall
from .memory import check_memory
from .models import ATTR, controller_of, models_of, unwrap
from .targets import Site, select_sites
from .wrap import AttributePatch, is_foca_wrapper

# ---- finding models (hooks/models.py) ----------------------------------------------------
_unwrap, _models, _controller = unwrap, models_of, controller_of


# ---- wrappers --------------------------------------------------------------------------
# The wrappers' own frames are skipped by dynamo (compile_frames) and the controller's
# methods are disabled for it, so under torch.compile the Python state machine runs eagerly
# and only the original forwards are traced. When no dynamo frame callback is set (plain
# eager use) the wrappers call the undecorated methods: torch.compiler.disable's wrapper
# costs ~5 us per call, most of a skipped module's host time.
try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:  # pragma: no cover - torch without dynamo
    def _dynamo_callback():
        return None

def _root_forward(ctl: CacheController):
    def make(orig):
        def forward(*args, **kwargs):
            if ctl.current is not None:
                ctl.check_same_thread()  # another thread inside this model: refuse
                return orig(*args, **kwargs)
            if not ctl.active:
                return orig(*args, **kwargs)
            eager = _dynamo_callback() is None
            (ctl.eager_begin_step if eager else ctl.begin_step)(args, kwargs)
            try:
                out = orig(*args, **kwargs)
            except BaseException:
                ctl.abort_step()
                raise
            return (ctl.eager_end_step if eager else ctl.end_step)(out)

        return forward

    return make


def _module_forward(ctl: CacheController, site: Site):
    def make(orig):
        def forward(*args, **kwargs):
            if ctl.current is None or not ctl.active:
                return orig(*args, **kwargs)
            eager = _dynamo_callback() is None
            # refuses a second thread
            out, group = (ctl.eager_before_module if eager else ctl.before_module)(site, args, kwargs)
            if out is not None:
                return out  # skipped: the forecast, the module does not run
            if isinstance(group, PartialCall):
                return group.run(orig, args, kwargs)  # duca conservative step: fresh tokens only
            out = orig(*args, **kwargs)
            if group is not None:
                (ctl.eager_after_module if eager else ctl.after_module)(group, out, args, kwargs)
            return out

        return forward

    return make


def _cache_context(ctl: CacheController):
    def make(orig):
        @contextmanager
        def cache_context(name, **kwargs):
            with ctl.stack.enter(name, **kwargs), orig(name, **kwargs):
                yield

        return cache_context

    return make


def _pipeline_call(pipeline):
    """The pipeline's progress_bar, which every diffusers pipeline opens right before its
    denoising loop: each call marks a new generation for every cached model of the pipeline
    (also when the previous one was abandoned mid-way, or had another number of steps)."""
    pipe_ref = weakref.ref(pipeline)

    def make(orig):
        def progress_bar(*args, **kwargs):
            pipe = pipe_ref()
            if pipe is not None:
                for _, ctl in _controllers(pipe, strict=False):
                    if ctl.current is None:
                        ctl.reset()
            return orig(*args, **kwargs)

        return progress_bar

    return make


def _reset_stateful_cache(ctl: CacheController):
    def make(orig):
        def _reset_stateful_cache(*args, **kwargs):
            ctl.reset()  # diffusers pipelines call this when a generation ends
            return orig(*args, **kwargs)

        return _reset_stateful_cache

    return make


# ---- public API --------------------------------------------------------------------------
def enable_cache(model_or_pipeline, config: Optional[CacheConfig] = None, *, inputs=None, tokens=None,
                 contexts: int = 1, strict: bool = False, **options) -> None:
    """Cache the model's (or the pipeline's transformers') modules as ``config`` says.

    ``options`` are CacheConfig fields, used instead of or on top of ``config``:
    ``enable_cache(pipe, interval=5, method="foca")``; other keywords are method options, as
    in :func:`foca_kernels.allocate`: ``enable_cache(pipe, anchor="bdf2")``. Enabling on a model that already has
    the cache raises (call :func:`disable_cache` first); nothing is ever wrapped twice.

    Memory: given ``inputs`` (example inputs of one model call) or ``tokens``, and ``contexts``,
    as :func:`~foca_kernels.estimate_cache_memory` takes them, the cache's memory is estimated
    first and compared with the free memory of its device: beyond it, a FocaCacheWarning names
    the options that would fit (``strict=True``: MemoryError, nothing enabled). cache_info then
    reports the estimate beside the measured bytes.
    """
    config = CacheConfig.build(config, **options)
    if strict and inputs is None and tokens is None:
        raise TypeError("strict=True checks the cache's memory estimate: pass inputs= (example inputs) or tokens=")
    models, pipeline = _models(model_or_pipeline)
    for name, model in models:  # check everything before touching anything
        if _controller(model) is not None or is_foca_wrapper(model.__dict__.get("forward")):
            raise RuntimeError(f"foca cache is already enabled on {name} ({type(model).__name__}); disable_cache first")
        if getattr(model, "_cache_config", None) is not None:
            raise RuntimeError(
                f"{name} ({type(model).__name__}) has diffusers' own caching enabled "
                f"({type(model._cache_config).__name__}); call its disable_cache() first"
            )
    plans = []
    for name, model in models:
        sites = select_sites(model, config)
        for s in sites:
            if is_foca_wrapper(s.module.__dict__.get("forward")):
                raise RuntimeError(f"{name}.{s.name} is already cached by another enable_cache; disable that first")
        plans.append((model, sites))
    estimates = [None] * len(plans)
    if inputs is not None or tokens is not None:  # warns, or raises (strict) before anything is wrapped
        estimates = check_memory(models, config, inputs=inputs, tokens=tokens, contexts=contexts, strict=strict)
    done = []
    try:
        for (model, sites), est in zip(plans, estimates):
            _enable_one(model, config, sites, pipeline)
            _controller(model).memory_estimate = est
            done.append(model)
        if pipeline is not None and callable(getattr(pipeline, "progress_bar", None)):
            # one wrapper per pipeline, kept (and removed) with its first model's patches
            _controller(done[0]).patches.append(AttributePatch(pipeline, "progress_bar", _pipeline_call(pipeline)))
    except BaseException:
        for model in done:  # all or nothing
            disable_cache(model)
        raise


def _enable_one(model: nn.Module, config: CacheConfig, sites: List[Site], pipeline) -> None:
    ctl = CacheController(model, config, sites, pipeline)
    ctl.compile_safe()
    try:
        root = AttributePatch(model, "forward", _root_forward(ctl), skip_dynamo=True)
        ctl.patches.append(root)
        probe = Site("", model, "output")
        probe.bind_signature(root.original)
        ts = config.timestep_arg
        ctl.timestep_index = probe.params.get(ts) if isinstance(ts, str) else None
        for site in sites:
            site.bind_signature(site.module.forward)
            ctl.patches.append(AttributePatch(site.module, "forward", _module_forward(ctl, site), skip_dynamo=True))
        if ctl.duca is not None:  # value projections feeding DuCa's token scores
            ctl.patches.extend(ctl.duca.install(ctl, model, sites))
        if callable(getattr(model, "cache_context", None)):  # diffusers CacheMixin
            ctl.patches.append(AttributePatch(model, "cache_context", _cache_context(ctl)))
        if callable(getattr(model, "_reset_stateful_cache", None)):
            ctl.patches.append(AttributePatch(model, "_reset_stateful_cache", _reset_stateful_cache(ctl)))
    except BaseException:
        for p in reversed(ctl.patches):
            p.restore()
        raise
    model.__dict__[ATTR] = ctl


def disable_cache(model_or_pipeline) -> bool:
    """Remove the cache: the original forward methods (the same objects) are back and the
    cached tensors are released. Returns whether a cache was enabled."""
    models, _ = _models(model_or_pipeline)
    found = False
    for _, model in models:
        ctl = _controller(model)
        if ctl is None:
            continue
        found = True
        ctl.active = False  # a wrapper that cannot be removed (see below) just passes through
        for patch in reversed(ctl.patches):
            if not patch.restore():
                warnings.warn(
                    f"foca cache: {type(patch.obj).__name__}.{patch.attr} was wrapped again after the cache was "
                    "enabled; the cache's wrapper stays in that chain as a pass-through",
                    FocaCacheWarning,
                    stacklevel=2,
                )
        ctl.reset(free_memory=True)
        del model.__dict__[ATTR]
    return found


def is_cache_enabled(model_or_pipeline) -> bool:
    models, _ = _models(model_or_pipeline)
    return any(_controller(m) is not None for _, m in models)


def _controllers(obj, strict: bool = True) -> List[Tuple[str, CacheController]]:
    models, _ = _models(obj)
    ctls = [(n, _controller(m)) for n, m in models if _controller(m) is not None]
    if strict and not ctls:
        raise RuntimeError(f"foca cache is not enabled on this {type(obj).__name__}")
    return ctls


def reset_cache(model_or_pipeline, *, free_memory: bool = False, clear_stats: bool = False) -> None:
    """Forget all cached history (the next call starts a new generation). ``free_memory``
    also releases the cached tensors; ``clear_stats`` zeroes the counters of cache_info."""
    for _, ctl in _controllers(model_or_pipeline):
        ctl.reset(free_memory=free_memory)
        if clear_stats:
            ctl.clear_stats()


def new_generation(model_or_pipeline, num_steps: Optional[int] = None) -> None:
    """Mark that the next model call starts a new generation (of ``num_steps`` steps, if
    given). Free: nothing is read from the GPU. Once called, the cache takes the caller's
    word for every boundary of this model: call it before each generation (or use
    :func:`generation`). Pipelines need neither: their calls are found by themselves."""
    for _, ctl in _controllers(model_or_pipeline):
        ctl.new_generation(num_steps)


@contextmanager
def generation(model_or_pipeline, num_steps: Optional[int] = None):
    """``with generation(model): <one sampling loop>``: the block is one generation; the
    next call after it starts a new one. See :func:`new_generation`."""
    new_generation(model_or_pipeline, num_steps)
    try:
        yield
    finally:
        for _, ctl in _controllers(model_or_pipeline, strict=False):
            if ctl.current is None:
                ctl.new_generation(None)


@contextmanager
def cache_context(model_or_pipeline, name: str, **info):
    """Run the enclosed model calls in cache context ``name`` (own step counter and states),
    like diffusers' ``transformer.cache_context(name)``, for any cached model. ``info`` may
    carry step_index, num_inference_steps, timestep, sigma."""
    with ExitStack() as stack:
        for _, ctl in _controllers(model_or_pipeline):
            stack.enter_context(ctl.stack.enter(name, **info))
        yield


@contextmanager
def cached(model_or_pipeline, config: Optional[CacheConfig] = None, **options):
    """``with cached(pipe, interval=5): pipe(...)``: enable for the block, disable after."""
    enable_cache(model_or_pipeline, config, **options)
    try:
        yield
    finally:
        disable_cache(model_or_pipeline)


@dataclass
class CacheInfo:
    """Counters and memory of a cache (summed over a pipeline's models)."""

    enabled: bool
    method: str = ""
    schedule: str = ""
    modules: int = 0  # cached modules
    streams: int = 0  # allocated states (one per output tensor, call, context)
    state_bytes: int = 0  # sum of the states' nbytes
    buffer_bytes: int = 0  # preallocated forecast outputs and residual scratch
    # what enable_cache(inputs= / tokens=) estimated for them (estimate_cache_memory); None: no estimate
    state_bytes_estimate: Optional[int] = None
    buffer_bytes_estimate: Optional[int] = None
    steps_full: int = 0  # model calls decided "compute" (summed over contexts)
    steps_skipped: int = 0  # model calls decided "skip"
    calls_computed: int = 0  # cached-module calls that ran the module
    calls_forecast: int = 0  # cached-module calls answered by a forecast
    calls_forced: int = 0  # computed on a skipped step: not enough history yet
    shape_resets: int = 0
    generations: int = 0
    host_syncs: int = 0  # GPU tensors the hooks read as numbers (each one a host-device sync)
    boundary: str = ""  # what tells generations apart (latest call): "pipeline", "timesteps", ...
    contexts: Dict[str, dict] = field(default_factory=dict)
    pattern: str = ""  # schedule "rcs": the decisions of the latest generation, 'F' computed, 's' skipped

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.buffer_bytes


def cache_info(model_or_pipeline) -> CacheInfo:
    ctls = _controllers(model_or_pipeline, strict=False)
    if not ctls:
        return CacheInfo(enabled=False)
    info = CacheInfo(enabled=True, method=ctls[0][1].method.describe(), schedule=repr(ctls[0][1].schedule))
    rcs = ctls[0][1].rcs
    if rcs is not None:
        info.schedule, info.pattern = repr(rcs), rcs.pattern()
    ests = [ctl.memory_estimate for _, ctl in ctls]
    if all(e is not None for e in ests):
        info.state_bytes_estimate = sum(e.state_bytes for e in ests)
        info.buffer_bytes_estimate = sum(e.buffer_bytes for e in ests)
    for name, ctl in ctls:
        info.modules += len(ctl.sites)
        info.calls_computed += ctl.calls_computed
        info.calls_forecast += ctl.calls_forecast
        info.calls_forced += ctl.calls_forced
        info.shape_resets += ctl.shape_resets
        info.host_syncs += ctl.host_syncs
        info.boundary = info.boundary or ctl.boundary
        for cname, ctx in ctl.contexts.items():
            s = ctx.summary()
            info.streams += s["streams"]
            info.state_bytes += s["state_bytes"]
            info.buffer_bytes += s["buffer_bytes"]
            info.steps_full += s["steps_full"]
            info.steps_skipped += s["steps_skipped"]
            info.generations += s["generations"]
            info.contexts[cname if len(ctls) == 1 else f"{name}/{cname}"] = s
    return info


def duca_info(model_or_pipeline) -> dict:
    """DuCa's token counts so far (method "duca"; zeros otherwise): rows the partial calls
    computed and rows they covered, for fractional-compute accounting."""
    out = {"tokens_computed": 0, "tokens_total": 0}
    for _, ctl in _controllers(model_or_pipeline):
        rt = getattr(ctl, "duca", None)
        if rt is not None:
            out["tokens_computed"] += rt.tokens_computed
            out["tokens_total"] += rt.tokens_total
    return out


def cache_states(model_or_pipeline) -> list:
    """All allocated :class:`~foca_kernels.CacheState` objects (for inspection)."""
    return [st for _, ctl in _controllers(model_or_pipeline) for st in ctl.states()]
