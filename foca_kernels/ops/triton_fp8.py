"""The fp8 state's steps on Triton: one launch for every state of a class (foca_kernels/fp8.py;
rules: reference/fp8.py).

A member table (int64, one row per member) gives where the member's tensors live, in elements
from the first member's (anchor, e4m3 increments as bytes, scales, output or feature), its
slot strides, its row length C and its row count (full step) or size (skipped step).

* Skipped step, a flat pass: a program takes BLOCK elements of one member (program table:
  member, start), ``out = a0 A + sum_i (b_i s_i[row]) q_i`` in float32 with row = offset // C,
  stored in the output's dtype; the body up to a multiple of 16 elements with 16-byte vector
  accesses when every offset is a multiple of 16 elements (the launcher checks: VEC), the
  < 16-element tail by the member's first program. The coefficients and increment rows come in
  a small float32 device tensor (exact small integers for the rows): a new step does not
  recompile.
* Full step: a program takes ROWS rows (tokens) of one member (program table: member, first
  row) and walks their columns in BLOCK_C chunks: pass 1 takes the largest finite |increment|
  (the feature rounded to the anchor's dtype, minus the stored anchor, in float32); the scale
  2^(e-8) is built from its exponent bits; pass 2 re-reads the row (from cache), writes the
  e4m3 codes, the scale and the new anchor.

e4m3 codes are encoded and decoded here with integer and float32 arithmetic rather than the
compiler's fp8 casts: the Triton interpreter's cast rounds ties away from zero and flushes
subnormals, so the same bits on every backend need the rule spelled out. Rounding to nearest
even: ``(a + M) - M`` with M the power of two whose float32 ulp is the e4m3 ulp of ``a``.
Import this module only after TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .triton_lincomb import interpreted

MEMBER_COLS = 8  # anchor_off, inc_off, inc_stride, scale_off, scale_stride, io_off, C, rows
F32_MAX = tl.constexpr(3.4028234663852886e38)  # a global a jit function reads must be a constexpr


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _row_max(x):
    # tl.reduce with this module's combine function, not tl.max (a jit function of
    # triton.language.standard: see ops/triton_fit.py _total)
    return tl.reduce(x, 1, _maximum)


@triton.jit
def _encode_e4m3(v, finite):
    """e4m3 codes (int32 0..255) of float32 ``v`` with |v| < 256 where ``finite``; nan elsewhere."""
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    a = tl.where(finite, tl.abs(v), 0.0)
    ea = a.to(tl.int32, bitcast=True) >> 23
    big = ((tl.maximum(ea, 121) + 20) << 23).to(tl.float32, bitcast=True)
    r = (a + big) - big  # to nearest even at e4m3's spacing (2^-9 below 2^-6)
    rb = r.to(tl.int32, bitcast=True)
    er = rb >> 23
    sub = (r * 512.0).to(tl.int32)
    norm = ((er - 120) << 3) | ((rb >> 20) & 7)
    code = tl.where(er < 121, sub, norm) | (sign << 7)
    return tl.where(finite, code, 127)


@triton.jit
def _decode_e4m3(q):
    """float32 values of e4m3 codes ``q`` (uint8)."""
    b = q.to(tl.int32)
    ef = (b >> 3) & 15
    mf = b & 7
    norm = (((ef + 120) << 23) | (mf << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(ef == 0, mf.to(tl.float32) * 0.001953125, norm)
    val = tl.where((b & 128) != 0, -mag, mag)
    return tl.where((b & 127) == 127, float("nan"), val)


@triton.jit
def _member(member_ptr, prog_ptr, pid):
    m = tl.load(prog_ptr + pid * 2)
    row0 = tl.load(prog_ptr + pid * 2 + 1)
    t = member_ptr + m * 8
    return (tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3), tl.load(t + 4), tl.load(t + 5),
            tl.load(t + 6), tl.load(t + 7), row0)


@triton.jit
def _skip_block(anchor_ptr, inc_ptr, scale_ptr, out_ptr, a_off, inc_offs, s_offs, o_off, C, step_ptr, offs, mask,
                NUM_D: tl.constexpr, HAS_A: tl.constexpr):
    row = offs // C
    acc = tl.full(offs.shape, 0.0, tl.float32)
    if HAS_A:
        acc = tl.load(anchor_ptr + a_off + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(step_ptr)
    for d in tl.static_range(NUM_D):
        w = tl.load(scale_ptr + s_offs[d] + row, mask=mask, other=0.0) * tl.load(step_ptr + 1 + 2 * d)
        q = tl.load(inc_ptr + inc_offs[d] + offs, mask=mask, other=0)
        acc += _decode_e4m3(q) * w
    tl.store(out_ptr + o_off + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skip_kernel(anchor_ptr, inc_ptr, scale_ptr, out_ptr, member_ptr, prog_ptr, step_ptr,
                 NUM_D: tl.constexpr, HAS_A: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """One block of BLOCK elements of one member (a flat pass, so accesses can be vectors): the
    program table gives (member, start); the member's body is its elements up to a multiple of
    16, the < 16-element tail done by its first program. With VEC = 16 every offset, slot stride
    and the output's offset are multiples of 16 elements (checked by the launcher)."""
    pid = tl.program_id(0).to(tl.int64)
    # the hints go on the loads themselves (on a value returned by another jit function they
    # are lost when it is inlined)
    m = tl.load(prog_ptr + pid * 2)
    start = tl.multiple_of(tl.load(prog_ptr + pid * 2 + 1), VEC)
    t = member_ptr + m * 8
    a_off = tl.multiple_of(tl.load(t), VEC)
    i_off = tl.multiple_of(tl.load(t + 1), VEC)
    i_stride = tl.multiple_of(tl.load(t + 2), VEC)
    s_off = tl.load(t + 3)
    s_stride = tl.load(t + 4)
    o_off = tl.multiple_of(tl.load(t + 5), VEC)
    C = tl.load(t + 6)
    n = tl.load(t + 7)
    body_end = tl.multiple_of(n - n % 16, 16)
    inc_offs = ()
    s_offs = ()
    for d in tl.static_range(NUM_D):
        slot = tl.load(step_ptr + 2 + 2 * d).to(tl.int64)
        inc_offs = inc_offs + (tl.multiple_of(i_off + slot * i_stride, VEC),)
        s_offs = s_offs + (s_off + slot * s_stride,)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _skip_block(anchor_ptr, inc_ptr, scale_ptr, out_ptr, a_off, inc_offs, s_offs, o_off, C, step_ptr, offs,
                offs < body_end, NUM_D, HAS_A)
    if (start == 0) & (body_end < n):
        toffs = body_end + tl.arange(0, 16).to(tl.int64)
        _skip_block(anchor_ptr, inc_ptr, scale_ptr, out_ptr, a_off, inc_offs, s_offs, o_off, C, step_ptr, toffs,
                    toffs < n, NUM_D, HAS_A)


