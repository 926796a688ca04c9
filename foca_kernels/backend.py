"""Which implementation runs the fused update, and how to read or override the choice.

Order of precedence: the ``backend=`` argument of a call, then :func:`set_backend`, then the
environment variable ``FOCA_KERNELS_BACKEND``, then "auto". "auto" picks Triton for CUDA
tensors, and for CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, set
before the first kernel call); everything else (CPU, MPS, ...) gets the fused PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("triton", "torch")
ENV_VAR = "FOCA_KERNELS_BACKEND"
_override: Optional[str] = None


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call ("triton", "torch"), or None/"auto" to undo."""
    global _override
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    _override = None if name == "auto" else name


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_auto_cache: dict = {}  # (device type, FOCA_KERNELS_BACKEND, TRITON_INTERPRET) -> backend


def get_backend(device="cpu", backend: Optional[str] = None) -> str:
    """The backend a call on tensors of ``device`` uses."""
    if backend == "torch":
        return backend  # runs on every device, nothing to check
    if backend is None and _override is None and isinstance(device, torch.device):
        # Hot path (every update): the answer depends only on these, and find_spec is slow.
        key = (device.type, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
        hit = _auto_cache.get(key)
        if hit is None:
            hit = _auto_cache[key] = _get_backend(device, None)
        return hit
    return _get_backend(torch.device(device), backend)


def _get_backend(device: torch.device, backend: Optional[str]) -> str:
    name = backend or _override or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        if triton_installed() and (device.type == "cuda" or (device.type == "cpu" and interpreter_on())):
            return "triton"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r} (from {ENV_VAR}?)")
    if name == "triton":
        if not triton_installed():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type == "cpu" and not interpreter_on():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before foca_kernels runs its first kernel"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend 'triton' does not run on {device.type} tensors; use 'torch'")
    return name
