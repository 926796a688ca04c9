"""The state machine behind the hooks of one model.

The model's own forward is wrapped to mark one step: it picks the context, detects a new
generation, advances the step counter, takes the full/skip decision and the time step,
then runs the model. Each cached module's forward is wrapped to either run the module and
feed its output(s) to the cache (full step), or return the forecast without running the
module (skipped step). All decisions are Python-side; tensors are touched only by the
fused ops (plus the residual sub/add).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .config import CacheConfig, FocaCacheWarning
from .context import ContextStack, ContextState
from .duca import DucaRuntime
from .pending import PendingUpdates
from .rcs import make_rcs
from .schedule import Schedule
from .stream import StreamGroup, input_signature
from .targets import Site

HOOK_RUNTIMES = {"duca": DucaRuntime}
"""The hooks' part of each hook-level method of the registry (foca_kernels/registry.py), by its name."""


class _Mode:
    device_like = False  # see device_like()


@contextmanager
def device_like():
    """Test mode: inside it, every tensor counts as a GPU tensor for the hooks, so a CPU run
    sees what a CUDA run does. A timestep is then unreadable without a host-device sync:
    generation boundaries must come from host-side facts (or from a counted sync,
    ``cache_info().host_syncs``), exactly as on a GPU. Tensors and results are unchanged."""
    prev, _Mode.device_like = _Mode.device_like, True
    try:
        yield
    finally:
        _Mode.device_like = prev


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t`` as a Python number is free: a CPU tensor (outside
    :func:`device_like`). Reading a GPU tensor waits for every kernel queued before it (a
    host-device sync), so the per-step path does it only where ``CacheConfig.sync`` allows."""
    return t.device.type == "cpu" and not _Mode.device_like


@dataclass
class StepInfo:
    """What the cached modules need to know during one model call."""

    ctx: ContextState
    step: int
    full: Optional[bool]  # None: schedule "rcs" decides at the first cached module call
    update: bool  # whether full steps feed the cache (False when nothing is forecast later)
    tau: float
    calls: Dict[str, int] = field(default_factory=dict)  # module name -> calls so far this step
    written: List[torch.Tensor] = field(default_factory=list)  # forecast tensors returned
    written_ptrs: set = field(default_factory=set)  # storages of the grouped forecasts returned
    warned_shape: bool = False
    batched: Optional[set] = None  # groups forecast together at this (skipped) step's first cached call
    plans: dict = field(default_factory=dict)  # full-step plans shared by states with one history
    phase: str = ""  # duca: "full" / "conservative" / "aggressive"
    # duca: this call holds two CFG halves (conservative steps only): a bool or a 0-d device bool tensor
    cfg_batched: object = False
    pending: Optional[PendingUpdates] = None  # full-step updates recorded by after_module, run at end_step


class Observe:
    """A call the schedule skips, computed during a calibration (hooks/calibration.py): the module
    runs and its output goes to the calibration, not to the cache."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group


