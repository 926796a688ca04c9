"""Cached streams: one :class:`~foca_kernels.CacheState` per output tensor of one call of one
cached module in one cache context, plus the preallocated tensor forecasts are written into.

All arithmetic on cached values goes through ``foca_kernels.api.update_`` / ``forecast_``
(looked up on the module at call time). The only other tensor work here is forming a
residual (output - input) on full steps and adding the input back on skipped steps.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from .. import api as _api
from ..state import STORAGE_DTYPES, CacheState
from .rfe import relational_input
from .targets import Site


class Stream:
    """One cached output tensor."""

    __slots__ = ("state", "buffer", "forecast_target")

    def __init__(self):
        self.state: Optional[CacheState] = None
        self.buffer: Optional[torch.Tensor] = None
        self.forecast_target: Optional[torch.Tensor] = None  # where the grouped forecast of this step went

    @property
    def state_bytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    @property
    def buffer_bytes(self) -> int:
        b = self.buffer
        return 0 if b is None else b.numel() * b.element_size()

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The stream's own tensor shaped like ``like`` (allocated on first use or on change)."""
        b = self.buffer
        if b is None or b.shape != like.shape or b.dtype != like.dtype or b.device != like.device:
            b = self.buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return b

    def prepare(self, feature: torch.Tensor, config, method, inp: Optional[torch.Tensor] = None) -> CacheState:
        """The state ``feature`` goes into (allocated on first use, or anew when its shape,
        dtype or device changed)."""
        st = self.state
        if st is None or st.shape != feature.shape or st.io_dtype != feature.dtype or st.device != feature.device or (
                inp is not None and (st.input_shape != inp.shape or st.inp.io_dtype != inp.dtype)):  # rfc: input too
            extra = {} if inp is None else {"input": inp}
            self.state = st = _api.allocate(feature, method, dtype=config.state_dtype, **extra)
        return st

    def update(self, feature: torch.Tensor, h: float, config, method, inp: Optional[torch.Tensor] = None,
               plans: Optional[dict] = None) -> None:
        st = self.prepare(feature, config, method, inp)
        if inp is not None:  # rfc (hooks/rfe.py)
            _api.update_(st, feature, h, backend=config.backend, input=inp)
        elif plans is None or torch.is_inference_mode_enabled() != st.slots.is_inference():
            _api.update_(st, feature, h, backend=config.backend)
        else:  # shape, dtype, device checked above; h > 0 by construction of tau
            _api.update_shared_(st, feature, h, plans, backend=config.backend)

    def forecast_buffer(self, config) -> torch.Tensor:
        """The tensor this stream's forecast is written into (kept across steps by default)."""
        st = self.state
        if config.reuse_output_buffers:
            b = self.buffer
            if b is None or b.shape != st.shape or b.dtype != st.io_dtype or b.device != st.device:
                b = self.buffer = torch.empty(st.shape, dtype=st.io_dtype, device=st.device)
            return b
        return torch.empty(st.shape, dtype=st.io_dtype, device=st.device)

    def forecast(self, h: float, config, inp: Optional[torch.Tensor] = None) -> torch.Tensor:
        if inp is not None:  # rfc (hooks/rfe.py)
            return _api.forecast_(self.state, self.forecast_buffer(config), h, backend=config.backend, input=inp)
        return _api.forecast_(self.state, self.forecast_buffer(config), h, backend=config.backend)


