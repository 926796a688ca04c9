"""RCS (relational cache scheduling, RFC arXiv 2602.19506): an adaptive full/skip decision
per model call from an input-based estimate of the forecast error.

Reading (docs/method.md, "RFC"): the input ``X`` of the step's *first* cached module call is
the only feature known before the step's first cached module runs or is skipped (every later
cached module's input depends on earlier cached outputs). A probe keeps that input's history
at the full steps (a closed-form state of the temporal method, one per cache context) and
forecasts it at every step; the estimate is the relative error of that forecast,

    e = max over batch rows b of  |X^_b - X_b| / |X_b|      (L2 over each row)

and the step is computed fully when ``e > rcs_threshold``, or when it must be: warm-up,
``final`` steps, ``rcs_max_gap`` steps since the last full one, or a probe without enough
history. Otherwise every cached module of the call is forecast.

Decided ONCE per model call, at its first cached module call (``CacheController.before_module``;
``begin_step`` leaves the decision open unless it is forced), so it is the same for every
cached module of the call and every batch row (batched CFG included). Separate CFG calls
(cache contexts) share it: the first context to reach step k of generation g decides, the
others take its decision for (g, k). Across processes (torch.distributed initialised) the
estimate is all-reduced before the threshold is applied, so every rank takes the same
decisions: ``rcs_reduce="max"`` (data parallel: MAX of each rank's estimate, one scalar) or
``"sum"`` (sequence parallel: SUM of each row's squared error and squared norm over the
token shards, 2 x batch scalars, then the same max over rows as one process would take).

Cost: the probe's forecast (one fused launch over one module input), two reductions, and
ONE host read of one scalar per decided step (inherent to an adaptive schedule: the host
must know whether to run the modules). Forced and shared decisions read nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Optional, Tuple

import torch

from .. import api as _api
from ..methods import CLOSED_FOCA_READING, RawHistory, Reuse
from ..registry import make_method
from ..rfc.method import RFC
from .rfe import module_input

RCS_REDUCE = ("max", "sum")
LOG_LENGTH = 4096


def probe_method(config):
    """The temporal method the probe forecasts the input with: the cached method's when it is
    in closed form (rfc: its base), else FoCa's default closed form (r7)."""
    m = config.make_method()
    if isinstance(m, RFC):
        return m.base
    if isinstance(m, (RawHistory, Reuse)):
        return m
    return make_method("foca", reading=CLOSED_FOCA_READING)