class CacheController:
    def __init__(self, model: torch.nn.Module, config: CacheConfig, sites: List[Site], pipeline=None):
        self.model_ref = weakref.ref(model)
        self.config = config
        self.method = config.make_method()
        self.schedule = Schedule.from_config(config)
        self.sites = sites
        self.contexts: Dict[str, ContextState] = {}
        self.stack = ContextStack(config.default_context)
        self.current: Optional[StepInfo] = None
        self.thread: Optional[int] = None  # thread inside the current model call
        self.active = True
        self.patches: list = []
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.timestep_index: Optional[int] = None  # positional index of the timestep argument
        self.calls_computed = 0
        self.calls_forecast = 0
        self.calls_forced = 0  # computed on a skipped step: the module's cache was not ready
        self.shape_resets = 0
        self._warned: set = set()
        self._host_values: Dict[int, tuple] = {}  # id(tensor) -> (tensor, its values on the host)
        self.host_syncs = 0  # GPU tensors read as numbers by the hooks (each one a host-device sync)
        self.explicit = False  # new_generation()/generation() used: the caller marks every generation
        self.generation_steps: Optional[int] = None  # steps of the current generation, as the caller said
        self.boundary = ""  # how the latest step's generation boundary was known (cache_info)
        self.calibration = None  # a hooks.calibration.Calibration while one runs: every call is computed
        self.memory_estimate = None  # enable_cache's MemoryEstimate for this model (hooks/memory.py), if made
        self.rcs = make_rcs(config)  # schedule="rcs": the adaptive decision (hooks/rcs.py), else None
        self.duca = None  # DuCa's token selection and partial calls (method="duca")
        spec = config.method_spec
        if spec is not None and spec.hook_level:
            if spec.name not in HOOK_RUNTIMES:
                raise NotImplementedError(f"method {spec.name!r} needs the hooks, and they have no runtime for it")
            self.duca = HOOK_RUNTIMES[spec.name](config)

    # ---- helpers -----------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"foca cache: {message}", FocaCacheWarning, stacklevel=4)

    def _scheduler(self):
        pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
        return getattr(pipe, "scheduler", None)

    def _read(self, v, sync: bool) -> Optional[float]:
        """A timestep-like argument as one number: None if there is none, or if it is a GPU
        tensor and ``sync`` is off (reading it with ``sync`` on is counted in host_syncs)."""
        if v is None:
            return None
        if isinstance(v, torch.Tensor):
            if not v.numel():
                return None
            if not on_host(v):
                if not sync:
                    return None
                self.host_syncs += 1
            # max: pipelines with per-token timesteps (Wan 2.2 expand_timesteps) mask some to 0
            return float(v.max())
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    def _timestep_arg(self, args, kwargs):
        key = self.config.timestep_arg
        if isinstance(key, int):
            return args[key] if key < len(args) else None
        v = kwargs.get(key)
        if v is None and self.timestep_index is not None and self.timestep_index < len(args):
            v = args[self.timestep_index]
        return v

    def _host_copy(self, values) -> Optional[list]:
        """A scheduler's timesteps/sigmas as Python floats, copied to the host once per tensor
        (a new generation's set_timesteps makes a new tensor): at most one sync per generation,
        none when they already live on the CPU."""
        if values is None:
            return None
        key = id(values)
        hit = self._host_values.get(key)
        if hit is None or hit[0] is not values:
            if isinstance(values, torch.Tensor) and not on_host(values):
                self.host_syncs += 1
            hit = self._host_values[key] = (values, [float(v) for v in values.detach().to("cpu").reshape(-1)]
                                            if isinstance(values, torch.Tensor) else [float(v) for v in values])
        return hit[1]

    def _scheduler_timestep(self, step: int) -> Optional[float]:
        sched = self._scheduler()
        ts = self._host_copy(getattr(sched, "timesteps", None)) if sched is not None else None
        if ts is None:
            return None
        i = int(getattr(sched, "begin_index", None) or 0) + step
        return ts[i] if i < len(ts) else None

    def _num_steps(self, info: Dict[str, Any]) -> tuple:
        """(steps of this generation or None, where the number came from)."""
        if self.generation_steps is not None:
            return self.generation_steps, "the caller's generation"
        if self.config.num_inference_steps is not None:
            return self.config.num_inference_steps, "num_inference_steps"
        n = info.get("num_inference_steps")
        if n is not None:
            return int(n), "cache_context"
        sched = self._scheduler()
        ts = getattr(sched, "timesteps", None) if sched is not None else None
        if ts is not None:
            n = len(ts) - int(getattr(sched, "begin_index", None) or 0)
            return (n, "pipeline") if n > 0 else (None, "")
        return None, ""

    def _sigma(self, info: Dict[str, Any], step: int) -> float:
        v = self._read(info.get("sigma"), self.config.sync is True)
        if v is not None:
            return v
        sched = self._scheduler()
        sigmas = getattr(sched, "sigmas", None) if sched is not None else None
        if sigmas is None and self.config.sync is None:
            v = self._read(info.get("sigma"), True)
            if v is not None:
                self._warn_once("sigma-sync", "time='sigmas' reads the GPU sigma given to cache_context at every call "
                                "(one host-device sync per model call): pass it as a number, or enable on the pipeline")
                return v
        if sigmas is None:
            raise ValueError(
                "time='sigmas' needs the sigma of each step: enable the cache on the pipeline (its "
                "scheduler's sigmas are used) or call the model inside cache_context(name, sigma=...)"
            )
        i = int(getattr(sched, "begin_index", None) or 0) + step
        if i >= len(sigmas):
            raise ValueError(f"time='sigmas': step {step} is past the scheduler's {len(sigmas)} sigmas")
        return self._host_copy(sigmas)[i]

    # ---- generations ---------------------------------------------------------------------
    def _boundary(self, ctx: ContextState, args, kwargs, info, step_index, num_steps, steps_from: str) -> tuple:
        """(this call's timestep if read, whether a host-side fact says it starts a new
        generation). Records in :attr:`boundary` what tells this context's generations apart,
        reading the timestep with a sync only where nothing on the host does (sync=None)."""
        cfg = self.config
        want = cfg.time == "timesteps" or cfg.detect_new_generation
        arg = self._timestep_arg(args, kwargs) if want else None
        ts = None
        if want:
            ts = self._read(arg, cfg.sync is True)
            if ts is None:
                ts = self._read(info.get("timestep"), cfg.sync is True)
        new = False
        if ctx.counter.started and cfg.detect_new_generation and ctx.schedule_ref is not None:
            sched = self._scheduler()  # set_timesteps makes a new tensor: the pipeline started again
            new = getattr(sched, "timesteps", None) is not ctx.schedule_ref
        if self.explicit:
            why = "explicit (new_generation / generation)"
        elif self.pipeline_ref is not None:
            why = "pipeline"
        elif step_index is not None:
            why = "step index"
        elif steps_from:
            why = f"step count ({steps_from})"
        elif ts is not None:
            why = "timesteps"
        else:
            why = ""
        if not why and cfg.detect_new_generation:
            if cfg.sync is None and arg is not None:
                ts = self._read(arg, True)
                if ts is not None:
                    why = "timesteps (one host-device sync per model call)"
                    self._warn_once(
                        "boundary-sync",
                        "nothing on the host tells this model's generations apart, so the GPU timestep of every call "
                        "is read to find them (one host-device sync per model call). Cheaper: enable the cache on the "
                        "pipeline, wrap each generation in `with foca_kernels.generation(model):`, call "
                        "foca_kernels.new_generation(model) before each, or pass num_inference_steps",
                    )
            if not why:
                self._warn_once(
                    "boundary-none",
                    "nothing tells this model's generations apart (no pipeline, no num_inference_steps, no "
                    "readable timestep" + (", sync=False" if cfg.sync is False else "") + "): consecutive "
                    "generations would be joined. Call foca_kernels.new_generation(model) before each, or wrap each "
                    "in `with foca_kernels.generation(model):`",
                )
        self.boundary = why or "none"
        return ts, new

    def new_generation(self, num_steps: Optional[int] = None) -> None:
        """The caller's word: the next call of every context starts a new generation (of
        ``num_steps`` steps, if given); from now on the caller marks every generation."""
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}")
        if self.current is not None:
            raise RuntimeError("foca cache: new_generation called inside a model call")
        self.reset()
        self.explicit = True
        self.generation_steps = num_steps

    # ---- one model call ----------------------------------------------------------------
    def begin_step(self, args, kwargs) -> None:
        """Start one model call: sets :attr:`current`."""
        cfg = self.config
        active = self.stack.current
        ctx = self.contexts.get(active.name)
        if ctx is None:
            ctx = self.contexts[active.name] = ContextState(active.name, cfg.time, cfg.detect_new_generation)
        # States made under inference_mode cannot be updated outside it: start them afresh.
        inference = torch.is_inference_mode_enabled()
        if ctx.inference and not inference:
            ctx.free()
        ctx.inference = inference

        info = active.info
        step_index = info.get("step_index")
        num_steps, steps_from = self._num_steps(info)
        ts, new = self._boundary(ctx, args, kwargs, info, step_index, num_steps, steps_from)
        if new or ctx.counter.is_new_generation(ts, step_index, num_steps):
            ctx.reset()
        ctx.check_thread(threading.get_ident())
        if not ctx.counter.started:
            ctx.generations += 1
            sched = self._scheduler()
            ctx.schedule_ref = getattr(sched, "timesteps", None) if sched is not None else None
        step = ctx.counter.advance(ts, step_index)
        ctx.num_steps = num_steps
        if num_steps is None and self.schedule.needs_num_steps:
            self._warn_once(
                "final",
                f"final={cfg.final} needs the number of steps: pass num_inference_steps or enable on the pipeline",
            )
        if cfg.time == "timesteps" and ts is None:
            ts = self._scheduler_timestep(step)
            if ts is None and cfg.sync is None:
                ts = self._read(self._timestep_arg(args, kwargs), True)
                if ts is not None:
                    self._warn_once(
                        "time-sync", "time='timesteps' reads the timestep of every call from the GPU (one host-device "
                        "sync per model call): enable the cache on the pipeline to read its scheduler's timesteps once "
                        "per generation, or use time='step'")
            if ts is None:
                raise ValueError(
                    "time='timesteps': the timestep of this call is not readable without a host-device sync (it "
                    "is a GPU tensor) and no pipeline scheduler gives it: enable the cache on the pipeline, pass "
                    "CacheConfig(sync=True) (one sync per model call), or use time='step'"
                )
        value = ts if cfg.time == "timesteps" else self._sigma(info, step) if cfg.time == "sigmas" else None
        tau = ctx.counter.set_time(value)
        full = self.schedule.is_full(step, num_steps)
        update = (not full) or self.schedule.skips_after(step, num_steps)
        # ---- rcs: full is None until the first cached module's input decides (before_module) ----
        if self.rcs is not None:
            full = self.rcs.begin(ctx, step, num_steps)
            update = num_steps is None or step < num_steps - 1 - cfg.final
        # ---- /rcs ----
        self._count(ctx, full)
        if self.calibration is not None:
            self.calibration.mark(step, bool(full))
        pattern = getattr(self.method, "pattern", None)  # method "fitted": the schedule it was fitted on
        if pattern is not None and num_steps is None and step == 0:
            self._warn_once(
                "fitted-pattern", "the fitted method's weights were fitted on one schedule and this generation's step "
                "count is unknown, so they cannot be checked against it: pass num_inference_steps (or enable on the "
                "pipeline)")
        if pattern is not None and num_steps is not None and step == 0 and self.schedule.pattern(num_steps) != pattern:
            raise ValueError(
                f"the fitted method's weights were fitted on the schedule {pattern} ({len(pattern)} steps), "
                f"this generation's is {self.schedule.pattern(num_steps)}: calibrate again for this schedule")
        self.current = StepInfo(ctx, step, full, update, tau)
        if self.duca is not None:
            self.current.phase = self.duca.phase(self.schedule, step, num_steps)
            if self.current.phase == "conservative":
                self.current.cfg_batched = self.duca.cfg_batched(args, kwargs)
        self.thread = threading.get_ident()

    @staticmethod
    def _count(ctx: ContextState, full: Optional[bool]) -> None:
        ctx.last_full = full
        if full:
            ctx.steps_full += 1
        elif full is not None:
            ctx.steps_skipped += 1

    def check_same_thread(self) -> None:
        """Called when a model call arrives while one is running: only re-entry from the same
        thread is allowed (it passes through uncached)."""
        if self.thread != threading.get_ident():
            raise RuntimeError(
                "foca cache: this cached model was called from two threads at once; concurrent use of one "
                "cached model is not supported (its cache holds one generation's history): give each thread "
                "its own model or serialize the calls"
            )

    def abort_step(self) -> None:
        step, self.current = self.current, None
        if step is not None and step.pending is not None:
            step.pending.drop()  # never run: the recorded modules' states stay as they were

    def end_step(self, out):
        """End the model call. Returned forecast buffers must not leave the model: the next
        step would overwrite them."""
        step, self.current = self.current, None
        if step.pending is not None:
            step.pending.flush(self.config.backend)  # the call's full-step updates, grouped
        if not (step.written or step.written_ptrs) or not self.config.reuse_output_buffers:
            return out
        ptrs = step.written_ptrs | {t.untyped_storage().data_ptr() for t in step.written}

        def own(t):
            return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in ptrs

        if own(out):
            self._warn_once("alias", "the model returns a cached module's output as is; returning a copy")
            return out.clone()
        if type(out) in (tuple, list) and any(own(t) for t in out):
            self._warn_once("alias", "the model returns a cached module's output as is; returning a copy")
            return type(out)(t.clone() if own(t) else t for t in out)
        return out

    def before_module(self, site: Site, args, kwargs):
        """(forecast, None) on a skipped call: return the forecast, do not run the module;
        (None, group): run the module, then :meth:`after_module` (group None: nothing to feed)."""
        if self.thread != threading.get_ident():
            self.check_same_thread()  # raises: another thread inside this model
        step = self.current
        ctx = step.ctx
        # ---- rcs: the step's first cached call decides (when still open) and feeds the probe ----
        if self.rcs is not None and not step.calls:
            undecided = step.full is None
            step.full = self.rcs.observe(ctx, step.step, step.tau, step.full, site, args, kwargs)
            if undecided:
                self._count(ctx, step.full)
        # ---- /rcs ----
        idx = step.calls.get(site.name, 0)
        step.calls[site.name] = idx + 1
        group = ctx.groups.get((site.name, idx))
        if group is None:
            group = ctx.groups[(site.name, idx)] = StreamGroup(site)
        if group.uncacheable is not None:
            self.calls_computed += 1
            return None, None

        sig = input_signature(args, kwargs)
        if sig != group.signature:
            if group.signature is not None and group.has_history:
                self.shape_resets += 1
                if not step.warned_shape:
                    step.warned_shape = True
                    warnings.warn(
                        f"foca cache: input shapes (or dtypes/devices) of {site.name!r} changed at step "
                        f"{step.step} of context {ctx.name!r}; the cache of every module whose inputs changed "
                        "is reset (computed until it has enough history again)",
                        FocaCacheWarning,
                        stacklevel=3,
                    )
                group.reset()
                if step.batched:
                    step.batched.discard(group)  # its batched forecast is void: it computes now
            group.signature = sig

        if not step.full and self.duca is None and self.calibration is None:
            if step.batched is None:
                step.batched = ctx.forecast_all(step.tau, self.config)
                step.written_ptrs = ctx.batch_ptrs
            if group in step.batched:  # forecast with every other ready module, in one launch
                self.calls_forecast += 1
                return group.finish_forecast(args, kwargs), None
        if not step.full and group.ready and self.calibration is not None:
            self.calls_computed += 1
            return None, Observe(group)  # computed; its output is compared with the forecast's terms
        if not step.full and group.ready:
            self.calls_forecast += 1
            if step.phase == "conservative":
                part = self.duca.partial(self, group, site, idx, args, kwargs)
                if part is not None:
                    return None, part  # the wrapper runs the module on the fresh tokens only
            return group.forecast(args, kwargs, step.tau, self.config, step.written), None

        self.calls_computed += 1
        if not step.full:
            self.calls_forced += 1
        return None, (group if step.update else None)

    def after_module(self, group: StreamGroup, out, args, kwargs) -> None:
        step = self.current
        if isinstance(group, Observe):
            tensors = group.group.observed(out, args, kwargs)
            if tensors is not None:
                self.calibration.observe(group.group, tensors, step.tau)
            return
        limit = self.config.max_pending_bytes
        pending = None
        if limit and self.duca is None:  # recorded for end_step's grouped update (duca: per module)
            pending = step.pending
            if pending is None:
                pending = step.pending = PendingUpdates()
        group.update(out, args, kwargs, step.tau, self.config, self.method, step.plans, pending)
        if pending is not None and pending.nbytes > limit:
            pending.flush(self.config.backend)  # bound what the recorded outputs keep alive
        if self.duca is not None:
            self.duca.on_full(group)

    def compile_safe(self) -> None:
        """Keep torch.compile (dynamo) out of the bookkeeping: it runs eagerly, while the
        model code between cached modules and the cached modules themselves still compile
        (with a graph break at each cached module)."""
        from torch.compiler import disable

        for name in ("begin_step", "abort_step", "end_step", "before_module", "after_module", "check_same_thread"):
            setattr(self, "eager_" + name, getattr(self, name))
            setattr(self, name, disable(getattr(self, name)))

    # ---- lifetime ----------------------------------------------------------------------
    def reset(self, free_memory: bool = False) -> None:
        for ctx in self.contexts.values():
            if free_memory:
                ctx.free()
            else:
                ctx.reset()
        if self.rcs is not None:
            self.rcs.clear() if free_memory else self.rcs.reset()
        if free_memory:
            self.contexts.clear()
            if self.duca is not None:
                self.duca.clear()

    def clear_stats(self) -> None:
        self.calls_computed = self.calls_forecast = self.calls_forced = self.shape_resets = self.host_syncs = 0
        for ctx in self.contexts.values():
            ctx.steps_full = ctx.steps_skipped = ctx.generations = 0

    def states(self) -> list:
        return [st for ctx in self.contexts.values() for st in ctx.states()]
