"""RFE (relational feature estimation, RFC arXiv 2602.19506) on cache states.

An :class:`RFCState` keeps two closed-form histories over the same step times in ONE
allocation: the module's output at the last computed steps (``Y0, Y1, ..``) and its input
at the same steps (``U0, U1, ..``). A full step stores both; a skipped step, given the
module's input ``X`` (free: the layers before it ran or were forecast), writes

    Y^  = sum_j c_j Y_j                      (the base method's forecast, fused kernel)
    X^  = sum_j c_j U_j                      (the same coefficients on the input history)
    s   = min(|X - U0| / |X^ - U0|, clip)    (estimate "ratio"; per sample or per token; clip 1)
    out = Y0 + s (Y^ - Y0)

(estimate "gain": s = min(g |X - U0| / |Y^ - Y0|, clip), g = |Y0 - Y1| / |U0 - U1|). The
scale is computed on the device as a tensor and fed to the combination: nothing is read on
the host. This is the per-module path: RFC skipped steps do not go through the grouped
one-launch path (docs/benchmarks.md, "RFE").
"""

from __future__ import annotations

from typing import Optional

import torch

from ..state import CacheState, slot_stride
from ..step import forecast_state_, update_state_
from .method import RFC

TINY = 1e-30  # floor of a norm in a denominator (fp32)


class RFCState:
    """Output and input histories of one cached stream for RFE, in one allocation."""

    def __init__(self, method: RFC, shape, input_shape, dtype: torch.dtype, device, io_dtype: torch.dtype,
                 input_dtype: torch.dtype):
        if not isinstance(method, RFC):
            raise TypeError(f"RFCState needs an RFC method, got {type(method).__name__}")
        shape, input_shape = torch.Size(shape), torch.Size(input_shape)
        if len(shape) == 0 or len(input_shape) == 0:
            raise ValueError("rfc caches tensors with at least one dimension")
        if method.norm == "token" and shape[:-1] != input_shape[:-1]:
            raise ValueError(
                f"rfc norm='token' needs the output and the input to have the same tokens (all dimensions but the "
                f"last): output {tuple(shape)}, input {tuple(input_shape)}; use norm='sample' or another input"
            )
        if method.norm == "sample" and shape[0] != input_shape[0]:
            raise ValueError(f"rfc norm='sample' needs the same batch size: output {tuple(shape)}, "
                             f"input {tuple(input_shape)}")
        m = method.n_slots
        so, si = slot_stride(shape.numel()), slot_stride(input_shape.numel())
        # One allocation: m output slots, then m input slots.
        self.storage = torch.zeros(m * (so + si), dtype=dtype, device=device)
        dev = self.storage.device
        self.out = CacheState(method, shape, dtype, dev, io_dtype, slots=self.storage[: m * so].view(m, so))
        self.inp = CacheState(method, input_shape, dtype, dev, input_dtype, slots=self.storage[m * so:].view(m, si))
        self.method = method
        self._scratch: Optional[torch.Tensor] = None  # X^ (input-shaped; not history)

    # what the hooks and the api read from a state
    @property
    def shape(self) -> torch.Size:
        return self.out.shape

    @property
    def input_shape(self) -> torch.Size:
        return self.inp.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.out.dtype

    @property
    def io_dtype(self) -> torch.dtype:
        return self.out.io_dtype

    @property
    def device(self) -> torch.device:
        return self.out.device

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @property
    def n_full(self) -> int:
        return self.out.n_full

    @property
    def n_steps(self) -> int:
        return self.out.n_steps

    @property
    def n_skip(self) -> int:
        return self.out.n_skip

    @property
    def t(self):
        return self.out.t

    @property
    def ready(self) -> bool:
        return self.out.ready

    def reset(self) -> None:
        self.out.reset()
        self.inp.reset()

    def __repr__(self) -> str:
        return (f"RFCState({self.method.describe()}, shape={tuple(self.shape)}, input_shape={tuple(self.input_shape)}, "
                f"dtype={self.dtype}, n_full={self.n_full}, nbytes={self.nbytes})")

    def scratch(self) -> torch.Tensor:
        s = self._scratch
        if s is None:
            s = self._scratch = torch.empty(self.inp.shape, dtype=self.inp.io_dtype, device=self.device)
        return s