class _Const:
    """A non-tensor element of a module's output (e.g. None), returned as is on skipped steps."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def flatten(out) -> Tuple[Optional[List[torch.Tensor]], Any]:
    """(tensors, template) of a module output; (None, reason) if it cannot be cached."""
    if isinstance(out, torch.Tensor):
        items, container = [out], None
    elif type(out) in (tuple, list):
        items, container = list(out), type(out)
    else:
        return None, f"its output is a {type(out).__name__} (only tensors and tuples/lists of tensors are cached)"
    tensors, layout = [], []
    for x in items:
        if isinstance(x, torch.Tensor):
            if x.dtype not in STORAGE_DTYPES:
                return None, f"it returns a {x.dtype} tensor (cached dtypes: {STORAGE_DTYPES})"
            if x.numel() == 0:
                return None, "it returns an empty tensor"
            layout.append(len(tensors))
            tensors.append(x)
        else:
            layout.append(_Const(x))
    if not tensors:
        return None, "its output holds no tensor"
    return tensors, (container, tuple(layout))


def same_template(a, b) -> bool:
    if a is None or b is None or a[0] is not b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1]):
        if isinstance(x, _Const) != isinstance(y, _Const):
            return False
        if isinstance(x, _Const) and x.value is not y.value and x.value != y.value:
            return False
    return True


def rebuild(template, tensors: Sequence[torch.Tensor]):
    container, layout = template
    if container is None:
        return tensors[0]
    return container(x.value if isinstance(x, _Const) else tensors[x] for x in layout)


def input_signature(args, kwargs) -> tuple:
    """Shapes, dtypes and devices of a call's tensor arguments (one level into tuples/lists)."""
    sig = []
    for key, x in enumerate(args):
        _sig_add(sig, key, x)
    for key in sorted(kwargs):
        _sig_add(sig, key, kwargs[key])
    return tuple(sig)


def _sig_add(sig, key, x) -> None:
    if isinstance(x, torch.Tensor):
        sig.append((key, x.shape, x.dtype, x.device))
    elif isinstance(x, (tuple, list)):
        for j, y in enumerate(x):
            if isinstance(y, torch.Tensor):
                sig.append((key, j, y.shape, y.dtype, y.device))


