"""The one fused Triton kernel: every state slot a rule rewrites, and the caller's output,
as linear combinations of the slots it reads and the new feature, in one pass.

Each program loads its block of every input once, forms all outputs in fp32 registers and
only then stores, so an output may overwrite an input slot in place (elementwise: every
element is read and written by the same program). Offsets are int64; loads are masked.
Import this module only after TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_block(
    slots_ptr, feat_ptr, out_ptr, offs, mask, read_offs, write_offs, coef,
    NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, NUM_WRITE: tl.constexpr, HAS_OUT: tl.constexpr,
):
    """Load every input at ``offs`` once, form every output in fp32, then store them all."""
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    xs = ()
    for i in tl.static_range(NUM_READ):
        x = tl.load(slots_ptr + read_offs[i] + offs, mask=mask, other=0.0)
        xs = xs + (x.to(tl.float32),)
    if HAS_FEAT:
        x = tl.load(feat_ptr + offs, mask=mask, other=0.0)
        xs = xs + (x.to(tl.float32),)

    # A zero coefficient means "not a term of this row" (the matrix is dense over the inputs
    # of all rows): drop the input instead of multiplying it, so a non-finite value in a slot
    # that row does not use cannot turn the row into 0 * inf = nan (the PyTorch path skips
    # zero coefficients the same way).
    ys = ()
    for j in tl.static_range(NUM_WRITE + HAS_OUT):
        c = coef[j * NUM_IN]
        acc = c * tl.where(c != 0.0, xs[0], 0.0)
        for i in tl.static_range(1, NUM_IN):
            c = coef[j * NUM_IN + i]
            acc += c * tl.where(c != 0.0, xs[i], 0.0)
        ys = ys + (acc,)

    for j in tl.static_range(NUM_WRITE):
        tl.store(slots_ptr + write_offs[j] + offs, ys[j].to(slots_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, ys[NUM_WRITE].to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lincomb_kernel(
    slots_ptr,  # [n_slots, slot_stride] state allocation
    feat_ptr,  # [n] new feature (unused when HAS_FEAT == 0)
    out_ptr,  # [n] caller's output (unused when HAS_OUT == 0)
    n,  # elements per tensor
    n_body,  # n rounded down to a multiple of TAIL: the part every program covers
    read_offs,  # tuple: element offset of each slot read
    write_offs,  # tuple: element offset of each slot written
    coef,  # tuple: (NUM_WRITE + HAS_OUT) rows of (NUM_READ + HAS_FEAT) fp32 coefficients
    NUM_READ: tl.constexpr,
    HAS_FEAT: tl.constexpr,
    NUM_WRITE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,  # 16, or 0 when n is a multiple of 16
):
    # The body is masked against n_body, a multiple of 16, so the compiler can prove whole
    # 16-byte groups in or out of bounds and emit vector accesses; the < 16 elements past it
    # are done by program 0 with a scalar mask. One launch either way.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    _combine_block(slots_ptr, feat_ptr, out_ptr, offs, offs < n_body, read_offs, write_offs, coef,
                   NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT)
    if TAIL > 0:
        if pid == 0:
            toffs = n_body + tl.arange(0, TAIL).to(tl.int64)
            _combine_block(slots_ptr, feat_ptr, out_ptr, toffs, toffs < n, read_offs, write_offs, coef,
                           NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT)


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
        tuple(float(c) for c in coef),
        NUM_READ=len(reads),
        HAS_FEAT=int(has_feat),
        NUM_WRITE=len(writes),
        HAS_OUT=int(has_out),
        BLOCK=block,
        TAIL=16 if n_body < n else 0,
        num_warps=num_warps,
    )
