"""Kernels: one fused linear-combination update, in Triton and in PyTorch, behind one op."""

from .custom_op import lincomb_

__all__ = ["lincomb_"]
