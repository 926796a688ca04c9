"""The token-wise cache refresh with PyTorch ops (devices Triton does not serve).

Same result as the Triton kernel: the output gets the cached rows converted to its dtype
(one rounding, as fp32 -> dtype in the kernel: every storage dtype widens to fp32 exactly)
and the fresh rows; the state gets the fresh rows; counters go to 0 for fresh tokens and +1
for the others. Works on flat row indices, so no row map is built.
"""

from __future__ import annotations


def tokens_torch(state, fresh, out, rows, age) -> None:
    """state/out ``[n_rows, C]``, fresh ``[k, C]``, rows ``[k]`` int64 (distinct), age
    ``[n_rows]`` int32 or None."""
    out.copy_(state)
    if rows.numel():
        out.index_copy_(0, rows, fresh.to(out.dtype))
        state.index_copy_(0, rows, fresh.to(state.dtype))
    if age is not None:
        age.add_(1)
        age.index_fill_(0, rows, 0)
