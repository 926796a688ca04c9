"""Public operations on cache states: allocate, update_ (full step), forecast_ (skipped step)."""

from __future__ import annotations

from typing import Optional

import torch

from .backend import get_backend
from .methods import Method
from .fp8 import Fp8State, fp8_nbytes, is_fp8
from .registry import make_method
from .rfc import RFC, RFCState, forecast_rfc_, update_rfc_
from .state import CacheState, slot_stride
from .step import forecast_state_, run_full, update_state_
from .validation import check_finite_values, check_method_options, check_state


def allocate(example: torch.Tensor, method="foca", *, dtype: Optional[torch.dtype] = None,
             input: Optional[torch.Tensor] = None, **options) -> CacheState:
    """A state for caching tensors shaped like ``example`` with ``method``.

    ``dtype`` stores the state in another precision than the feature (e.g. bf16 for an fp32
    model); features and outputs must still have ``example``'s dtype. ``torch.float8_e4m3fn``
    gives an :class:`foca_kernels.fp8.Fp8State` (closed-form methods only: a 16-bit anchor and
    e4m3 increments with per-token scales, docs/method.md "fp8 state"). ``options`` go to the
    method: ``anchor=`` for FoCa, ``order=`` for TaylorSeer; ``method="rfc"``: ``base=``,
    ``norm=``, ``estimate=``, ``clip=`` and the base's options, and ``input=`` an example of
    the module's input (the state then holds both histories: :class:`foca_kernels.rfc.RFCState`).
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    m = make_method(method, **check_method_options(options))
    if is_fp8(dtype):  # anchor + e4m3 increments (fp8.py); refuses methods it does not apply to
        if input is not None and not isinstance(m, RFC):
            raise TypeError(f"input= is an option of method 'rfc', not of {m.describe()}")
        return Fp8State(m, example.shape, example.device, example.dtype)
    if isinstance(m, RFC):
        if not isinstance(input, torch.Tensor):
            raise TypeError("method 'rfc' needs input=, an example of the module's input (its history is stored too)")
        return RFCState(m, example.shape, input.shape, dtype or example.dtype, example.device, example.dtype,
                        input.dtype)
    if input is not None:
        raise TypeError(f"input= is an option of method 'rfc', not of {m.describe()}")
    return CacheState(m, example.shape, dtype or example.dtype, example.device, io_dtype=example.dtype)


def state_nbytes(example, method="foca", *, dtype: Optional[torch.dtype] = None, **options) -> int:
    """Bytes a state for ``example`` (a tensor, or a shape with ``dtype``) would hold."""
    if isinstance(example, (CacheState, RFCState)):
        return example.nbytes
    inp = options.pop("input", None)
    m: Method = make_method(method, **check_method_options(options))
    if is_fp8(dtype):  # the anchor is 2 bytes per element whatever the feature's dtype
        shape = example.shape if isinstance(example, torch.Tensor) else torch.Size(example)
        return fp8_nbytes(m, shape, example.dtype if isinstance(example, torch.Tensor) else torch.float32)
    if isinstance(m, RFC):  # output history + input history
        if inp is None:
            raise TypeError("method 'rfc' needs input= (the module's input, a tensor or a shape)")
        n_in = (inp.shape if isinstance(inp, torch.Tensor) else torch.Size(inp)).numel()
        dt = dtype or (example.dtype if isinstance(example, torch.Tensor) else torch.float32)
        esize = torch.empty((), dtype=dt).element_size()
        return state_nbytes(example, m.base, dtype=dt) + m.n_slots * slot_stride(n_in) * esize
    if isinstance(example, torch.Tensor):
        shape, dtype = example.shape, dtype or example.dtype
    else:
        shape, dtype = torch.Size(example), dtype or torch.float32
    n = shape.numel()
    return m.n_slots * slot_stride(n) * torch.empty((), dtype=dtype).element_size()


def update_(
    buf: CacheState, feature: torch.Tensor, h=1.0, *, backend: Optional[str] = None, check_finite: bool = False,
    input: Optional[torch.Tensor] = None,
) -> CacheState:
    """A fully computed step: store ``feature`` (computed a step ``h`` after the previous
    step) and update the method's derivative/anchor state in the same pass.

    ``check_finite=True`` refuses a feature holding nan/inf (one reduction and host sync);
    by default non-finite values are stored like any other (see docs/method.md).
    ``input``: the module's input at this step (method "rfc" only, required there)."""
    if isinstance(buf, RFCState):
        if check_finite:
            check_finite_values(feature, "feature")
        update_rfc_(buf, feature, input, h, backend)
        return buf
    if input is not None:
        raise TypeError("input= is for states of method 'rfc'")
    return update_state_(buf, feature, h, backend, check_finite)


def update_shared_(buf: CacheState, feature: torch.Tensor, h: float, plans: dict, *,
                   backend: Optional[str] = None) -> None:
    """:func:`update_` for callers that already guarantee what it checks per call (the hooks:
    ``feature`` is the module's fresh output, of the state's shape/dtype/device, ``h`` > 0).
    States last committed by the same launch share a history, so their full step has the same
    plan: ``plans`` (one dict per step, shared by those states) keeps it, and only the first
    state of a step plans and checks coefficients. Anything else goes through update_."""
    prev, t_before = buf._launch, buf.t
    hit = plans.get((id(prev), h)) if prev is not None else None
    if hit is None or hit[0] is not prev or hit[1] != t_before:
        update_(buf, feature, h, backend=backend)
        if prev is not None:
            plans[(id(prev), h)] = (prev, t_before, buf._launch)
        return
    run_full(buf, hit[2], feature, get_backend(buf.device, backend))
    buf.commit(hit[2], t_before + h, full=True)


def forecast_(buf: CacheState, out: torch.Tensor, h=1.0, *, backend: Optional[str] = None,
              input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A skipped step, ``h`` after the previous step: write the forecast into ``out`` and
    advance the state (FoCa: predictor, derivative update and corrector in one pass).
    ``input``: the module's input at this step (method "rfc" only, required there)."""
    if isinstance(buf, RFCState):
        return forecast_rfc_(buf, out, input, h, backend)
    if input is not None:
        raise TypeError("input= is for states of method 'rfc'")
    return forecast_state_(buf, out, h, backend)


def forecast(buf: CacheState, h=1.0, *, backend: Optional[str] = None,
             input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Like :func:`forecast_`, into a newly allocated contiguous tensor."""
    if not isinstance(buf, RFCState):
        check_state(buf)
    out = torch.empty(buf.shape, dtype=buf.io_dtype, device=buf.device)
    return forecast_(buf, out, h, backend=backend, input=input)