@triton.jit
def _full_kernel(anchor_ptr, inc_ptr, scale_ptr, feat_ptr, member_ptr, prog_ptr, wslot,
                 HAS_PREV: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    a_off, i_off, i_stride, s_off, s_stride, f_off, C, R, row0 = _member(member_ptr, prog_ptr, pid)
    rows = row0 + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < R
    if HAS_PREV:
        amax = tl.full((ROWS,), 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            e = rows[:, None] * C + cols[None, :]
            new = tl.load(feat_ptr + f_off + e, mask=mask, other=0.0).to(anchor_ptr.dtype.element_ty).to(tl.float32)
            d = new - tl.load(anchor_ptr + a_off + e, mask=mask, other=0.0).to(tl.float32)
            ad = tl.abs(d)
            amax = tl.maximum(amax, _row_max(tl.where(ad <= F32_MAX, ad, 0.0)))
        k = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) - 7, 1)
        s = (k << 23).to(tl.float32, bitcast=True)
        inv = ((254 - k) << 23).to(tl.float32, bitcast=True)
        w = wslot
        tl.store(scale_ptr + s_off + w * s_stride + rows, s, mask=rmask)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            e = rows[:, None] * C + cols[None, :]
            new = tl.load(feat_ptr + f_off + e, mask=mask, other=0.0).to(anchor_ptr.dtype.element_ty)
            d = new.to(tl.float32) - tl.load(anchor_ptr + a_off + e, mask=mask, other=0.0).to(tl.float32)
            code = _encode_e4m3(d * inv[:, None], tl.abs(d) <= F32_MAX)
            tl.store(inc_ptr + i_off + w * i_stride + e, code.to(tl.uint8), mask=mask)
            tl.store(anchor_ptr + a_off + e, new, mask=mask)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            e = rows[:, None] * C + cols[None, :]
            new = tl.load(feat_ptr + f_off + e, mask=mask, other=0.0)
            tl.store(anchor_ptr + a_off + e, new.to(anchor_ptr.dtype.element_ty), mask=mask)