def check_input(st: RFCState, x, what: str = "input") -> torch.Tensor:
    if x is None:
        raise ValueError(f"method 'rfc' needs the module's {what} at every step (pass input=...)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != st.inp.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but the state's input history has shape "
                         f"{tuple(st.inp.shape)} (a new shape needs a new state, or reset)")
    if x.dtype != st.inp.io_dtype:
        raise TypeError(f"{what} has dtype {x.dtype} but the state expects {st.inp.io_dtype}")
    if x.device != st.device:
        raise ValueError(f"{what} is on {x.device} but the state lives on {st.device}")
    return x


def _norm(t: torch.Tensor, mode: str, sharded: bool = False) -> torch.Tensor:
    """fp32 L2 norm per token (last dimension) or per sample (all dimensions but the first),
    shaped to broadcast against the output. ``sharded``: the tokens of each sample are split
    across the ranks of the default process group, so a per-sample norm sums the squares of
    every rank's share (one all-reduce of B floats, on the device: no host sync)."""
    if mode == "token":
        return torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=torch.float32)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        ss = t.reshape(t.shape[0] if t.dim() > 1 else 1, -1).to(torch.float32).square().sum(dim=1)
        torch.distributed.all_reduce(ss)
        return ss.sqrt().reshape((-1,) + (1,) * (t.dim() - 1)) if t.dim() > 1 else ss.sqrt().reshape(1)
    if t.dim() == 1:
        return torch.linalg.vector_norm(t, dtype=torch.float32).reshape(1)
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float32).reshape((-1,) + (1,) * (t.dim() - 1))


def scale(st: RFCState, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """RFE's scale factor as a device tensor (per token or per sample), after the base
    forecast ``y_hat`` was written and the input state was advanced by the same step."""
    m = st.method
    u0 = st.inp.role(m.latest)
    with torch.no_grad():
        d = st.scratch()
        n_x = _norm(torch.sub(x, u0), m.norm, m.sharded)
        if m.estimate == "ratio":
            d.sub_(u0)  # X^ - U0 (scratch held X^)
            s = n_x / _norm(d, m.norm, m.sharded).clamp_min(TINY)
        else:
            y0, y1 = st.out.role(m.latest), st.out.role(m.previous)
            u1 = st.inp.role(m.previous)
            g = (_norm(torch.sub(y0, y1), m.norm, m.sharded)
                 / _norm(torch.sub(u0, u1), m.norm, m.sharded).clamp_min(TINY))
            s = g * n_x / _norm(torch.sub(y_hat, y0), m.norm, m.sharded).clamp_min(TINY)
        return s.clamp_(max=m.clip)


def update_rfc_(st: RFCState, feature: torch.Tensor, x: torch.Tensor, h: float, backend: Optional[str]) -> None:
    """A full step: output and input stored in one step each (refused before any write if
    the input does not fit)."""
    check_input(st, x)
    update_state_(st.out, feature, h, backend)
    update_state_(st.inp, x, h, backend)


def forecast_rfc_(st: RFCState, out: torch.Tensor, x: torch.Tensor, h: float, backend: Optional[str]) -> torch.Tensor:
    """A skipped step: ``out`` <- RFE forecast from the module's input ``x``."""
    check_input(st, x)
    forecast_state_(st.out, out, h, backend)  # Y^ (checks out, readiness, h)
    forecast_state_(st.inp, st.scratch(), h, backend)  # X^, same coefficients
    s = scale(st, x, out)
    y0 = st.out.role(st.method.latest)
    with torch.no_grad():
        out.sub_(y0)
        torch.addcmul(y0, out, s, out=out)  # Y0 + s (Y^ - Y0)
    return out


__all__ = ["RFCState", "check_input", "forecast_rfc_", "scale", "update_rfc_"]
