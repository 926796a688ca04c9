"""Kernels: one fused linear-combination update, in Triton and in PyTorch, behind one op."""

from .custom_op import lincomb_
from .dispatch import run_lincomb

__all__ = ["lincomb_", "run_lincomb"]
