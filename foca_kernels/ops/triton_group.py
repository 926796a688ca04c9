"""The fused update for many cache states in ONE launch (a skipped step of a whole model).

States that share a history (same method, same step times, same slot assignment) have the
same coefficients and the same slot indices; only their memory differs. A table gives, per
program, where its block lives: the member's slot allocation and output (element offsets from
the first member's, so no pointer casts), its slot stride, and the block's range. A small
device tensor ``step`` holds what changes from step to step: the distinct rows' coefficients,
then the read and write slot indices (small integers, stored exactly as float32). The kernel
therefore depends only on the row structure (ops/pattern.py), never on values: a new step
uploads ``step`` and relaunches (or replays a captured CUDA graph) without recompiling.

Body blocks are masked against each member's ``body_end`` (a multiple of 16 elements) and the
offsets carry alignment hints, so accesses stay 16-byte vectors; a member whose size is not a
multiple of 16 has its < 16-element tail done by its first program, as in the single kernel.
Import this module only after TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_lincomb import _combine_block, interpreted

TABLE_COLS = 6  # slot_off, out_off, stride, start, body_end, n


@triton.jit
def _group_kernel(
    slots_ptr,  # the first member's slot allocation: every member is addressed from it
    out_ptr,  # the first member's output
    table_ptr,  # int64 [programs, TABLE_COLS]
    step_ptr,  # fp32 [NUM_ROWS * NUM_READ coefficients, NUM_READ read slots, NUM_WRITE written slots]
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
):
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * 6
    slot_off = tl.multiple_of(tl.load(row), SLOT_VEC)
    out_off = tl.multiple_of(tl.load(row + 1), OUT_VEC)
    stride = tl.multiple_of(tl.load(row + 2), 64)
    start = tl.multiple_of(tl.load(row + 3), 16)
    body_end = tl.multiple_of(tl.load(row + 4), 16)
    n = tl.load(row + 5)

    coef = ()
    for k in tl.static_range(NUM_ROWS * NUM_READ):
        coef = coef + (tl.load(step_ptr + k),)
    read_offs = ()
    for i in tl.static_range(NUM_READ):
        slot = tl.load(step_ptr + NUM_ROWS * NUM_READ + i).to(tl.int64)
        read_offs = read_offs + (tl.multiple_of(slot_off + slot * stride, SLOT_VEC),)
    write_offs = ()
    for j in tl.static_range(NUM_WRITE):
        slot = tl.load(step_ptr + NUM_ROWS * NUM_READ + NUM_READ + j).to(tl.int64)
        write_offs = write_offs + (tl.multiple_of(slot_off + slot * stride, SLOT_VEC),)
    out = out_ptr + out_off

    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _combine_block(slots_ptr, slots_ptr, out, offs, offs < body_end, read_offs, write_offs, coef,
                   NUM_READ, 0, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY)
    if (start == 0) & (body_end < n):
        toffs = body_end + tl.arange(0, 16).to(tl.int64)
        _combine_block(slots_ptr, slots_ptr, out, toffs, toffs < n, read_offs, write_offs, coef,
                       NUM_READ, 0, NUM_WRITE, HAS_OUT, NUM_ROWS, DEST_ROW, NZ, FIRST, COPY)


def block_size(max_numel: int) -> tuple:
    """(BLOCK, num_warps) for a group whose largest member has ``max_numel`` elements."""
    if interpreted():  # ~2 ms per program: few, large programs
        return min(65536, max(16, triton.next_power_of_2(max_numel))), 4
    if max_numel >= 1 << 20:
        return 2048, 8
    return 1024, 4


def group_triton(slots0, out0, table, step, n_programs: int, pattern, num_read: int, num_write: int,
                 has_out: bool, block: int, num_warps: int) -> None:
    """One launch over every program of ``table`` (built by foca_kernels.group)."""
    _group_kernel[(n_programs,)](
        slots0,
        out0 if has_out else slots0,
        table,
        step,
        NUM_READ=num_read,
        NUM_WRITE=num_write,
        HAS_OUT=int(has_out),
        NUM_ROWS=pattern.num_rows,
        DEST_ROW=pattern.dest_row,
        NZ=pattern.nz,
        FIRST=pattern.first,
        COPY=pattern.copy,
        SLOT_VEC=16 // slots0.element_size(),
        OUT_VEC=16 // (out0 if has_out else slots0).element_size(),
        BLOCK=block,
        num_warps=num_warps,
    )
