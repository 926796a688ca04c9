"""One step of one cache state: plan the launch, run it, commit it.

The machinery under :func:`foca_kernels.update_` / :func:`foca_kernels.forecast_` for a plain
:class:`~foca_kernels.state.CacheState`, shared by the public API (api.py), RFE's two
histories (rfc/state.py) and the grouped paths (group.py, full_group.py). It imports nothing above
it: the public functions dispatch here, never the other way round.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .backend import get_backend
from .fp8 import Fp8State, run_one as run_fp8
from .methods import RawHistory
from .ops import lincomb_
from .ops.custom_op import fit_ as fit_op
from .ops.dispatch import run_lincomb_checked
from .ops.fit import flatten as flatten_fit, run_fit
from .state import CacheState, Launch
from .validation import (
    check_coefficients, check_finite_values, check_no_alias, check_no_overlap, check_out_grad_free, check_ready,
    check_state, check_step, check_step_ratio, check_tensor, check_writable, next_time,
)

_NO_CONTEXT = contextlib.nullcontext()


def plan_step(buf: CacheState, full: bool, t_new: float, h: float) -> Launch:
    """The launch of one step, refused (ValueError naming h) if its coefficients do not fit
    float32 or h is more than MAX_STEP_RATIO times the history's span (validation.py): nothing
    has been written yet."""
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
    check_step_ratio(buf, h)  # after the coefficients: an overflowing one is named first
    return launch


def copy_row(buf: CacheState, slot: int, feature: torch.Tensor) -> None:
    """One launch that copies ``feature`` into a slot (rounding once to the state's dtype)."""
    buf.row(slot).copy_(feature.detach())


def run(buf: CacheState, launch: Launch, feature, out, backend: str) -> None:
    # The custom op is what torch.compile sees; eager calls skip its dispatcher. No autograd
    # history is ever recorded: the cache is for inference, and a graph kept in the slots
    # would grow with every step (and out= ops refuse inputs that require grad).
    if isinstance(buf, Fp8State):  # anchor + e4m3 increments: its own kernels (fp8.py)
        run_fp8(buf, launch, feature, out, backend)
        return
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


def run_full(buf: CacheState, launch: Launch, feature: torch.Tensor, backend: str) -> None:
    """A full step's launch; a refitted role first, while the slots still hold what it reads."""
    flat = feature.contiguous().view(-1)
    if launch.fit is not None:
        if torch.compiler.is_compiling():  # traced: the cache wrapper is not (Dynamo warns)
            fit_op(buf.slots, buf.numel, flat.detach(), launch.fit.slot, *flatten_fit.__wrapped__(launch.fit), backend)
        else:
            run_fit(buf.slots, buf.numel, flat.detach(), launch.fit.slot, *flatten_fit(launch.fit), backend)
    if launch.writes or launch.has_out:
        run(buf, launch, flat, None, backend)


def run_into(buf: CacheState, launch: Launch, out: torch.Tensor, backend: str) -> None:
    """A skipped step's launch into ``out``, whatever its strides."""
    if out.is_contiguous():
        run(buf, launch, None, out.view(-1), backend)
    else:  # write contiguously, then scatter into the caller's strides
        tmp = torch.empty(buf.shape, dtype=out.dtype, device=out.device)
        run(buf, launch, None, tmp.view(-1), backend)
        out.copy_(tmp)


def update_state_(buf: CacheState, feature: torch.Tensor, h=1.0, backend: Optional[str] = None,
                  check_finite: bool = False) -> CacheState:
    """:func:`foca_kernels.update_` on a plain state: every check, then one full step."""
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, feature, "feature")
    check_no_alias(buf, feature, "feature")
    check_writable(buf)
    if check_finite:
        check_finite_values(feature, "feature")
    t_new = next_time(buf, h)
    launch = plan_step(buf, True, t_new, h)
    backend = get_backend(buf.device, backend)
    run_full(buf, launch, feature, backend)
    buf.commit(launch, t_new, full=True)
    return buf


def forecast_state_(buf: CacheState, out: torch.Tensor, h=1.0, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`foca_kernels.forecast_` on a plain state: every check, then one skipped step."""
    check_state(buf)
    h = check_step(h)
    check_tensor(buf, out, "out")
    check_no_overlap(out, "out")
    check_no_alias(buf, out, "out")
    check_out_grad_free(out)
    check_writable(buf, out)
    check_ready(buf)
    t_new = next_time(buf, h)
    launch = plan_step(buf, False, t_new, h)
    backend = get_backend(buf.device, backend)
    run_into(buf, launch, out, backend)
    buf.commit(launch, t_new, full=False)
    return out


__all__ = ["copy_row", "forecast_state_", "plan_step", "run", "run_full", "run_into", "update_state_"]
