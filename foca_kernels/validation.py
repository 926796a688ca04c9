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


def check_out_grad_free(out: torch.Tensor) -> None:
    """Forecasts carry no autograd history (caching is for inference): an ``out`` that
    requires grad could not be written in place (a leaf) or would pretend to have a graph."""
    if out.requires_grad:
        raise ValueError(
            "out requires grad; forecasts carry no autograd history (caching is for inference): "
            "pass a tensor that does not require grad (e.g. torch.empty_like(x) under torch.no_grad())"
        )


def check_writable(buf: CacheState, out=None) -> None:
    """Inference tensors cannot be written outside torch.inference_mode; refuse before the
    launch, which would otherwise fail after writing the state's slots."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    if buf.slots.is_inference():
        raise RuntimeError(
            "this state was allocated under torch.inference_mode and cannot be updated outside it; "
            "call update_/forecast_ inside inference_mode, or allocate the state outside it"
        )
    if out is not None and out.is_inference():
        raise RuntimeError(
            "out is an inference tensor (made under torch.inference_mode) and cannot be written outside "
            "it; pass a tensor made outside inference_mode"
        )


def check_finite_values(x: torch.Tensor, what: str) -> None:
    """Opt-in (``check_finite=True``): one reduction and one host sync per call."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{what} has {bad} non-finite value(s) (nan/inf) of {x.numel()}; refused so that they do not "
            "enter the cache history (see 'Non-finite features' in docs/method.md)"
        )


def next_time(buf: CacheState, h: float) -> float:
    """Time of the step ``h`` after the latest one (0 for the first step of a history)."""
    if buf.t is None:
        return 0.0
    t_new = buf.t + h
    if not t_new > buf.t:
        raise ValueError(
            f"step size h={h!r} is too small to advance the clock from t={buf.t!r} (t + h == t in float64); "
            "pass steps on a coarser scale (only ratios of steps matter) or reset the state"
        )
    return t_new


MAX_STEP_RATIO = 2.0 ** 20
"""Largest accepted ratio of a step ``h`` to the time span the state's history covers (from its
oldest stored value to its latest step). Every method's coefficients are polynomials of degree
at most 3 in ``h`` over the spacing of its stored steps (TaylorSeer-3: a cubic through four
values), so at this ratio they reach 2**60: the float32 rounding of the stored values, amplified
as much, leaves no correct digit in the forecast. Beyond it the state's float64 clock would also
stop resolving steps of the history's own size after such a step (a clock pushed to 1e30 by
one call cannot advance by 1.0 at all, so every later call on the old scale would be refused);
at 2**20 it still resolves 2**53 / 2**20 = 2**33 parts of one span."""


def check_step_ratio(buf: CacheState, h: float) -> None:
    """Refuse a step more than :data:`MAX_STEP_RATIO` times the span of the state's history
    (once it has one: a history of one time has no scale yet). Comparisons only (nan fails)."""
    if buf.t is None:
        return
    oldest = buf.t
    for t in buf._time_of.values():  # a plain loop: torch.compile traces it (fullgraph)
        if t is not None and t < oldest:
            oldest = t
    span = buf.t - oldest
    if span > 0.0 and not h <= MAX_STEP_RATIO * span:
        raise ValueError(
            f"step size h={h!r} is {h / span:.3g} times the span of the state's history ({span!r}); steps more "
            "than 2**20 times it are refused (the forecast coefficients are polynomials of degree up to 3 in h "
            "over the step spacing, and the clock could not resolve the earlier steps after it): pass steps on "
            "the scale of the earlier ones, or call reset() to start a new history"
        )


FP32_MAX = 3.4028234663852886e38  # both backends apply coefficients as float32


def check_coefficients(coef, h: float) -> None:
    """Coefficients grow like 1/gap and like h**order: a step too small or too large gives one
    that float32 cannot hold, which Triton would turn into inf silently and the PyTorch path
    would refuse midway. Refuse it before any write. Comparisons only (nan fails them)."""
    for c in coef:
        if not -FP32_MAX <= c <= FP32_MAX:
            raise ValueError(
                f"step size h={h!r} gives a forecast coefficient {c!r} that float32 cannot hold; "
                "the steps are too uneven (or too small/large) for this method: pass steps on a scale "
                "closer to 1 (only ratios of steps matter)"
            )


def check_method_options(options: dict) -> dict:
    """Option values the methods would take by accident: ``order=True`` is an int to Python
    (TaylorSeer would run order 1); bool is refused wherever an int is meant."""
    order = options.get("order")
    if isinstance(order, bool):
        raise TypeError(f"order must be an int (1, 2 or 3), got bool ({order!r})")
    return options
