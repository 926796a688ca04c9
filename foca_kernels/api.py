"""Public operations on cache states: allocate, update_ (full step), forecast_ (skipped step)."""

from __future__ import annotations

from typing import Optional

import torch

from .backend import get_backend
import contextlib

from .methods import RFC, Method, RawHistory, make_method
from .ops import lincomb_, run_lincomb
from .ops.dispatch import run_lincomb_checked
from .ops.custom_op import fit_ as fit_op
from .ops.fit import flatten as flatten_fit, run_fit
from .rfc import RFCState, forecast_rfc_, update_rfc_

_NO_CONTEXT = contextlib.nullcontext()
from .state import CacheState, Launch, slot_stride
from .validation import (
    check_coefficients, check_finite_values, check_method_options, check_no_alias, check_no_overlap, check_out_grad_free, check_ready,
    check_state, check_step, check_tensor, check_writable, next_time,
)


def allocate(example: torch.Tensor, method="foca", *, dtype: Optional[torch.dtype] = None,
             input: Optional[torch.Tensor] = None, **options) -> CacheState:
    """A state for caching tensors shaped like ``example`` with ``method``.

    ``dtype`` stores the state in another precision than the feature (e.g. bf16 for an fp32
    model); features and outputs must still have ``example``'s dtype. ``options`` go to the
    method: ``anchor=`` for FoCa, ``order=`` for TaylorSeer; ``method="rfc"``: ``base=``,
    ``norm=``, ``estimate=``, ``clip=`` and the base's options, and ``input=`` an example of
    the module's input (the state then holds both histories: :class:`foca_kernels.rfc.RFCState`).
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    m = make_method(method, **check_method_options(options))
    if isinstance(m, RFC):
        if not isinstance(input, torch.Tensor):
            raise TypeError("method 'rfc' needs input=, an example of the module's input (its history is stored too)")
        return RFCState(m, example.shape, input.shape, dtype or example.dtype, example.device, example.dtype, input.dtype)
    if input is not None:
        raise TypeError(f"input= is an option of method 'rfc', not of {m.describe()}")
    return CacheState(m, example.shape, dtype or example.dtype, example.device, io_dtype=example.dtype)


def state_nbytes(example, method="foca", *, dtype: Optional[torch.dtype] = None, **options) -> int:
    """Bytes a state for ``example`` (a tensor, or a shape with ``dtype``) would hold."""
    if isinstance(example, (CacheState, RFCState)):
        return example.nbytes
    inp = options.pop("input", None)
    m: Method = make_method(method, **check_method_options(options))
    if isinstance(m, RFC):  # output history + input history
        if inp is None:
            raise TypeError("method 'rfc' needs input= (the module's input, a tensor or a shape)")
        n_in = (inp.shape if isinstance(inp, torch.Tensor) else torch.Size(inp)).numel()
        dt = dtype or (example.dtype if isinstance(example, torch.Tensor) else torch.float32)
        return state_nbytes(example, m.base, dtype=dt) + m.n_slots * slot_stride(n_in) * torch.empty((), dtype=dt).element_size()
    if isinstance(example, torch.Tensor):
        shape, dtype = example.shape, dtype or example.dtype
    else:
        shape, dtype = torch.Size(example), dtype or torch.float32
    n = shape.numel()
    return m.n_slots * slot_stride(n) * torch.empty((), dtype=dtype).element_size()


def _plan(buf: CacheState, full: bool, t_new: float, h: float) -> Launch:
    """The launch of one step, refused (ValueError naming h) if its coefficients do not fit
    float32: nothing has been written yet."""
    if full and isinstance(buf.method, RawHistory):
        return buf.plan_rotation(t_new)  # a copy into one slot: no coefficient to check
    rule = buf.method.full if full else buf.method.skip
    try:
        launch = buf.plan(rule(buf.context(t_new)), t_new)
    except (ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"step size h={h!r} gives a forecast coefficient that cannot be computed ({e})") from None
    check_coefficients(launch.coef, h)
    if launch.fit is not None:
        check_coefficients(launch.fit.coef, h)
    return launch


def copy_row(buf: CacheState, slot: int, feature: torch.Tensor) -> None:
    """One launch that copies ``feature`` into a slot (rounding once to the state's dtype)."""
    buf.row(slot).copy_(feature.detach())


def _run(buf: CacheState, launch: Launch, feature, out, backend: str) -> None:
    # The custom op is what torch.compile sees; eager calls skip its dispatcher. No autograd
    # history is ever recorded: the cache is for inference, and a graph kept in the slots
    # would grow with every step (and out= ops refuse inputs that require grad).
    if torch.compiler.is_compiling():
        op = lincomb_
    elif backend == "torch" and launch.coef == (1.0,) and launch.has_feature and not launch.has_out:
        # a closed form's full step: the feature copied into one slot (what lincomb_torch would
        # do, minus its layers of Python: this runs for every stream at every full step)
        copy_row(buf, launch.writes[0], feature)
        return
    else:  # eager: the caller has checked aliasing already (check_no_alias / StateGroup)
        op = run_lincomb_checked
    with torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT:
        op(
            buf.slots,
            None if feature is None else feature.detach(),
            out,
            buf.numel,
            list(launch.reads),
            list(launch.writes),
            list(launch.coef),
            backend,
        )


def _run_full(buf: CacheState, launch: Launch, feature: torch.Tensor, backend: str) -> None:
    """A full step's launch; a refitted role first, while the slots still hold what it reads."""
    flat = feature.contiguous().view(-1)
    if launch.fit is not None:
        if torch.compiler.is_compiling():  # traced: the cache wrapper is not (Dynamo warns)
            fit_op(buf.slots, buf.numel, flat.detach(), launch.fit.slot, *flatten_fit.__wrapped__(launch.fit), backend)
        else:
            run_fit(buf.slots, buf.numel, flat.detach(), launch.fit.slot, *flatten_fit(launch.fit), backend)
    if launch.writes or launch.has_out:
        _run(buf, launch, flat, None, backend)


def _run_into(buf: CacheState, launch: Launch, out: torch.Tensor, backend: str) -> None:
    """A skipped step's launch into ``out``, whatever its strides."""
    if out.is_contiguous():
        _run(buf, launch, None, out.view(-1), backend)
    else:  # write contiguously, then scatter into the caller's strides
        tmp = torch.empty(buf.shape, dtype=out.dtype, device=out.device)
        _run(buf, launch, None, tmp.view(-1), backend)
        out.copy_(tmp)


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
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, feature, "feature")
    check_no_alias(buf, feature, "feature")
    check_writable(buf)
    if check_finite:
        check_finite_values(feature, "feature")
    t_new = next_time(buf, h)
    launch = _plan(buf, True, t_new, h)
    backend = get_backend(buf.device, backend)
    _run_full(buf, launch, feature, backend)
    buf.commit(launch, t_new, full=True)
    return buf


def update_shared_(buf: CacheState, feature: torch.Tensor, h: float, plans: dict, *, backend: Optional[str] = None) -> None:
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
    _run_full(buf, hit[2], feature, get_backend(buf.device, backend))
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
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, out, "out")
    check_no_overlap(out, "out")
    check_no_alias(buf, out, "out")
    check_out_grad_free(out)
    check_writable(buf, out)
    check_ready(buf)
    t_new = next_time(buf, h)
    launch = _plan(buf, False, t_new, h)
    backend = get_backend(buf.device, backend)
    _run_into(buf, launch, out, backend)
    buf.commit(launch, t_new, full=False)
    return out


def forecast(buf: CacheState, h=1.0, *, backend: Optional[str] = None,
             input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Like :func:`forecast_`, into a newly allocated contiguous tensor."""
    if not isinstance(buf, RFCState):
        check_state(buf)
    out = torch.empty(buf.shape, dtype=buf.io_dtype, device=buf.device)
    return forecast_(buf, out, h, backend=backend, input=input)
