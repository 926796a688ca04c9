"""Input checks for the public operations. Each failure names the problem; all of them run
before anything is written, so a refused call leaves the state as it was."""

from __future__ import annotations

import math
import numbers

import torch

from .ops.aliasing import overlaps
from .state import CacheState


def check_state(buf) -> CacheState:
    if not isinstance(buf, CacheState):
        raise TypeError(f"buf must be a foca_kernels CacheState (see foca_kernels.allocate), got {type(buf).__name__}")
    return buf


def check_step(h, name: str = "h") -> float:
    if isinstance(h, torch.Tensor):
        if h.numel() != 1:
            raise ValueError(f"step size {name} must be a scalar, got a tensor of shape {tuple(h.shape)}")
        h = h.item()
    if isinstance(h, bool) or not isinstance(h, numbers.Real):
        raise TypeError(f"step size {name} must be a real number, got {type(h).__name__}")
    h = float(h)
    # Comparisons only (nan fails both): under torch.compile a step size that changed between
    # calls is a SymFloat, which math.isfinite cannot take without a graph break.
    if not 0.0 < h < math.inf:
        raise ValueError(f"step size {name} must be finite and > 0, got {h!r}")
    return h


def check_tensor(buf: CacheState, x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != buf.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but the state caches shape {tuple(buf.shape)}")
    if x.dtype != buf.io_dtype:
        raise TypeError(f"{what} has dtype {x.dtype} but the state expects {buf.io_dtype}")
    if x.device != buf.device:
        raise ValueError(f"{what} is on {x.device} but the state lives on {buf.device}")


def check_no_overlap(x: torch.Tensor, what: str) -> None:
    """Refuse a tensor whose elements share memory (expanded, or as_strided over itself): it
    cannot hold a result, and finding out only when writing it would be after the launch has
    rewritten a state slot. Conservative: dims sorted by stride must each step past the span
    of the smaller ones, so an exotic interleaved layout without real overlap may be refused too."""
    span = 1
    for stride, size in sorted((abs(st), sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < span:
            raise ValueError(
                f"{what} has overlapping elements (shape {tuple(x.shape)}, strides {tuple(x.stride())}, "
                f"e.g. an expanded tensor); pass a tensor with one memory location per element"
            )
        span += stride * (size - 1)


def check_no_alias(buf: CacheState, x: torch.Tensor, what: str) -> None:
    if torch.compiler.is_compiling():
        return  # data pointers are not traceable; the op itself checks again at run time
    if overlaps(x, buf.slots):
        raise ValueError(f"{what} aliases the state's own storage; pass a separate tensor")


def check_ready(buf: CacheState) -> None:
    if not buf.ready:
        m = buf.method
        raise RuntimeError(
            f"{m.describe()} needs {m.min_full} fully computed step(s) (update_) before the first "
            f"forecast_, this state has seen {buf.n_full}"
        )