class StreamGroup:
    """Everything cached for one call of one module in one context: a stream per output tensor."""

    def __init__(self, site: Site):
        self.site = site
        self.mode = site.mode
        self.signature: Optional[tuple] = None
        self.template = None
        self.streams: List[Stream] = []
        self.inputs: List[Optional[str]] = []  # residual: input name per stream (None: cache as is)
        self.last_tau: Optional[float] = None
        self.uncacheable: Optional[str] = None
        self.immediate = False  # full steps update the states at once, not in the call's grouped update

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def has_history(self) -> bool:
        return any(s.state is not None and s.state.n_steps > 0 for s in self.streams)

    @property
    def ready(self) -> bool:
        # (a plain loop: evaluated for every group at every skipped step)
        if self.uncacheable is not None or self.template is None or self.last_tau is None:
            return False
        for s in self.streams:
            st = s.state
            if st is None or st.n_full < st.method.min_full:
                return False
        return True

    def reset(self) -> None:
        """Forget the history, keep the allocations."""
        for s in self.streams:
            if s.state is not None:
                s.state.reset()
        self.last_tau = None

    def drop(self) -> None:
        """Forget everything, allocations included."""
        self.streams = []
        self.template = None
        self.inputs = []
        self.last_tau = None

    def states(self) -> List[CacheState]:
        return [s.state for s in self.streams if s.state is not None]

    def buffer_bytes(self) -> int:
        return sum(s.buffer_bytes for s in self.streams)

    # ---- inputs ------------------------------------------------------------------------
    def _arg(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self.site.params.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _resolve_inputs(self, out_items, args, kwargs) -> Optional[List[Optional[str]]]:
        """Input name per output tensor for a residual, or None if they cannot be matched."""
        spec = self.site.residual
        container, layout = self.template
        names: List[Optional[str]] = []
        if spec != "auto":
            spec = tuple(spec)
            if len(spec) != len(layout):
                return None
            for pos, x in enumerate(layout):
                if not isinstance(x, _Const):
                    names.append(spec[pos])
        else:
            named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            for k, i in self.site.params.items():
                if i < len(args) and isinstance(args[i], torch.Tensor):
                    named.setdefault(k, args[i])
            for t in out_items:
                cands = [k for k, v in named.items() if v.shape == t.shape and v.dtype == t.dtype]
                if len(cands) > 1 and "hidden_states" in cands:
                    cands = ["hidden_states"]
                if len(cands) != 1:
                    return None
                names.append(cands[0])
        for name, t in zip(names, out_items):
            if name is None:
                continue
            x = self._arg(name, args, kwargs)
            if not isinstance(x, torch.Tensor) or x.shape != t.shape or x.dtype != t.dtype:
                return None
        return names

    # ---- steps -------------------------------------------------------------------------
    def update(self, out, args, kwargs, tau: float, config, method, plans: Optional[dict] = None,
               pending=None) -> None:
        """A computed call: feed its output(s) to the states, or, given ``pending`` (a
        hooks.pending.PendingUpdates), record them for the model call's grouped update."""
        tensors, template = flatten(out)
        if tensors is None:
            self.uncacheable = template
            self.site.warn_once("uncacheable", f"not cached: {template}")
            return
        if config.check_finite and not all(bool(torch.isfinite(t).all()) for t in tensors):
            self.reset()  # forget the history rather than carry the value into later forecasts
            self.site.warn_once("nonfinite", "a computed output holds non-finite values (nan/inf); its cache was reset")
            return
        if not same_template(self.template, template):
            self.drop()
            self.template = template
            self.streams = [Stream() for _ in tensors]
            self.inputs = [None] * len(tensors)
            if self.mode == "residual":
                names = self._resolve_inputs(tensors, args, kwargs)
                if names is None:
                    self.site.warn_once(
                        "residual",
                        "cannot match its outputs to inputs of the same shape for a residual; "
                        "caching the output instead",
                    )
                    self.mode = "output"
                else:
                    self.inputs = names
        h = 1.0 if self.last_tau is None else tau - self.last_tau
        inp = relational_input(self, method, args, kwargs)  # rfc only, else None
        if inp is not None or self.immediate:
            pending = None
        for stream, t, name in zip(self.streams, tensors, self.inputs):
            if name is not None:
                x = self._arg(name, args, kwargs)
                with torch.no_grad():  # cache writes record no autograd history (out= refuses it anyway)
                    t = torch.sub(t, x, out=stream.scratch(t)) if config.reuse_output_buffers else t - x
            # the module's own output is recorded only when in-place changes to it can be seen
            # (inference tensors keep no version counter): else it is stored now
            if pending is not None and (name is not None or not t.is_inference()):
                stream.prepare(t, config, method)
                # (a residual is made without a graph; a module output is kept without its graph)
                pending.record(self, self.last_tau, stream, t if name is not None else t.detach(), h,
                               owned=name is not None)
            else:
                stream.update(t, h, config, method, inp, plans)
        self.last_tau = tau

    def observed(self, out, args, kwargs) -> Optional[List[torch.Tensor]]:
        """What a full step would feed the states from ``out`` (outputs, or residuals), without
        feeding them; None when ``out`` does not match the cached layout."""
        tensors, template = flatten(out)
        if tensors is None or not same_template(self.template, template):
            return None
        res = []
        for t, name in zip(tensors, self.inputs):
            if name is not None:
                t = t - self._arg(name, args, kwargs)
            res.append(t.detach())
        return res

    def forecast(self, args, kwargs, tau: float, config, written: list):
        """A skipped call: the forecast output(s), without running the module."""
        h = tau - self.last_tau
        inp = relational_input(self, self.streams[0].state.method, args, kwargs)  # rfc only, else None
        ys = [stream.forecast(h, config, inp) for stream in self.streams]
        self.last_tau = tau
        return self._output(ys, args, kwargs, written)

    def finish_forecast(self, args, kwargs):
        """A skipped call whose forecasts the context already wrote (ContextState.forecast_all;
        it also records where they live, for the controller's end-of-step check)."""
        return self._output([s.forecast_target for s in self.streams], args, kwargs, None)

    def _output(self, ys, args, kwargs, written: Optional[list]):
        for y, name in zip(ys, self.inputs):
            if name is not None:
                with torch.no_grad():  # a forecast carries no graph, even when its input has one
                    y.add_(self._arg(name, args, kwargs))
            if written is not None:
                written.append(y)
        return rebuild(self.template, ys)
