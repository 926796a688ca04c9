"""Public operations on cache states: allocate, update_ (full step), forecast_ (skipped step)."""

from __future__ import annotations

from typing import Optional

import torch

from .backend import get_backend
from .methods import Method, make_method
from .ops import lincomb_, run_lincomb
from .state import CacheState, Launch, slot_stride
from .validation import check_no_alias, check_no_overlap, check_ready, check_state, check_step, check_tensor


def allocate(example: torch.Tensor, method="foca", *, dtype: Optional[torch.dtype] = None, **options) -> CacheState:
    """A state for caching tensors shaped like ``example`` with ``method``.

    ``dtype`` stores the state in another precision than the feature (e.g. bf16 for an fp32
    model); features and outputs must still have ``example``'s dtype. ``options`` go to the
    method: ``anchor=`` for FoCa, ``order=`` for TaylorSeer.
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    m = make_method(method, **options)
    return CacheState(m, example.shape, dtype or example.dtype, example.device, io_dtype=example.dtype)


def state_nbytes(example, method="foca", *, dtype: Optional[torch.dtype] = None, **options) -> int:
    """Bytes a state for ``example`` (a tensor, or a shape with ``dtype``) would hold."""
    if isinstance(example, CacheState):
        return example.nbytes
    m: Method = make_method(method, **options)
    if isinstance(example, torch.Tensor):
        shape, dtype = example.shape, dtype or example.dtype
    else:
        shape, dtype = torch.Size(example), dtype or torch.float32
    n = shape.numel()
    return m.n_slots * slot_stride(n) * torch.empty((), dtype=dtype).element_size()


def _run(buf: CacheState, launch: Launch, feature, out, backend) -> None:
    # The custom op is what torch.compile sees; eager calls skip its dispatcher.
    op = lincomb_ if torch.compiler.is_compiling() else run_lincomb
    op(
        buf.slots,
        feature,
        out,
        buf.numel,
        list(launch.reads),
        list(launch.writes),
        list(launch.coef),
        get_backend(buf.device, backend),
    )


def _next_time(buf: CacheState, h: float) -> float:
    return 0.0 if buf.t is None else buf.t + h


def update_(buf: CacheState, feature: torch.Tensor, h=1.0, *, backend: Optional[str] = None) -> CacheState:
    """A fully computed step: store ``feature`` (computed a step ``h`` after the previous
    step) and update the method's derivative/anchor state in the same pass."""
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, feature, "feature")
    check_no_alias(buf, feature, "feature")
    t_new = _next_time(buf, h)
    launch = buf.plan(buf.method.full(buf.context(t_new)), t_new)
    if launch.writes or launch.has_out:
        _run(buf, launch, feature.contiguous().view(-1), None, backend)
    buf.commit(launch, t_new, full=True)
    return buf


def forecast_(buf: CacheState, out: torch.Tensor, h=1.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """A skipped step, ``h`` after the previous step: write the forecast into ``out`` and
    advance the state (FoCa: predictor, derivative update and corrector in one pass)."""
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, out, "out")
    check_no_overlap(out, "out")
    check_no_alias(buf, out, "out")
    check_ready(buf)
    t_new = _next_time(buf, h)
    launch = buf.plan(buf.method.skip(buf.context(t_new)), t_new)
    if out.is_contiguous():
        _run(buf, launch, None, out.view(-1), backend)
    else:  # write contiguously, then scatter into the caller's strides
        tmp = torch.empty(buf.shape, dtype=out.dtype, device=out.device)
        _run(buf, launch, None, tmp.view(-1), backend)
        out.copy_(tmp)
    buf.commit(launch, t_new, full=False)
    return out


def forecast(buf: CacheState, h=1.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """Like :func:`forecast_`, into a newly allocated contiguous tensor."""
    check_state(buf)
    out = torch.empty(buf.shape, dtype=buf.io_dtype, device=buf.device)
    return forecast_(buf, out, h, backend=backend)
