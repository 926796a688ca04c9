"""The one data-dependent update: a slope refitted by least squares, on the device.

:func:`run_fit` overwrites slot ``slot`` with phi U + theta V, where (phi, theta) minimise
|r - phi u - theta q|^2 over the whole tensor (a 2x2 normal system), clipped to the method's
ranges; if u and q cannot be told apart (det <= 1e-9 uu qq, e.g. q = 0 on a straight line)
phi = r.u / u.u alone and theta = 1/2 (the rule: reference/foca_calibrated.py, fit_weights).
r, u, q, U, V are combinations of the feature and stored slots (methods.base.Fit).

Non-finite data: when one of the five sums is not finite (a nan or inf in some element of r, u
or q, after the all-reduce when sharded, so every shard decides alike) the weights are the
method's fixed ones (``Fit.fixed``; the calibrated reading: r7's (1, 1/2)) instead of the solve's
nan. The bad element keeps its own non-finite value in the slope (the data are not cleaned);
every other element stays finite. The test is a select on the five sums on the device (no host
read, no pass over the data), the same on every path.

Nothing is read on the host, so a full step does not sync with the GPU. The five dot products
are summed in fp64: the determinant cancels, and fp32 products would put fp32 noise (~1e-7
relative) into the parallel test instead of its 1e-9 threshold, so an exactly parallel case
(a one-element tensor, say) would take the other branch than the reference. Two paths:

* backend "triton" (the default on CUDA): ops/triton_fit.py, three launches (pass 1's
  partial dot products, a fixed-order sum per state, pass 2's solve and slope), r, u, q in fp32
  with fp64 products and sums; the same three launches serve every state of a full step at
  once (foca_kernels/full_group.py);
* backend "torch" on CPU with the compiled loop available (cpu_codegen.py ``foca_fit``): the
  same two passes in C, one call per state;
* otherwise plain PyTorch ops: r, u, q in fp64, ``torch.where`` for the branches, a few dozen
  small ops per stream (:func:`run_fit_group_torch` batches a sharded fit's all_reduce).

The feature enters as the state will store it (rounded to the state's dtype), so the fit is a
function of stored values only. The slope is formed in fp32 and rounded once to that dtype.
"""

from __future__ import annotations

import functools
from typing import List

import torch

from .cpu_codegen import fit_cpu

PARALLEL = 1e-9  # same threshold as reference/foca_calibrated.py
FEATURE_KEY = -1  # in the flat form below: the feature instead of a slot


@functools.lru_cache(maxsize=256)
def flatten(fit):
    """A state.SlotFit in the dense form every path takes (the custom op's arguments):
    ``inputs``, the distinct slots read in ascending order, then FEATURE_KEY if the feature is
    read; ``coef``, the five combinations r, u, q, U, V as rows of len(inputs) coefficients
    (row-major); six bounds: the clip box (phi lo, hi, theta lo, hi), then the fixed weights
    (phi, theta) taken when a sum is not finite; ``sharded``. Cached: the
    streams of a model share one fit per step (hooks: api.update_shared_)."""
    combos = (fit.r, fit.u, fit.q, fit.U, fit.V)
    keys = {FEATURE_KEY if isinstance(k, str) else int(k) for c in combos for k, _ in c}
    inputs = sorted(k for k in keys if k != FEATURE_KEY) + ([FEATURE_KEY] if FEATURE_KEY in keys else [])
    col = {k: j for j, k in enumerate(inputs)}
    coef = [0.0] * (len(combos) * len(inputs))
    for row, c in enumerate(combos):
        for k, v in c:
            coef[row * len(inputs) + col[FEATURE_KEY if isinstance(k, str) else int(k)]] += float(v)
    bounds = [*map(float, fit.phi_range), *map(float, fit.theta_range), *map(float, fit.fixed)]
    return inputs, coef, bounds, bool(fit.sharded)


def _combo(slots, numel, feature, inputs, coefs, dtype=torch.float32) -> torch.Tensor:
    """One row of the dense form, formed in ``dtype`` (zero coefficients are not terms)."""
    total = None
    for k, c in zip(inputs, coefs):
        if c == 0.0:
            continue
        # the feature as the state will hold it (rounded to its dtype): the fit is a function
        # of the stored values only, whatever the model's dtype
        v = (feature.to(slots.dtype) if k == FEATURE_KEY else slots[k, :numel]).to(dtype)
        total = v * c if total is None else total.add_(v, alpha=c)
    if total is None:
        return torch.zeros(numel, dtype=dtype, device=slots.device)
    return total


