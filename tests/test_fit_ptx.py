"""The calibrated reading's Triton fit (ops/triton_fit.py) compiled for sm_90 without a GPU.

The launches are the ones ``fit_triton`` makes for the default reading's steady-state full
step (recorded on meta tensors, launch configuration of a CUDA call), compiled by the same
path as tests/test_ptx.py: both kernels build, use no local memory and spill nothing, and read
the stored tensors and the feature with 16-byte vector loads (the fp64 sums are scalars).""" 

from __future__ import annotations

import pytest
import torch

from test_ptx import _TOOLCHAIN, _Recorder, _compilable, _ptx_global_accesses, assert_no_local_memory, compile_launch  # noqa: E402,F401

import foca_kernels as fk  # noqa: E402
from foca_kernels.api import _plan  # noqa: E402
from foca_kernels.ops import triton_fit as tf  # noqa: E402
from foca_kernels.ops import triton_lincomb as tlc  # noqa: E402
from foca_kernels.ops.fit import PARALLEL, flatten  # noqa: E402

DOTS = _compilable(tf, "_fit_dots_kernel")

APPLY = _compilable(tf, "_fit_apply_kernel")
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16state_fp32io": (torch.bfloat16, torch.float32)}


def _launches(dtypes: str):
    state_dtype, io_dtype = DTYPES[dtypes]
    buf = fk.allocate(torch.empty(256, 1152, dtype=io_dtype, device="meta"), "foca", dtype=state_dtype)
    for _ in range(4):  # bookkeeping only: four computed values, so the next full step fits
        t = 0.0 if buf.t is None else buf.t + 1.0
        buf.commit(buf.plan(buf.method.full(buf.context(t)), t), t, full=True)
    launch = _plan(buf, True, buf.t + 1.0, 1.0)
    assert launch.fit is not None
    dots, apply = _Recorder(), _Recorder()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(tf, "_fit_dots_kernel", dots)
        mp.setattr(tf, "_fit_apply_kernel", apply)
        mp.setattr(tlc, "interpreted", lambda: False)
        *args, sharded = flatten(launch.fit)
        tf.fit_triton(buf.slots, buf.numel, torch.empty(buf.numel, dtype=io_dtype, device="meta"), launch.fit.slot,
                      *args, PARALLEL, sharded)
    finally:
        mp.undo()
    assert len(dots.calls) == len(apply.calls) == 1, "two launches per fit"
    return dots.calls[0], apply.calls[0]


@pytest.mark.parametrize("kernel_name", ["dots", "apply"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_fit_kernels_compile_and_spill_nothing(dtypes, kernel_name):
    """(A 16-bit state with fp32 features included: the feature is rounded to the state's dtype
    on load, so pass 1 works in one layout.)"""
    ck, _ = _compiled(dtypes, kernel_name)
    assert_no_local_memory(ck)


@pytest.mark.parametrize("kernel_name", ["dots", "apply"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_fit_kernels_load_16_byte_vectors(dtypes, kernel_name):
    """Every load of the feature and the stored values is a 16-byte vector; pass 2 adds the
    five fp64 sums (8 bytes each)."""
    ck, kw = _compiled(dtypes, kernel_name)
    loads = [n for op, n, _ in _ptx_global_accesses(ck.asm["ptx"]) if op == "ld"]
    sums = 5 if kernel_name == "apply" else 0
    assert sorted(loads) == [8] * sums + [16] * (len(loads) - sums), loads
    assert len(loads) - sums >= kw["NUM_READ"] + kw["HAS_FEAT"], loads


_CACHE: dict = {}


def _compiled(dtypes: str, kernel_name: str):
    key = (dtypes, kernel_name)
    if key not in _CACHE:
        (_, dargs, dkw), (_, aargs, akw) = _launches(dtypes)
        kernel, args, kw = (DOTS, dargs, dkw) if kernel_name == "dots" else (APPLY, aargs, akw)
        _CACHE[key] = (compile_launch(kernel, args, kw, _NAMES), kw)
    return _CACHE[key]
