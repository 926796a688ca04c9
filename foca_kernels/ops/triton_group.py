"""The fused update for many cache states in ONE launch (a skipped or a full step of a whole model).

States that share a history (same method, same step times, same slot assignment) have the
same coefficients and the same slot indices; only their memory differs. A table gives, per
program, where its block lives: the member's slot allocation and output (element offsets from
the first member's, so no pointer casts), its slot stride, the block's range and the member's
index. A small device tensor ``step`` holds what changes from step to step: the distinct rows'
coefficients, then the read and write slot indices (small integers, stored exactly as float32).
The kernel therefore depends only on the row structure (ops/pattern.py), never on values: a
new step uploads ``step`` and relaunches (or replays a captured CUDA graph) without recompiling.

A full step also reads a feature per member (``HAS_FEAT``). Features are separate allocations
made by the model, so they are addressed like the slots, by element offsets from the first
member's feature, read from ``feat_offs`` (one int64 per member, uploaded per step; a table row
gives the member). With ``FIT`` the launch also stores the calibrated reading's fitted slope
(ops/fit.py) into one more slot: it reads the member's five fp64 dot products (ops/triton_fit.py,
pass 1), solves the 2x2 system and writes phi U + theta V, where U and V are two more rows over
the same inputs (the feature rounded to the state's dtype first, so the fit sees stored values);
their coefficients, the fitted slot, the clip bounds, the fixed weights (used when a sum is not
finite: a nan/inf in the data) and the parallel threshold follow the slot indices in ``step``.
Every input is loaded once per block whatever reads it, and every store
comes after every load of its block, so a written slot may be one that is read.

Body blocks are masked against each member's ``body_end`` (a multiple of 16 elements) and the
offsets carry alignment hints, so accesses stay 16-byte vectors; a member whose size is not a
multiple of 16 has its < 16-element tail done by its first program, as in the single kernel.
Import this module only after TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import triton
import triton.language as tl

from .triton_lincomb import _form_rows, _load_inputs, _store_rows, interpreted

TABLE_COLS = 7  # slot_off, out_off, stride, start, body_end, n, member
# step entries after a fit's two coefficient rows: slot, phi lo, phi hi, theta lo, theta hi, the fixed
# phi and theta (taken when a sum is not finite), threshold
FIT_TAIL = 8


@triton.jit
def _table_row(table_ptr, pid, SLOT_VEC: tl.constexpr, OUT_VEC: tl.constexpr):
    row = table_ptr + pid * 7
    slot_off = tl.multiple_of(tl.load(row), SLOT_VEC)
    out_off = tl.multiple_of(tl.load(row + 1), OUT_VEC)
    stride = tl.multiple_of(tl.load(row + 2), 64)
    start = tl.multiple_of(tl.load(row + 3), 16)
    body_end = tl.multiple_of(tl.load(row + 4), 16)
    n = tl.load(row + 5)
    member = tl.load(row + 6)
    return slot_off, out_off, stride, start, body_end, n, member


@triton.jit
def _fit_inputs(xs, slots_ptr, NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr):
    """The inputs as the fit sees them: fp32, the feature rounded to the state's dtype first
    (what the state will store)."""
    xf = ()
    for i in tl.static_range(NUM_READ):
        xf = xf + (xs[i].to(tl.float32),)
    if HAS_FEAT:
        xf = xf + (xs[NUM_READ].to(slots_ptr.dtype.element_ty).to(tl.float32),)
    return xf


@triton.jit
def _fit_row(xf, coef, BASE: tl.constexpr, NZ: tl.constexpr, NUM_IN: tl.constexpr):
    """sum of coef[BASE + i] * xf[i] over the inputs whose bit is set in NZ, from 0, in order."""
    # (tl.full, a builtin, not tl.zeros / zeros_like: jit functions of triton.language.standard,
    # which the interpreter runs by patching triton.language for good, so that compiling for a
    # GPU later in the same process fails; see ops/triton_fit.py _total)
    y = tl.full(xf[0].shape, 0.0, tl.float32)
    for i in tl.static_range(NUM_IN):
        if (NZ >> i) & 1:
            y += coef[BASE + i] * xf[i]
    return y


@triton.jit
def _solve(sums_ptr, lo_phi, hi_phi, lo_theta, hi_theta, fixed_phi, fixed_theta, parallel):
    """(phi, theta) in fp32 from the five fp64 sums u.u, u.q, q.q, r.u, r.q: the 2x2 normal
    system, or phi alone (theta 1/2) when u and q are parallel; clipped (ops/fit.py); the fixed
    weights when a sum is not finite."""
    uu = tl.load(sums_ptr + 0)
    uq = tl.load(sums_ptr + 1)
    qq = tl.load(sums_ptr + 2)
    ru = tl.load(sums_ptr + 3)
    rq = tl.load(sums_ptr + 4)
    # s * 0 is 0 for a finite s and nan for nan or +-inf (IEEE; the kernels carry no fast-math
    # flags, so it is not folded), so the total is 0 exactly when all five sums are finite
    finite = (uu * 0.0 + uq * 0.0 + qq * 0.0 + ru * 0.0 + rq * 0.0) == 0.0
    det = uu * qq - uq * uq
    ok = det > parallel * uu * qq
    safe = tl.where(ok, det, 1.0)
    slope_only = tl.where(uu > 0, ru / tl.where(uu > 0, uu, 1.0), 0.0)
    phi = tl.where(ok, (ru * qq - rq * uq) / safe, slope_only)
    theta = tl.where(ok, (rq * uu - ru * uq) / safe, 0.5)
    phi = tl.where(finite, tl.minimum(tl.maximum(phi, lo_phi), hi_phi), fixed_phi).to(tl.float32)
    theta = tl.where(finite, tl.minimum(tl.maximum(theta, lo_theta), hi_theta), fixed_theta).to(tl.float32)
    return phi, theta


@triton.jit
def _update_block(slots_ptr, feat_ptr, out_ptr, offs, mask, read_offs, write_offs, coef, fit_coef, fit_off,
                  phi, theta,
                  NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, NUM_WRITE: tl.constexpr, HAS_OUT: tl.constexpr,
                  NUM_ROWS: tl.constexpr, DEST_ROW: tl.constexpr, NZ: tl.constexpr, FIRST: tl.constexpr,
                  COPY: tl.constexpr, FIT: tl.constexpr, FIT_NZ: tl.constexpr):
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    xs = _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ, HAS_FEAT)
    ys = _form_rows(xs, coef, NUM_IN, NUM_ROWS, NZ, FIRST, COPY)
    if FIT:
        xf = _fit_inputs(xs, slots_ptr, NUM_READ, HAS_FEAT)
        y = (_fit_row(xf, fit_coef, 0, FIT_NZ, NUM_IN) * phi
             + _fit_row(xf, fit_coef, NUM_IN, FIT_NZ >> NUM_IN, NUM_IN) * theta)
        tl.store(slots_ptr + fit_off + offs, y.to(slots_ptr.dtype.element_ty), mask=mask)
    _store_rows(ys, slots_ptr, out_ptr, offs, mask, write_offs, NUM_WRITE, HAS_OUT, DEST_ROW)


@triton.jit
def _group_kernel(
    slots_ptr,  # the first member's slot allocation: every member is addressed from it
    out_ptr,  # the first member's output
    table_ptr,  # int64 [programs, TABLE_COLS]
    step_ptr,  # fp32 [NUM_ROWS * NUM_IN coefficients, NUM_READ read slots, NUM_WRITE written slots, (FIT) fit]
    feat_ptr,  # the first member's feature (HAS_FEAT)
    feat_offs_ptr,  # int64 [members]: each member's feature, in elements from feat_ptr (HAS_FEAT)
    sums_ptr,  # fp64 [members, 5]: u.u, u.q, q.q, r.u, r.q of each member's fit (FIT)
    NUM_READ: tl.constexpr,
    NUM_WRITE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    NUM_ROWS: tl.constexpr,
    DEST_ROW: tl.constexpr,
    NZ: tl.constexpr,
    FIRST: tl.constexpr,
    COPY: tl.constexpr,
    SLOT_VEC: tl.constexpr,  # elements per 16 bytes of the state dtype (alignment hint)
    OUT_VEC: tl.constexpr,  # elements per 16 bytes of the output dtype
    BLOCK: tl.constexpr,
    HAS_FEAT: tl.constexpr,
    FEAT_VEC: tl.constexpr,  # elements per 16 bytes of the feature dtype
    FIT: tl.constexpr,
    FIT_NZ: tl.constexpr,  # the fit's rows U, V: bit i (U) / NUM_IN + i (V) set when input i is a term
):
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    pid = tl.program_id(0).to(tl.int64)
    slot_off, out_off, stride, start, body_end, n, member = _table_row(table_ptr, pid, SLOT_VEC, OUT_VEC)

    coef = ()
    for k in tl.static_range(NUM_ROWS * NUM_IN):
        coef = coef + (tl.load(step_ptr + k),)
    read_offs = ()
    for i in tl.static_range(NUM_READ):
        slot = tl.load(step_ptr + NUM_ROWS * NUM_IN + i).to(tl.int64)
        read_offs = read_offs + (tl.multiple_of(slot_off + slot * stride, SLOT_VEC),)
    write_offs = ()
    for j in tl.static_range(NUM_WRITE):
        slot = tl.load(step_ptr + NUM_ROWS * NUM_IN + NUM_READ + j).to(tl.int64)
        write_offs = write_offs + (tl.multiple_of(slot_off + slot * stride, SLOT_VEC),)
    out = out_ptr + out_off
    feat = feat_ptr
    if HAS_FEAT:
        feat = feat_ptr + tl.multiple_of(tl.load(feat_offs_ptr + member), FEAT_VEC)
    fit_coef = ()
    fit_off = slot_off
    phi = 0.0
    theta = 0.0
    if FIT:
        base = NUM_ROWS * NUM_IN + NUM_READ + NUM_WRITE
        for k in tl.static_range(2 * NUM_IN):
            fit_coef = fit_coef + (tl.load(step_ptr + base + k),)
        fit_slot = tl.load(step_ptr + base + 2 * NUM_IN).to(tl.int64)
        fit_off = tl.multiple_of(slot_off + fit_slot * stride, SLOT_VEC)
        tail = step_ptr + base + 2 * NUM_IN
        phi, theta = _solve(sums_ptr + member * 5, tl.load(tail + 1), tl.load(tail + 2), tl.load(tail + 3),
                            tl.load(tail + 4), tl.load(tail + 5), tl.load(tail + 6), tl.load(tail + 7))

    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _update_block(slots_ptr, feat, out, offs, offs < body_end, read_offs, write_offs, coef, fit_coef, fit_off,
                  phi, theta, NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY,
                  FIT, FIT_NZ)
    if (start == 0) & (body_end < n):
        toffs = body_end + tl.arange(0, 16).to(tl.int64)
        _update_block(slots_ptr, feat, out, toffs, toffs < n, read_offs, write_offs, coef, fit_coef, fit_off,
                      phi, theta, NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY,
                      FIT, FIT_NZ)


def table_rows(slot_offs: Sequence[int], out_offs: Sequence[int], strides: Sequence[int], numels: Sequence[int],
               block: int) -> Tuple[List[tuple], List[int]]:
    """The table of a launch over members (element offsets from the first member's slots and
    output, slot strides, sizes): one row per program, members in order, and for each member
    the index of its first program (plus the total at the end)."""
    rows: List[tuple] = []
    starts = [0]
    for m, (slot_off, out_off, stride, n) in enumerate(zip(slot_offs, out_offs, strides, numels)):
        body = n - n % 16
        for start in range(0, max(body, 1), block):
            rows.append((slot_off, out_off, stride, start, body, n, m))
        starts.append(len(rows))
    return rows, starts


def block_size(max_numel: int) -> tuple:
    """(BLOCK, num_warps) for a group whose largest member has ``max_numel`` elements."""
    if interpreted():  # ~2 ms per program: few, large programs
        return min(65536, max(16, triton.next_power_of_2(max_numel))), 4
    if max_numel >= 1 << 20:
        return 2048, 8
    return 1024, 4


def group_triton(slots0, out0, table, step, n_programs: int, pattern, num_read: int, num_write: int,
                 has_out: bool, block: int, num_warps: int, feature0=None, feat_offs=None, sums=None,
                 fit_nz: int = 0, slot_vec: int = 0, feat_vec: int = 0) -> None:
    """One launch over every program of ``table`` (built by foca_kernels.group). A full step
    passes ``feature0`` (the first member's feature) and ``feat_offs``; a fitted one also
    ``sums`` (ops/triton_fit.py) and the bits of its rows U, V (``fit_nz``). ``slot_vec`` /
    ``feat_vec``: the alignment hints in elements when not every member is 16-byte aligned
    (0: 16 bytes' worth)."""
    has_feat = feature0 is not None
    fit = sums is not None
    _group_kernel[(n_programs,)](
        slots0,
        out0 if has_out else slots0,
        table,
        step,
        feature0 if has_feat else slots0,
        feat_offs if has_feat else table,
        sums if fit else step,
        NUM_READ=num_read,
        NUM_WRITE=num_write,
        HAS_OUT=int(has_out),
        NUM_ROWS=pattern.num_rows,
        DEST_ROW=pattern.dest_row,
        NZ=pattern.nz,
        FIRST=pattern.first,
        COPY=pattern.copy,
        SLOT_VEC=slot_vec or 16 // slots0.element_size(),
        OUT_VEC=16 // (out0 if has_out else slots0).element_size(),
        BLOCK=block,
        HAS_FEAT=int(has_feat),
        FEAT_VEC=(feat_vec or 16 // feature0.element_size()) if has_feat else 1,
        FIT=int(fit),
        FIT_NZ=fit_nz,
        num_warps=num_warps,
    )