def dots(r: torch.Tensor, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The five sums u.u, u.q, q.q, r.u, r.q (float64, one tensor of 5)."""
    r, u, q = r.double(), u.double(), q.double()
    return torch.stack((u @ u, u @ q, q @ q, r @ u, r @ q))


def solve(sums: torch.Tensor, phi_range, theta_range, fixed):
    """(phi, theta) as 0-dim float64 tensors from the five sums (the branches of
    reference/foca_calibrated.py as selects), clipped; ``fixed`` (phi, theta) when a sum is not
    finite."""
    finite = torch.isfinite(sums).all()
    uu, uq, qq, ru, rq = sums.unbind()
    det = uu * qq - uq * uq
    ok = det > PARALLEL * uu * qq
    safe = torch.where(ok, det, torch.ones_like(det))
    slope_only = torch.where(uu > 0, ru / torch.where(uu > 0, uu, torch.ones_like(uu)), torch.zeros_like(uu))
    phi = torch.where(ok, (ru * qq - rq * uq) / safe, slope_only)
    theta = torch.where(ok, (rq * uu - ru * uq) / safe, torch.full_like(det, 0.5))
    phi = torch.where(finite, phi.clamp(*phi_range), torch.full_like(det, fixed[0]))
    theta = torch.where(finite, theta.clamp(*theta_range), torch.full_like(det, fixed[1]))
    return phi, theta


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def fit_weights(r: torch.Tensor, u: torch.Tensor, q: torch.Tensor, phi_range, theta_range, fixed,
                sharded: bool = False):
    """(phi, theta) as 0-dim float64 tensors on r's device (r, u, q are cast to float64);
    ``fixed`` when a sum is not finite. ``sharded``: the five dot products are summed over the
    default process group first."""
    sums = dots(r, u, q)
    if sharded and _distributed():
        torch.distributed.all_reduce(sums)
    return solve(sums, phi_range, theta_range, fixed)


def _rows(inputs, coef) -> list:
    n_in = len(inputs)
    return [coef[i * n_in:(i + 1) * n_in] for i in range(5)]


def _sums_torch(slots, numel, feature, inputs, rows) -> torch.Tensor:
    r, u, q = (_combo(slots, numel, feature, inputs, c, torch.float64) for c in rows[:3])
    return dots(r, u, q)


def _apply_torch(slots, numel, feature, slot, inputs, rows, phi, theta) -> None:
    y = _combo(slots, numel, feature, inputs, rows[3]).mul_(phi.float())
    y.add_(_combo(slots, numel, feature, inputs, rows[4]).mul_(theta.float()))
    slots[slot, :numel].copy_(y)


@torch.no_grad()
def run_fit(slots: torch.Tensor, numel: int, feature, slot: int, inputs: List[int], coef: List[float],
            bounds: List[float], sharded: bool = False, backend: str = "torch") -> None:
    """Overwrite ``slots[slot, :numel]`` with the fitted slope (arguments: :func:`flatten`).
    backend "triton": ops/triton_fit.py; "torch": on CPU the compiled loop of cpu_codegen.py
    when it can, else PyTorch ops."""
    if backend == "triton":
        from .triton_fit import fit_triton  # imported late: TRITON_INTERPRET must be settled

        fit_triton(slots, numel, feature, slot, inputs, coef, bounds, PARALLEL, sharded)
        return
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}")
    if (slots.device.type == "cpu" and not sharded
            and fit_cpu(slots, numel, feature, slot, inputs, coef, bounds, PARALLEL)):
        return
    rows = _rows(inputs, coef)
    sums = _sums_torch(slots, numel, feature, inputs, rows)
    if sharded and _distributed():
        torch.distributed.all_reduce(sums)
    phi, theta = solve(sums, bounds[0:2], bounds[2:4], bounds[4:6])
    _apply_torch(slots, numel, feature, slot, inputs, rows, phi, theta)


@torch.no_grad()
def run_fit_group_torch(members, slot: int, inputs: List[int], coef: List[float], bounds: List[float],
                        sharded: bool = False) -> int:
    """:func:`run_fit` (backend "torch") for several states with one fit: ``members`` are
    (slots, numel, feature) triples. Each member's result is exactly its own run_fit's: one
    compiled C call (or the PyTorch ops) per member; a sharded fit sums every member's five dot
    products over the process group in ONE all_reduce. Returns the number of calls made."""
    if not sharded:
        for slots, numel, feature in members:
            run_fit(slots, numel, feature, slot, inputs, coef, bounds, False, "torch")
        return len(members)
    rows = _rows(inputs, coef)
    sums = torch.stack([_sums_torch(s, n, f, inputs, rows) for s, n, f in members])
    if _distributed():
        torch.distributed.all_reduce(sums)
    for (slots, numel, feature), row in zip(members, sums):
        phi, theta = solve(row, bounds[0:2], bounds[2:4], bounds[4:6])
        _apply_torch(slots, numel, feature, slot, inputs, rows, phi, theta)
    return len(members)
