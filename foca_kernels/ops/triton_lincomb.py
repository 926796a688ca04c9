"""The one fused Triton kernel: every state slot a rule rewrites, and the caller's output,
as linear combinations of the slots it reads and the new feature, in one pass.

Each program loads its block of every input once, forms all outputs in fp32 registers and
only then stores, so an output may overwrite an input slot in place (elementwise: every
element is read and written by the same program). Offsets are int64; loads are masked.
Import this module only after TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pattern import row_pattern


@triton.jit
def _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr):
    """Every input at ``offs``, as stored: the read slots, then the feature."""
    xs = ()
    for i in tl.static_range(NUM_READ):
        xs = xs + (tl.load(slots_ptr + read_offs[i] + offs, mask=mask, other=0.0),)
    if HAS_FEAT:
        xs = xs + (tl.load(feat_ptr + offs, mask=mask, other=0.0),)
    return xs


@triton.jit
def _form_rows(xs, coef, NUM_IN: tl.constexpr, NUM_ROWS: tl.constexpr, NZ: tl.constexpr, FIRST: tl.constexpr,
               COPY: tl.constexpr):
    """Each distinct output row once (fp32; a copy row as loaded)."""
    # A zero coefficient is "not a term" (no 0 * inf = nan from an input the row does not use).
    # (no named constexprs inside the unrolled loop: triton refuses to reassign them)
    ys = ()
    for r in tl.static_range(NUM_ROWS):
        if (NZ >> (r * NUM_IN)) & ((1 << NUM_IN) - 1) == 0:
            y = tl.zeros_like(xs[0]).to(tl.float32)
        elif (COPY >> r) & 1:
            y = xs[(FIRST >> (4 * r)) & 15]  # one input times 1.0: stored as loaded
        else:
            y = coef[r * NUM_IN + ((FIRST >> (4 * r)) & 15)] * xs[(FIRST >> (4 * r)) & 15].to(tl.float32)
            for i in tl.static_range(((FIRST >> (4 * r)) & 15) + 1, NUM_IN):
                if (NZ >> (r * NUM_IN + i)) & 1:
                    y += coef[r * NUM_IN + i] * xs[i].to(tl.float32)
        ys = ys + (y,)
    return ys


@triton.jit
def _store_rows(ys, slots_ptr, out_ptr, offs, mask, write_offs, NUM_WRITE: tl.constexpr, HAS_OUT: tl.constexpr,
                DEST_ROW: tl.constexpr):
    """Every destination: its distinct row, rounded once to the destination's dtype."""
    for j in tl.static_range(NUM_WRITE):
        y = ys[(DEST_ROW >> (4 * j)) & 15]
        tl.store(slots_ptr + write_offs[j] + offs, y.to(slots_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        y = ys[(DEST_ROW >> (4 * NUM_WRITE)) & 15]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_block(
    slots_ptr, feat_ptr, out_ptr, offs, mask, read_offs, write_offs, coef,
    NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, NUM_WRITE: tl.constexpr, HAS_OUT: tl.constexpr,
    NUM_ROWS: tl.constexpr, DEST_ROW: tl.constexpr, NZ: tl.constexpr, FIRST: tl.constexpr, COPY: tl.constexpr,
):
    """Load every input at ``offs`` once, form each distinct output row once (fp32), then store
    every destination. The row structure is compile-time (ops/pattern.py): a row costs one
    multiply-add per term it has, a copy row none, equal rows are formed once; ``coef`` holds
    the distinct rows' coefficients (NUM_ROWS x NUM_IN, zeros included)."""
    xs = _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ, HAS_FEAT)
    ys = _form_rows(xs, coef, NUM_READ + HAS_FEAT, NUM_ROWS, NZ, FIRST, COPY)
    _store_rows(ys, slots_ptr, out_ptr, offs, mask, write_offs, NUM_WRITE, HAS_OUT, DEST_ROW)


@triton.jit
def _lincomb_kernel(
    slots_ptr,  # [n_slots, slot_stride] state allocation
    feat_ptr,  # [n] new feature (unused when HAS_FEAT == 0)
    out_ptr,  # [n] caller's output (unused when HAS_OUT == 0)
    n,  # elements per tensor
    n_body,  # n rounded down to a multiple of TAIL: the part every program covers
    read_offs,  # tuple: element offset of each slot read
    write_offs,  # tuple: element offset of each slot written
    coef,  # tuple: NUM_ROWS distinct rows of (NUM_READ + HAS_FEAT) fp32 coefficients
    NUM_READ: tl.constexpr,
    HAS_FEAT: tl.constexpr,
    NUM_WRITE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    NUM_ROWS: tl.constexpr,  # row structure: see ops/pattern.py
    DEST_ROW: tl.constexpr,
    NZ: tl.constexpr,
    FIRST: tl.constexpr,
    COPY: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,  # 16, or 0 when n is a multiple of 16
):
    # The body is masked against n_body, a multiple of 16, so the compiler can prove whole
    # 16-byte groups in or out of bounds and emit vector accesses; the < 16 elements past it
    # are done by program 0 with a scalar mask. One launch either way.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    _combine_block(slots_ptr, feat_ptr, out_ptr, offs, offs < n_body, read_offs, write_offs, coef,
                   NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY)
    if TAIL > 0:
        if pid == 0:
            toffs = n_body + tl.arange(0, TAIL).to(tl.int64)
            _combine_block(slots_ptr, feat_ptr, out_ptr, toffs, toffs < n, read_offs, write_offs, coef,
                           NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY)


def interpreted() -> bool:
    """Whether this module's kernel was built for the Triton interpreter."""
    return bool(triton.knobs.runtime.interpret)


def launch_config(n: int) -> tuple:
    """(BLOCK, num_warps) for n elements."""
    if interpreted():
        # The interpreter pays ~2 ms per program: few, large programs.
        return min(65536, max(16, triton.next_power_of_2(n))), 4
    if n >= 1 << 20:
        return 2048, 8
    return 1024, 4


def lincomb_triton(slots, feature, out, n, reads, writes, coef) -> None:
    """Apply ``coef`` (rows: written slots, then out) to slots ``reads`` (+ feature)."""
    has_feat = feature is not None
    has_out = out is not None
    num_in = len(reads) + int(has_feat)
    assert len(coef) == (len(writes) + int(has_out)) * num_in and num_in > 0
    pat = row_pattern(coef, len(writes) + int(has_out), num_in)
    stride = slots.stride(0)
    n_body = n - n % 16
    block, num_warps = launch_config(n)
    grid = (max(1, triton.cdiv(n_body, block)),)
    _lincomb_kernel[grid](
        slots,
        feature if has_feat else slots,
        out if has_out else slots,
        n,
        n_body,
        tuple(int(r) * stride for r in reads),
        tuple(int(w) * stride for w in writes),
        pat.flat,
        NUM_READ=len(reads),
        HAS_FEAT=int(has_feat),
        NUM_WRITE=len(writes),
        HAS_OUT=int(has_out),
        NUM_ROWS=pat.num_rows,
        DEST_ROW=pat.dest_row,
        NZ=pat.nz,
        FIRST=pat.first,
        COPY=pat.copy,
        BLOCK=block,
        TAIL=16 if n_body < n else 0,
        num_warps=num_warps,
    )
