"""What a cache will hold, before it is enabled: :func:`estimate_cache_memory`, and the check
:func:`~foca_kernels.enable_cache` makes with it against the free memory of the device.

The bytes come from the allocator itself. Each stream's state is allocated on the ``meta``
device (no memory) by the path the hooks take at a full step (``Stream.prepare`` ->
``foca_kernels.allocate`` -> ``CacheState`` / ``RFCState``, sized by the slot count the method
declares), and its forecast buffer by ``Stream.forecast_buffer``: the estimate is the number
the allocator allocates, with no table of tensor counts of its own.

The shapes come from
  * example inputs of one model call: the model runs once with forward hooks on the cached
    modules, which record each call's outputs (and, for method "rfc", its input). ``run="fake"``
    (default) runs it under torch's FakeTensorMode: shapes only, no arithmetic and no memory;
    inputs may be ``meta`` tensors, which stand for tensors of their shape and dtype on the
    model's device. ``run="eager"`` makes an ordinary call (under no_grad), for a model whose
    forward reads values of its inputs on the host (FakeTensorMode refuses that);
  * or a token count: every cached output is ``[batch, tokens, hidden]`` with ``hidden`` from
    the model's config (``num_attention_heads * attention_head_dim``) and the model's
    parameter dtype. Only for families whose cached modules each return one such tensor (DiT,
    PixArt, Wan); models that also cache text-token streams (FLUX, SD3, HunyuanVideo,
    CogVideoX) need example inputs.

Not counted: DuCa's per-token scores and ages (``[batch, tokens]``, a hidden-size-th of a
stream), the "rcs" schedule's probe state (one per context), and the model's own activations.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import CacheConfig, FocaCacheWarning
from .families import family_of
from .models import controller_of, models_of
from .rfe import is_relational, module_input
from .stream import Stream, flatten
from .targets import Site, block_position, select_sites
from .wrap import is_foca_wrapper

RUNS = ("fake", "eager")
TOKEN_FAMILIES = ("basic-transformer", "wan")  # every cached output is [batch, tokens, hidden]


class _Call(NamedTuple):
    """What one call of a cached module gave: its cacheable outputs (None: not cacheable) and
    its input (RFE's), as (shape, dtype[, device])."""

    outputs: Optional[Tuple[Tuple[Tuple[int, ...], torch.dtype, torch.device], ...]]
    input: Optional[Tuple[Tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class StreamMemory:
    """One cached stream: one output tensor of one call of one cached module (per context)."""

    model: str  # "model", or the pipeline component ("transformer", "transformer_2", ...)
    module: str  # the cached module's name in model.named_modules()
    call: int  # which call of the module within one model call
    output: int  # which tensor of the module's output
    shape: Tuple[int, ...]
    io_dtype: torch.dtype  # the feature's dtype
    state_dtype: torch.dtype  # the stored dtype
    state_bytes: int
    buffer_bytes: int  # the forecast tensor kept per stream (0 with reuse_output_buffers=False)
    device: str = "meta"  # where the features are (the state lives there)


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << k:
            return f"{n / (1 << k):.2f} {unit}"
    return f"{n} B"


@dataclass
class MemoryEstimate:
    """Bytes a cache will hold: per stream (:attr:`streams`, one context's) and in total (every
    context). ``print(est.table())`` lists the streams; ``repr`` gives the totals."""

    method: str
    state_dtype: Optional[torch.dtype]  # CacheConfig.state_dtype (None: the features' dtype)
    granularity: str
    compute_blocks: Tuple[int, int]
    contexts: int  # cache contexts, each with its own streams (2 for CFG as two calls)
    source: str  # where the shapes came from
    streams: List[StreamMemory] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        return self.contexts * sum(s.state_bytes for s in self.streams)

    @property
    def buffer_bytes(self) -> int:
        return self.contexts * sum(s.buffer_bytes for s in self.streams)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.buffer_bytes

    @property
    def n_streams(self) -> int:
        return self.contexts * len(self.streams)

    def by_device(self) -> Dict[str, int]:
        """Total bytes per device the states will live on."""
        out: Dict[str, int] = {}
        for s in self.streams:
            out[s.device] = out.get(s.device, 0) + self.contexts * (s.state_bytes + s.buffer_bytes)
        return out

    def describe(self) -> str:
        if self.state_dtype is None:  # the features' dtype: name what the streams store
            kinds = sorted({str(s.state_dtype).replace("torch.", "") for s in self.streams})
            dt = "/".join(kinds) + " (the features')" if kinds else "the features' dtype"
        else:
            dt = str(self.state_dtype).replace("torch.", "")
        return (f"{self.method}, state {dt}, granularity {self.granularity}, compute_blocks {self.compute_blocks}, "
                f"{self.contexts} context(s)")

    def __repr__(self) -> str:
        return (f"MemoryEstimate({self.describe()}: {self.n_streams} streams, state {_size(self.state_bytes)} + "
                f"buffers {_size(self.buffer_bytes)} = {_size(self.total_bytes)})")

    def table(self) -> str:
        """One line per stream (of one context), then the totals."""
        rows = [("model", "module", "call", "out", "shape", "dtype", "state", "buffer")]
        for s in self.streams:
            dt = str(s.state_dtype).replace("torch.", "")
            rows.append((s.model, s.module, str(s.call), str(s.output), "x".join(map(str, s.shape)), dt,
                         _size(s.state_bytes), _size(s.buffer_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {2, 3, 6, 7}
        lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        per = f" per context, x{self.contexts}" if self.contexts > 1 else ""
        lines.append(f"{self.describe()} ({self.source}): {self.n_streams} streams{per}; "
                     f"state {_size(self.state_bytes)} + buffers {_size(self.buffer_bytes)} = "
                     f"{_size(self.total_bytes)}")
        return "\n".join(lines)


# ---- shapes --------------------------------------------------------------------------------
def _bound_forward(module: nn.Module):
    """The module's own forward (under a cache wrapper, if enabled), to read its signature."""
    fn = module.__dict__.get("forward")
    if fn is not None and is_foca_wrapper(fn):
        return type(module).forward.__get__(module)
    return module.forward


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _fake_inputs(obj, device: torch.device):
    """``meta`` tensors replaced by tensors of their shape on ``device`` (call inside the fake mode)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device=device) if obj.device.type == "meta" else obj
    if isinstance(obj, dict):
        return {k: _fake_inputs(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_fake_inputs(v, device) for v in obj)
    return obj


def _split_inputs(inputs) -> Tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"inputs must be a dict of keyword arguments, a tuple of positional ones or a tensor, "
                    f"got {type(inputs).__name__}")


def _record(model: nn.Module, sites: Sequence[Site], inputs, run: str) -> Dict[str, List[_Call]]:
    """One model call with forward hooks on ``sites``: each call's outputs and input."""
    records: Dict[str, List[_Call]] = {s.name: [] for s in sites}

    def hook_for(site: Site):
        def hook(module, args, kwargs, out):
            tensors, _ = flatten(out)
            outs = None if tensors is None else tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
            x = module_input(site, args, kwargs)
            records[site.name].append(_Call(outs, None if x is None else (tuple(x.shape), x.dtype)))

        return hook

    args, kwargs = _split_inputs(inputs)
    ctl = controller_of(model)
    with ExitStack() as stack:
        for s in sites:
            stack.callback(s.module.register_forward_hook(hook_for(s), with_kwargs=True).remove)
        if ctl is not None:  # cached already: its wrappers pass through while the shapes are taken
            was = ctl.active
            ctl.active = False
            stack.callback(setattr, ctl, "active", was)
        stack.enter_context(torch.no_grad())
        if run == "fake":
            try:
                from torch._subclasses.fake_tensor import FakeTensorMode
            except ImportError as e:  # pragma: no cover - torch without fake tensors
                raise RuntimeError(f"run='fake' needs torch's FakeTensorMode ({e}); use run='eager'") from None
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            device = _device_of(model)
            args, kwargs = _fake_inputs(args, device), _fake_inputs(kwargs, device)
            try:
                model(*args, **kwargs)
            except Exception as e:
                raise RuntimeError(
                    f"estimate_cache_memory: the shape-only (FakeTensorMode) call of {type(model).__name__} failed "
                    f"({type(e).__name__}: {str(e)[:300]}); pass run='eager' (one ordinary call) or tokens="
                ) from e
        else:
            model(*args, **kwargs)
    return records


def _token_records(model: nn.Module, sites: Sequence[Site], tokens, config: CacheConfig) -> Dict[str, List[_Call]]:
    """Shapes from a token count: every cached output [batch, tokens, hidden] (see the module doc)."""
    if config.targets is not None:
        raise ValueError("tokens= knows the shapes of the family's default targets only; with targets= pass inputs= "
                         "(example inputs, which may be meta tensors)")
    fam = family_of(model).name
    if fam not in TOKEN_FAMILIES:
        raise ValueError(
            f"tokens= gives the shapes of {type(model).__name__} ({fam} family) only in part: its cached modules "
            "also return text-token streams (or its family is not known); pass inputs= (example inputs, which may "
            "be meta tensors)"
        )
    if isinstance(tokens, (tuple, list)) and len(tokens) == 2:
        batch, n = tokens
    else:
        batch, n = 1, tokens
    for v, what in ((batch, "batch"), (n, "tokens")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"tokens must be a positive int or a pair (batch, tokens) of them; got {what} {v!r}")
    cfg = getattr(model, "config", None)
    heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        raise ValueError(f"{type(model).__name__}'s config gives no num_attention_heads * attention_head_dim; "
                         "pass inputs=")
    shape = (batch, n, heads * head_dim)
    dtype, device = _dtype_of(model), _device_of(model)
    return {s.name: [_Call(((shape, dtype, device),), (shape, dtype))] for s in sites}


# ---- bytes ---------------------------------------------------------------------------------
def _never_skips(config: CacheConfig) -> bool:
    """A fixed schedule that computes every step: no state is ever allocated."""
    if config.schedule != "fixed":
        return False
    if config.mask is None:
        return config.interval == 1
    return not callable(config.mask) and all(config.mask)


def _sites(model: nn.Module, config: CacheConfig) -> List[Site]:
    with warnings.catch_warnings():  # enable_cache gives select_sites' warnings itself
        warnings.simplefilter("ignore", FocaCacheWarning)
        sites = select_sites(model, config)
    for s in sites:
        s.bind_signature(_bound_forward(s.module))
    return sites


def _streams(name: str, model: nn.Module, config: CacheConfig, records: Dict[str, List[_Call]]) -> List[StreamMemory]:
    if _never_skips(config):
        return []
    method = config.make_method()
    rfc = is_relational(config)
    out: List[StreamMemory] = []
    for site in _sites(model, config):
        for call, rec in enumerate(records.get(site.name, ())):
            if rec.outputs is None:
                continue  # the hooks leave it uncached
            if rfc and rec.input is None:
                raise RuntimeError(f"method 'rfc' needs a tensor input of {site.name!r}, and its call has none")
            for k, (shape, dtype, device) in enumerate(rec.outputs):
                stream = Stream()  # the hooks' own allocation path, on the meta device
                feature = torch.empty(shape, dtype=dtype, device="meta")
                inp = torch.empty(rec.input[0], dtype=rec.input[1], device="meta") if rfc else None
                st = stream.prepare(feature, config, method, inp)
                if config.reuse_output_buffers:
                    stream.forecast_buffer(config)
                out.append(StreamMemory(name, site.name, call, k, tuple(shape), dtype, st.dtype, st.nbytes,
                                        stream.buffer_bytes, str(device)))
    return out


class _Plan(NamedTuple):
    """What an estimate was made from: enough to estimate other configurations of the same call."""

    models: List[Tuple[str, nn.Module]]
    records: List[Dict[str, List[_Call]]]
    contexts: int
    source: str


def _estimate(plan: _Plan, config: CacheConfig) -> MemoryEstimate:
    est = MemoryEstimate(config.make_method().describe(), config.state_dtype, config.granularity,
                         tuple(config.compute_blocks), plan.contexts, plan.source)
    for (name, model), recs in zip(plan.models, plan.records):
        est.streams.extend(_streams(name, model, config, recs))
    return est


def _variants(model: nn.Module, config: CacheConfig) -> List[CacheConfig]:
    """Configurations whose sites the shape pass also records (for the options that fit)."""
    out = []
    if config.granularity == "module" and config.targets is None:
        out.append(dataclasses.replace(config, granularity="block", compute_blocks=0))
    return out


def _plan(models, config: CacheConfig, inputs, tokens, contexts: int, run: str) -> _Plan:
    if (inputs is None) == (tokens is None):
        raise TypeError("give exactly one of inputs= (example inputs of one model call) and tokens= (a token count)")
    if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
        raise ValueError(f"contexts must be an int >= 1 (cache contexts: 2 for CFG as two calls), got {contexts!r}")
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    records = []
    for _, model in models:
        sites: Dict[str, Site] = {}
        for cfg in [config] + _variants(model, config):
            try:
                found = _sites(model, cfg)
            except ValueError:
                if cfg is config:
                    raise
                continue
            for s in found:
                sites.setdefault(s.name, s)
        if tokens is not None:
            records.append(_token_records(model, list(sites.values()), tokens, config))
        else:
            records.append(_record(model, list(sites.values()), inputs, run))
    source = f"{run} call on example inputs" if tokens is None else f"tokens={tokens!r}"
    return _Plan(list(models), records, contexts, source)


def estimate_cache_memory(model_or_pipeline, config: Optional[CacheConfig] = None, *, inputs=None, tokens=None,
                          contexts: int = 1, run: str = "fake", **options) -> MemoryEstimate:
    """The bytes the cache of ``config`` (or ``options``, as for :func:`enable_cache`) will hold
    on ``model_or_pipeline``: per stream and in total, states and kept forecast buffers.

    ``inputs``: example inputs of ONE call of the (cached) model: a dict of keyword arguments
    (or a tuple of positional ones); ``meta`` tensors stand for tensors of their shape on the
    model's device. ``run``: "fake" (default: a shape-only call under FakeTensorMode) or
    "eager" (an ordinary call). Or ``tokens``: a token count, or (batch, tokens), for families
    whose cached outputs are all ``[batch, tokens, hidden]`` (DiT, PixArt, Wan).
    ``contexts``: cache contexts the model is called in per step (2 when a pipeline makes CFG
    two calls in "cond"/"uncond" contexts; CFG batched into one call is one context with a
    doubled batch in ``inputs``). The states are allocated on the ``meta`` device by the
    hooks' own path: the estimate is what the allocator will allocate (cache_info's
    state_bytes / buffer_bytes after a skipped step)."""
    config = CacheConfig.build(config, **options)
    models, _ = models_of(model_or_pipeline)
    return _estimate(_plan(models, config, inputs, tokens, contexts, run), config)


# ---- the check at enable time -------------------------------------------------------------
def _available_ram() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory(device) -> Optional[int]:
    """Free bytes on ``device``: torch.cuda.mem_get_info on CUDA, the available RAM on the CPU
    (Linux's MemAvailable), None where it is not known (then nothing is checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return _available_ram()
    return None


def _options(plan: _Plan, config: CacheConfig) -> List[List[Tuple[str, CacheConfig]]]:
    """Groups of (label, configuration) the message may name: each group's configurations in
    order of preference (the message names a group's first that fits): a cheaper state dtype,
    block granularity, the first k blocks computed (smallest k first); then the same with a
    cheaper dtype, only named when no single change fits."""
    cur = config.state_dtype
    # (fp8 only where the configuration accepts it: closed-form methods, CacheConfig checks)
    dtypes = [(f"state_dtype={d}", {"state_dtype": d})
              for d in (torch.bfloat16, getattr(torch, "float8_e4m3fn", None))
              if d is not None
              and (cur is None or torch.empty((), dtype=d).element_size() < torch.empty((), dtype=cur).element_size())]
    block = ([("granularity='block'", {"granularity": "block"})]
             if config.granularity == "module" and config.targets is None else [])
    first, last = config.compute_blocks
    pos = [block_position(m, s.name) for _, m in plan.models for s in _sites(m, config)]
    longest = max((p[2] for p in pos if p is not None), default=0)
    blocks = [(f"compute_blocks={(k, last)}", {"compute_blocks": (k, last)}) for k in range(first + 1, longest)]

    def configs(changes):
        out = []
        for label, ch in changes:
            try:
                out.append((label, dataclasses.replace(config, **ch)))
            except (TypeError, ValueError):  # not accepted by this configuration
                continue
        return out

    singles = [configs([d]) for d in dtypes] + [configs(block), configs(blocks)]
    combos = [configs([(f"{d[0]}, {b[0]}", {**d[1], **b[1]}) for b in group])
              for d in dtypes for group in (block, blocks)]
    return [g for g in singles if g], [g for g in combos if g]


def check_memory(models, config: CacheConfig, *, inputs=None, tokens=None, contexts: int = 1, run: str = "fake",
                 strict: bool = False) -> List[MemoryEstimate]:
    """Estimate per model (one each, in ``models``' order) and compare the total on each device
    with :func:`free_memory` there: warn (``strict``: raise MemoryError) when it exceeds it,
    naming the options that would fit."""
    plan = _plan(models, config, inputs, tokens, contexts, run)
    ests = [_estimate(_Plan([m], [r], contexts, plan.source), config) for m, r in zip(plan.models, plan.records)]
    need: Dict[str, int] = {}
    for e in ests:
        for dev, n in e.by_device().items():
            need[dev] = need.get(dev, 0) + n
    short = {}
    for dev, n in need.items():
        free = free_memory(dev) if dev != "meta" else None
        if free is not None and n > free:
            short[dev] = free
    if not short:
        return ests

    def fits(cfg: CacheConfig) -> Optional[int]:
        try:
            e = _estimate(plan, cfg)
        except (KeyError, ValueError, TypeError, RuntimeError):
            return None
        per = e.by_device()
        return e.total_bytes if all(per.get(d, 0) <= f for d, f in short.items()) else None

    fitting: List[str] = []
    singles, combos = _options(plan, config)
    for groups in (singles, combos):
        for group in groups:
            for label, cfg in group:
                n = fits(cfg)
                if n is not None:
                    fitting.append(f"{label} ({_size(n)})")
                    break
        if fitting:
            break
    where = ", ".join(f"{need[d]} bytes on {d} where {f} are free" for d, f in short.items())
    total = sum(e.total_bytes for e in ests)
    msg = (f"foca cache: the cache would hold {_size(total)} (states {_size(sum(e.state_bytes for e in ests))} + "
           f"forecast buffers {_size(sum(e.buffer_bytes for e in ests))}; {where}), before the model's own "
           f"activations. " + (f"Options that fit: {'; '.join(fitting)}; or fewer targets (CacheConfig.targets)."
                               if fitting else "No cheaper state_dtype, granularity='block' or compute_blocks fits; "
                               "cache fewer targets (CacheConfig.targets) or use a smaller batch/resolution."))
    if strict:
        raise MemoryError(msg)
    warnings.warn(msg, FocaCacheWarning, stacklevel=3)
    return ests
