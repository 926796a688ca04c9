"""Compile the fp8 state's Triton kernels (ops/triton_fp8.py) for an H100 (sm_90) without a
GPU: the launches the real launchers make (skip_triton / full_triton with the kernel replaced by
a recorder) must compile through triton's CUDA backend (the interpreter the other tests run
them in accepts code the compiler refuses, e.g. a non-constexpr global) and keep everything in
registers: no local memory, no spills (tests/test_ptx.py's checks).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_ptx import (  # noqa: E402
    _Recorder, _TRITON_DTYPE, _compilable, _ptx_global_accesses, assert_no_local_memory, compile_launch,
    pytestmark,  # noqa: F401  (skip without the CUDA backend)
)

import foca_kernels as fk  # noqa: E402
from foca_kernels.fp8 import FP8_DTYPE  # noqa: E402
from foca_kernels.ops import triton_fp8 as tf  # noqa: E402

if FP8_DTYPE is None:  # pragma: no cover
    pytest.skip("torch build without float8_e4m3fn", allow_module_level=True)

NAMES = {**_TRITON_DTYPE, torch.int64: "i64", torch.uint8: "u8"}
SKIP = _compilable(tf, "_skip_kernel")
FULL = _compilable(tf, "_full_kernel")
IO = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _states(io_dtype, n_full: int):
    """Two fp8 states (DiT-like rows of 1152 channels) with n_full full steps of bookkeeping."""
    xs = [torch.zeros(2, 16, 1152, dtype=io_dtype), torch.zeros(1, 8, 1152, dtype=io_dtype)]
    sts = [fk.allocate(x, "taylorseer", dtype=FP8_DTYPE) for x in xs]
    for st in sts:
        for i in range(n_full):
            t = float(i)
            st.commit(st.plan_rotation(t), t, full=True)
    return sts, xs


def _recorded(monkeypatch, name, call):
    rec = _Recorder()
    monkeypatch.setattr(tf, name, rec)
    monkeypatch.setattr(tf, "interpreted", lambda: False)  # the tiles a GPU launch gets
    call()
    (grid, args, kwargs), = rec.calls
    return args, kwargs


@pytest.mark.parametrize("io", list(IO))
def test_skip_kernel_compiles_without_local_memory(io, monkeypatch):
    sts, xs = _states(IO[io], 3)
    st = sts[0]
    t = st.t + 1.0
    launch = st.plan(st.method.skip(st.context(t)), t)
    a0, terms = st.skip_terms(launch)
    assert len(terms) == 2
    args, kwargs = _recorded(monkeypatch, "_skip_kernel",
                             lambda: tf.skip_triton(sts, [x.view(-1) for x in xs], a0, terms))
    ck = compile_launch(SKIP, args, kwargs, NAMES)
    assert_no_local_memory(ck)
    # the flat body: the anchor read and the forecast written as 16-byte vectors, each thread's
    # e4m3 codes of an increment in one load (8 bytes at BLOCK 1024 / 4 warps)
    found = _ptx_global_accesses(ck.asm["ptx"])
    acc = [(op, size) for op, size, _ in found]
    assert kwargs["VEC"] == 16 and ("ld", 16) in acc and ("st", 16) in acc, acc
    codes = [line for op, size, line in found if op == "ld" and size == 8 and ".v2." in line]  # not the i64 table
    assert len(codes) >= len(terms), found


@pytest.mark.parametrize("has_prev", [0, 1])
@pytest.mark.parametrize("io", list(IO))
def test_full_kernel_compiles_without_local_memory(io, has_prev, monkeypatch):
    sts, xs = _states(IO[io], 2 if has_prev else 0)
    args, kwargs = _recorded(monkeypatch, "_full_kernel", lambda: tf.full_triton(sts, [x.view(-1) for x in xs]))
    assert kwargs["HAS_PREV"] == has_prev
    ck = compile_launch(FULL, args, kwargs, NAMES)
    assert_no_local_memory(ck)