class RelationalSchedule:
    def __init__(self, config):
        self.threshold = float(config.rcs_threshold)
        self.max_gap = int(config.rcs_max_gap)
        self.warmup = config.warmup
        self.final = config.final
        self.reduce = config.rcs_reduce
        self.group = config.rcs_group
        self.backend = config.backend
        self.method = probe_method(config)
        self.decisions: Dict[Tuple[int, int], bool] = {}  # (generation, step) -> full, shared by contexts
        self.probes: Dict[str, object] = {}  # context name -> CacheState of the first cached input
        self.scratch: Dict[str, torch.Tensor] = {}
        self.last_full: Dict[str, int] = {}  # context name -> step of its latest full compute
        # (context, step, estimate or None, full) of the latest decisions (diagnostics; kept after disable)
        self.log: Deque[Tuple[str, int, Optional[float], bool]] = deque(maxlen=LOG_LENGTH)
        self._taus: Dict[str, float] = {}  # context name -> time of the probe's latest step
        self.accumulate = bool(config.rcs_accumulate)
        self.acc: Dict[str, float] = {}  # context name -> estimates summed since its latest full step

    # ---- decisions ----------------------------------------------------------------------
    def forced(self, ctx, step: int, num_steps: Optional[int]) -> bool:
        if step < self.warmup:
            return True
        if num_steps is not None and step >= num_steps - self.final:
            return True
        last = self.last_full.get(ctx.name)
        if last is None or step - last >= self.max_gap:
            return True
        probe = self.probes.get(ctx.name)
        return probe is None or not probe.ready

    def begin(self, ctx, step: int, num_steps: Optional[int]) -> Optional[bool]:
        """At ``begin_step``: True/False when known without the input (forced, or already
        decided for this step by another context), None when the first cached input decides."""
        if step == 0:  # a new generation in this context
            self.last_full.pop(ctx.name, None)
            self._prune(ctx.generations)
        key = (ctx.generations, step)
        if key in self.decisions:
            return self.decisions[key]
        if self.forced(ctx, step, num_steps):
            self.decisions[key] = True
            self.log.append((ctx.name, step, None, True))
            return True
        return None

    def _prune(self, generation: int) -> None:
        for k in [k for k in self.decisions if k[0] < generation - 1]:
            del self.decisions[k]

    def observe(self, ctx, step: int, tau: float, full: Optional[bool], site, args, kwargs) -> bool:
        """At the step's first cached call: decide if still open, then advance the probe (store
        the input at a full step, forecast it at a skipped one). Returns the decision."""
        x = module_input(site, args, kwargs)
        if x is None:
            raise RuntimeError(f"foca cache: schedule 'rcs' needs a tensor input of {site.name!r}, "
                               "the first cached module")
        x = x.detach()
        probe = self.probes.get(ctx.name)
        if probe is not None and (probe.shape != x.shape or probe.io_dtype != x.dtype or probe.device != x.device):
            probe = None  # a new shape: start the probe over (forced full steps until it is ready again)
        if probe is None or step == 0:
            if probe is None:
                probe = self.probes[ctx.name] = _api.allocate(x, self.method)
            probe.reset()
            if full is None:  # cannot estimate without a history
                full = True
        h = 1.0 if probe.t is None else tau - self._taus[ctx.name]
        key = (ctx.generations, step)
        if full is None:
            est = self._estimate(ctx.name, probe, x, h)
            if self.accumulate:  # the errors of the window's skipped steps add up along the trajectory
                est += self.acc.get(ctx.name, 0.0)
            full = est > self.threshold
            self.acc[ctx.name] = 0.0 if full else est
            self.decisions[key] = full
            self.log.append((ctx.name, step, est, full))
        elif not full and probe.ready:  # a skip decided elsewhere: advance the probe all the same
            self._forecast(ctx.name, probe, h)
        if full:
            _api.update_(probe, x, h, backend=self.backend)
            self.last_full[ctx.name] = step
            self.acc[ctx.name] = 0.0
        self._taus[ctx.name] = tau
        return full

    def _forecast(self, name: str, probe, h: float) -> torch.Tensor:
        out = self.scratch.get(name)
        if out is None or out.shape != probe.shape or out.dtype != probe.io_dtype or out.device != probe.device:
            out = self.scratch[name] = torch.empty(probe.shape, dtype=probe.io_dtype, device=probe.device)
        return _api.forecast_(probe, out, h, backend=self.backend)

    def _estimate(self, name: str, probe, x: torch.Tensor, h: float) -> float:
        """The error estimate of this step (its one host read). The probe advances by the
        forecast whatever the decision; a full step then also stores ``x``."""
        with torch.no_grad():
            d = self._forecast(name, probe, h).sub_(x)  # X^ - X
            rows = x.shape[0] if x.dim() > 1 else 1
            num = d.reshape(rows, -1).float().pow(2).sum(1)
            den = x.reshape(rows, -1).float().pow(2).sum(1)
            dist = distributed(self.group)
            if dist is not None and self.reduce == "sum":  # token shards: add up each row's sums
                v = torch.cat([num, den])
                dist.all_reduce(v, op=dist.ReduceOp.SUM, group=self.group)
                num, den = v[:rows], v[rows:]
            e = (num / den.clamp_min(1e-30)).sqrt().max()
            if dist is not None and self.reduce == "max":  # data parallel: the largest rank's estimate
                dist.all_reduce(e, op=dist.ReduceOp.MAX, group=self.group)
            return float(e)  # the one host read of the step

    def pattern(self) -> str:
        """The decisions of the latest generation, 'F' computed, 's' skipped ('?' undecided)."""
        if not self.decisions:
            return ""
        g = max(k[0] for k in self.decisions)
        steps = {k[1]: v for k, v in self.decisions.items() if k[0] == g}
        return "".join("F" if steps.get(i) else "s" if i in steps else "?" for i in range(max(steps) + 1))

    def __repr__(self) -> str:
        return (f"RelationalSchedule(threshold={self.threshold:g}, max_gap={self.max_gap}, warmup={self.warmup}, "
                f"final={self.final}, accumulate={self.accumulate}, probe={self.method.describe()})")

    def reset(self) -> None:
        self.decisions.clear()
        self.last_full.clear()
        self._taus.clear()
        self.acc.clear()
        for p in self.probes.values():
            p.reset()

    def clear(self) -> None:
        self.reset()
        self.probes.clear()
        self.scratch.clear()


def distributed(group=None):
    """torch.distributed when a process group is initialised (else None)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def make_rcs(config) -> Optional[RelationalSchedule]:
    if config.schedule != "rcs":
        return None
    return RelationalSchedule(config)
