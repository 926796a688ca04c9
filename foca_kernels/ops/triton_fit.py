"""The calibrated reading's fit (ops/fit.py) as two Triton kernels and one small reduction.

pass 1  each program forms r, u, q on its block (fp32, from the feature and up to three slot
        rows), and writes its five fp64 partial dot products u.u, u.q, q.q, r.u, r.q;
sum     the partials are summed on the device (``torch.sum``: a fixed order, so the result is
        the same on every run, which atomics would not give), all-reduced when sharded;
pass 2  every program solves the 2x2 system from the five sums (fp64 scalars; the branches of
        reference/foca_calibrated.py as selects), forms U, V on its block and stores
        phi U + theta V into the target slot, rounded once.

Three launches per stream and full step, where the PyTorch ops take a few dozen; nothing is
read on the host. Offsets are int64, loads masked. Import only after TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_lincomb import launch_config


@triton.jit
def _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr):
    xs = ()
    for i in tl.static_range(NUM_READ):
        xs = xs + (tl.load(slots_ptr + read_offs[i] + offs, mask=mask, other=0.0).to(tl.float32),)
    if HAS_FEAT:  # as the state will store it: rounded to the state's dtype first
        f = tl.load(feat_ptr + offs, mask=mask, other=0.0)
        xs = xs + (f.to(slots_ptr.dtype.element_ty).to(tl.float32),)
    return xs


@triton.jit
def _row(xs, coef, ROW: tl.constexpr, NUM_IN: tl.constexpr):
    y = coef[ROW * NUM_IN] * xs[0]
    for i in tl.static_range(1, NUM_IN):
        y += coef[ROW * NUM_IN + i] * xs[i]
    return y


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _total(x):
    # tl.reduce with this module's own combine function, not tl.sum: tl.sum is a jit function of
    # triton.language.standard, and the interpreter leaves triton.language.core patched after
    # interpreting a kernel that calls into another module's jit function (later compiles in the
    # same process then fail; tests/test_fit_ptx.py compiles after interpreted runs)
    return tl.reduce(x, 0, _add)


@triton.jit
def _fit_dots_kernel(slots_ptr, feat_ptr, partial_ptr, n, read_offs, coef,
                     NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, BLOCK: tl.constexpr):
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    xs = _load_inputs(slots_ptr, feat_ptr, offs, offs < n, read_offs, NUM_READ, HAS_FEAT)
    r = _row(xs, coef, 0, NUM_IN).to(tl.float64)
    u = _row(xs, coef, 1, NUM_IN).to(tl.float64)
    q = _row(xs, coef, 2, NUM_IN).to(tl.float64)
    base = partial_ptr + pid * 5
    tl.store(base + 0, _total(u * u))
    tl.store(base + 1, _total(u * q))
    tl.store(base + 2, _total(q * q))
    tl.store(base + 3, _total(r * u))
    tl.store(base + 4, _total(r * q))


@triton.jit
def _fit_apply_kernel(slots_ptr, feat_ptr, sums_ptr, n, read_offs, coef, target_off,
                      phi_lo, phi_hi, theta_lo, theta_hi, parallel,
                      NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, BLOCK: tl.constexpr):
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    uu = tl.load(sums_ptr + 0)
    uq = tl.load(sums_ptr + 1)
    qq = tl.load(sums_ptr + 2)
    ru = tl.load(sums_ptr + 3)
    rq = tl.load(sums_ptr + 4)
    det = uu * qq - uq * uq
    ok = det > parallel * uu * qq
    safe = tl.where(ok, det, 1.0)
    slope_only = tl.where(uu > 0, ru / tl.where(uu > 0, uu, 1.0), 0.0)
    phi = tl.where(ok, (ru * qq - rq * uq) / safe, slope_only)
    theta = tl.where(ok, (rq * uu - ru * uq) / safe, 0.5)
    phi = tl.minimum(tl.maximum(phi, phi_lo), phi_hi).to(tl.float32)
    theta = tl.minimum(tl.maximum(theta, theta_lo), theta_hi).to(tl.float32)

    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    xs = _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ, HAS_FEAT)
    y = _row(xs, coef, 0, NUM_IN) * phi + _row(xs, coef, 1, NUM_IN) * theta
    tl.store(slots_ptr + target_off + offs, y.to(slots_ptr.dtype.element_ty), mask=mask)


def fit_triton(slots, numel: int, feature, slot: int, inputs, coef, bounds, parallel: float,
               sharded: bool = False) -> None:
    """ops/fit.py's refit on the Triton kernels (arguments: fit.flatten, then the threshold;
    its dense rows list the slots first and the feature last, the order the kernels load)."""
    has_feat = bool(inputs) and inputs[-1] == -1
    slot_keys = inputs[:-1] if has_feat else inputs
    n_in = len(inputs)
    coef1, coef2 = tuple(coef[:3 * n_in]), tuple(coef[3 * n_in:5 * n_in])
    stride = slots.stride(0)
    read_offs = tuple(int(k) * stride for k in slot_keys)
    feat = feature if has_feat else slots
    block, num_warps = launch_config(numel)
    grid = (max(1, triton.cdiv(numel, block)),)
    partial = torch.empty(grid[0], 5, dtype=torch.float64, device=slots.device)
    _fit_dots_kernel[grid](slots, feat, partial, numel, read_offs, coef1,
                           NUM_READ=len(slot_keys), HAS_FEAT=int(has_feat), BLOCK=block, num_warps=num_warps)
    sums = partial.sum(0)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    _fit_apply_kernel[grid](slots, feat, sums, numel, read_offs, coef2, int(slot) * stride,
                            float(bounds[0]), float(bounds[1]), float(bounds[2]), float(bounds[3]), float(parallel),
                            NUM_READ=len(slot_keys), HAS_FEAT=int(has_feat), BLOCK=block, num_warps=num_warps)
