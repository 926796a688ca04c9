"""Memory-overlap test between tensors (the fused update must never write into its inputs
through a caller's tensor)."""

from __future__ import annotations

import torch


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + _extent(a) * a.element_size()
    b1 = b0 + _extent(b) * b.element_size()
    return a0 < b1 and b0 < a1


def _extent(x: torch.Tensor) -> int:
    if x.is_contiguous():  # the common case, without a Python loop over dims
        return x.numel()
    return 1 + sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride()))
