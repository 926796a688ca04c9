"""Token-wise cache refresh in Triton: one pass over the rows (tokens) of a cached module output.

Every row of the output is either a fresh row (computed this step for a selected token) or the
cached row. One launch writes the whole output, writes the fresh rows into the state, and
moves each token's staleness counter (0 for a fresh token, +1 otherwise). Rows are addressed
through ``src``: ``src[r]`` is the fresh row that replaces row ``r``, or -1 to keep it.

A program covers a tile of ROWS rows x BLOCK_C columns. Row starts are ``r * C`` (int64): with
C a multiple of 16 (every DiT/FLUX hidden size) triton specialises C as divisible by 16, proves
each 16-byte group of a row aligned and in or out of bounds as a whole, and emits 16-byte
accesses; odd C keeps the same code with element masks (scalar accesses). Math in fp32: the
value is converted once to the destination's dtype. Import this module only after
TRITON_INTERPRET is settled: @triton.jit reads it here.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tokens_kernel(
    state_ptr,  # [n_rows, C] cached rows, updated in place at fresh rows
    fresh_ptr,  # [k, C] fresh rows (unused when there are none)
    out_ptr,  # [n_rows, C] caller's output: every row written
    src_ptr,  # [n_rows] int32: fresh row replacing this row, or -1
    age_ptr,  # [n_rows] int32 staleness counters (unused when HAS_AGE == 0)
    n_rows,
    C,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_AGE: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_r * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < n_rows
    src = tl.load(src_ptr + rows, mask=rmask, other=-1)
    fresh = src >= 0
    inb = rmask[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    # Each row is read from exactly one place: the state for kept rows, the fresh rows otherwise.
    kept = tl.load(state_ptr + offs, mask=inb & (~fresh)[:, None], other=0.0).to(tl.float32)
    foffs = src.to(tl.int64)[:, None] * C + cols[None, :]
    new = tl.load(fresh_ptr + foffs, mask=inb & fresh[:, None], other=0.0).to(tl.float32)
    val = tl.where(fresh[:, None], new, kept)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=inb)
    tl.store(state_ptr + offs, new.to(state_ptr.dtype.element_ty), mask=inb & fresh[:, None])
    if HAS_AGE:
        if pid_c == 0:
            age = tl.load(age_ptr + rows, mask=rmask, other=0)
            tl.store(age_ptr + rows, tl.where(fresh, 0, age + 1), mask=rmask)


def interpreted() -> bool:
    return bool(triton.knobs.runtime.interpret)


def launch_config(n_rows: int, c: int) -> tuple:
    """(ROWS, BLOCK_C, num_warps)."""
    if interpreted():  # ~2 ms per program: as few programs as the element count allows
        block_c = triton.next_power_of_2(c)
        rows = max(1, min(triton.next_power_of_2(n_rows), 65536 // block_c))
        return rows, block_c, 4
    # A column block that divides C wastes no lanes (DiT-XL's 1152 = 9 x 128, FLUX's 3072 = 3 x 1024).
    pow2 = c & -c
    block_c = min(pow2, 1024) if pow2 >= 64 else min(triton.next_power_of_2(c), 1024)
    # 1024-element tiles: 8 elements (one or two 16-byte vectors) per thread with 4 warps; at
    # 2048 ptxas spills on fp32 with 128-column blocks (many rows per thread, 64-bit addresses)
    rows = max(1, 1024 // block_c)
    return rows, block_c, 4


def tokens_triton(state, fresh, out, src, age) -> None:
    """state/out ``[n_rows, C]``, fresh ``[k, C]`` (k may be 0), src ``[n_rows]`` int32,
    age ``[n_rows]`` int32 or None; all contiguous on one device."""
    n_rows, c = out.shape
    rows, block_c, num_warps = launch_config(n_rows, c)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(c, block_c))
    _tokens_kernel[grid](
        state,
        fresh if fresh.numel() else state,
        out,
        src,
        age if age is not None else src,
        n_rows,
        c,
        ROWS=rows,
        BLOCK_C=block_c,
        HAS_AGE=int(age is not None),
        num_warps=num_warps,
    )