def tile(row_len: int, rows: int) -> tuple:
    """(ROWS, BLOCK_C, num_warps) for members with rows of ``row_len`` elements."""
    cap = 65536 if interpreted() else 4096  # interpreted: few, large programs (~ms each)
    block_c = min(triton.next_power_of_2(max(row_len, 1)), 1024 if not interpreted() else cap)
    per = max(1, cap // block_c)
    rows_per = min(triton.next_power_of_2(max(rows, 1)), per)
    return rows_per, block_c, 8 if rows_per * block_c >= 4096 else 4


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    diff = t.data_ptr() - base.data_ptr()
    if diff % t.element_size():
        raise ValueError("misaligned tensor")  # callers route such members to their own launch
    return diff // t.element_size()


def _classes(states: Sequence, ios: Sequence[torch.Tensor]) -> List[List[int]]:
    """Members that can be addressed from one base (same dtypes, element-aligned offsets)."""
    groups: List[List[int]] = []
    for i, (st, x) in enumerate(zip(states, ios)):
        for g in groups:
            b, bx = states[g[0]], ios[g[0]]
            if (st.anchor_dtype == b.anchor_dtype and x.dtype == bx.dtype and x.device == bx.device
                    and (x.data_ptr() - bx.data_ptr()) % x.element_size() == 0
                    and (st.anchor.data_ptr() - b.anchor.data_ptr()) % st.anchor.element_size() == 0):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _tables(states, ios, rows_per):
    st0, io0 = states[0], ios[0]
    members, progs = [], []
    for i, (st, x) in enumerate(zip(states, ios)):
        members.append((_offset(st.anchor, st0.anchor), st.incs.data_ptr() - st0.incs.data_ptr(), st.incs.stride(0),
                        _offset(st.scales, st0.scales), st.scales.stride(0), _offset(x, io0), st.row_len, st.n_rows))
        progs.extend((i, r) for r in range(0, st.n_rows, rows_per))
    dev = st0.anchor.device
    return (torch.tensor(members, dtype=torch.int64).to(dev, non_blocking=True),
            torch.tensor(progs, dtype=torch.int64).to(dev, non_blocking=True), len(progs))


def skip_block(max_numel: int) -> tuple:
    """(BLOCK, num_warps) of the skipped step's flat launch."""
    if interpreted():  # ~ms per program: few, large programs
        return min(65536, max(16, triton.next_power_of_2(max_numel))), 4
    return (2048, 8) if max_numel >= 1 << 20 else (1024, 4)


def skip_triton(states: Sequence, outs: Sequence[torch.Tensor], a0: float, terms) -> None:
    """One launch per addressable class (normally one for all): every state's forecast."""
    values = [float(a0)]
    for r, b in terms:
        values += [float(b), float(r)]
    dev = states[0].anchor.device
    step = torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)
    for g in _classes(states, outs):
        ss, os_ = [states[i] for i in g], [outs[i] for i in g]
        block, warps = skip_block(max(s.numel for s in ss))
        st0, o0 = ss[0], os_[0]
        members, progs = [], []
        for i, (st, o) in enumerate(zip(ss, os_)):
            members.append((_offset(st.anchor, st0.anchor), st.incs.data_ptr() - st0.incs.data_ptr(),
                            st.incs.stride(0), _offset(st.scales, st0.scales), st.scales.stride(0), _offset(o, o0),
                            st.row_len, st.numel))
            body = st.numel - st.numel % 16
            progs.extend((i, start) for start in range(0, max(body, 1), block))
        vec = 16 if (all(t.data_ptr() % 16 == 0 for t in (st0.anchor, st0.incs, o0))
                     and all(v % 16 == 0 for row in members for v in (row[0], row[1], row[2], row[5]))) else 1
        members_t = torch.tensor(members, dtype=torch.int64).to(dev, non_blocking=True)
        progs_t = torch.tensor(progs, dtype=torch.int64).to(dev, non_blocking=True)
        _skip_kernel[(len(progs),)](st0.anchor, st0.incs.view(torch.uint8), st0.scales, o0, members_t, progs_t, step,
                                    NUM_D=len(terms), HAS_A=int(a0 != 0.0), BLOCK=block, VEC=vec, num_warps=warps)


def full_triton(states: Sequence, features: Sequence[torch.Tensor]) -> None:
    """One launch per addressable class: every state's full step (states share n_full)."""
    n_full = states[0].n_full
    wslot = (n_full - 1) % (states[0].method.n_slots - 1) if n_full >= 1 else 0
    for g in _classes(states, features):
        ss, fs = [states[i] for i in g], [features[i] for i in g]
        rows_per, block_c, warps = tile(max(s.row_len for s in ss), max(s.n_rows for s in ss))
        members, progs, n = _tables(ss, fs, rows_per)
        _full_kernel[(n,)](ss[0].anchor, ss[0].incs.view(torch.uint8), ss[0].scales, fs[0], members, progs, wslot,
                           HAS_PREV=int(n_full >= 1), ROWS=rows_per, BLOCK_C=block_c, num_warps=warps)
