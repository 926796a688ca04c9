"""The full-step launches on Triton compiled for sm_90 without a GPU: the calibrated reading's fit
(ops/triton_fit.py: pass 1, the per-state sums, pass 2 in the grouped kernel with ``FIT``) and a
closed form's grouped full step (the grouped kernel reading one feature per member).

The launches are the ones ``full_group_triton`` makes for a steady-state full step of the
default reading (a group of states, and one state alone through ``fit_triton``, whose pass 2
writes nothing but the slope) and of FoCa r7 (recorded on meta tensors, launch configuration of
a CUDA call), compiled by the same path as tests/test_ptx.py. Checked, as tests/test_group_ptx.py
checks the skipped step's launch:

* every kernel builds and uses no local memory or spills;
* every load and store of stored values or features in the block body is a 16-byte vector, as
  many as it takes to read each input and write each output once; the < 16-element tail (always
  compiled) adds one scalar access per tensor; everything else reads the table, the step tensor,
  the feature offsets and the fp64 sums (loads only) or writes the fp64 partials / sums (pass 1,
  the sums kernel: one scalar store each).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from test_ptx import (  # noqa: E402,F401
    VECTOR_BYTES, _Recorder, _compilable, _ptx_global_accesses, assert_no_local_memory, compile_launch,
    pytestmark,  # (skip without the CUDA backend)
)
from test_group_ptx import _REG, _param_taint  # noqa: E402

import foca_kernels as fk  # noqa: E402
from foca_kernels.step import plan_step  # noqa: E402
from foca_kernels.ops import triton_fit as tf  # noqa: E402
from foca_kernels.ops import triton_group as tg  # noqa: E402
from foca_kernels.ops.fit import PARALLEL, flatten  # noqa: E402

DOTS = _compilable(tf, "_fit_dots_kernel")
SUM = _compilable(tf, "_fit_sum_kernel")
GROUP = _compilable(tg, "_group_kernel")
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64"}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16state_fp32io": (torch.bfloat16, torch.float32)}
NUMEL = 256 * 1152  # a DiT-XL/2 module output
# kernel -> (parameters whose addresses are stored values or features, parameters that are written metadata)
DATA = {"dots": ({0, 3}, {5}), "sum": (set(), {2}), "apply": ({0, 1, 4}, set()), "group": ({0, 1, 4}, set())}


def _launches(dtypes: str, method="foca", options=None, members=3, alone=False):
    """{kernel name: (args, kwargs)} of the launches of a steady-state full step."""
    state_dtype, io_dtype = DTYPES[dtypes]
    buf = fk.allocate(torch.empty(NUMEL, dtype=io_dtype, device="meta"), method, dtype=state_dtype,
                      **(options or {}))
    for _ in range(4):  # bookkeeping only: four computed values, so the next full step fits
        t = 0.0 if buf.t is None else buf.t + 1.0
        buf.commit(buf.plan(buf.method.full(buf.context(t)), t), t, full=True)
    launch = plan_step(buf, True, buf.t + 1.0, 1.0)
    recs = {"dots": _Recorder(), "sum": _Recorder(), "group": _Recorder()}
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(tf, "_fit_dots_kernel", recs["dots"])
        mp.setattr(tf, "_fit_sum_kernel", recs["sum"])
        mp.setattr(tg, "_group_kernel", recs["group"])
        for mod in (tf, tg):
            mp.setattr(mod, "interpreted", lambda: False)  # launch configuration of a CUDA call
        feature = torch.empty(buf.numel, dtype=io_dtype, device="meta")
        if alone:
            tf.fit_triton(buf.slots, buf.numel, feature, launch.fit.slot, *flatten(launch.fit)[:3], PARALLEL)
        else:
            spec = None
            if launch.fit is not None:
                inputs, coef, bounds, sharded = flatten(launch.fit)
                spec = tf.fit_spec(launch.fit.slot, tuple(inputs), tuple(coef), tuple(bounds), PARALLEL, sharded)
            tf.full_group_triton([buf.slots] * members, [buf.numel] * members, [feature] * members, launch.reads,
                                 launch.has_feature, launch.writes, launch.coef, spec)
    finally:
        mp.undo()
    out = {}
    for name, rec in recs.items():
        assert len(rec.calls) <= 1, f"{name}: one launch per full step"
        if rec.calls:
            out[name] = rec.calls[0][1:]
    return out, launch


_KERNELS = {"dots": DOTS, "sum": SUM, "group": GROUP}
CASES = {  # id -> (dtypes, method, options, alone, kernel)
    **{f"calibrated-{k}-{d}": (d, "foca", None, False, k) for d in DTYPES for k in ("dots", "sum", "group")},
    **{f"calibrated-alone-group-{d}": (d, "foca", None, True, "group") for d in ("fp32", "bf16")},
    **{f"r7-group-{d}": (d, "foca", {"reading": "r7"}, False, "group") for d in DTYPES},
}


@functools.lru_cache(maxsize=None)
def _compiled(case: str):
    dtypes, method, options, alone, kernel = CASES[case]
    launches, plan = _launches(dtypes, method, options, alone=alone)
    assert set(launches) == ({"dots", "sum", "group"} if plan.fit is not None else {"group"})
    args, kwargs = launches[kernel]
    return compile_launch(_KERNELS[kernel], args, kwargs, _NAMES), kwargs, plan


@pytest.mark.parametrize("case", list(CASES))
def test_full_step_kernels_compile_and_spill_nothing(case):
    ck, _, _ = _compiled(case)
    assert_no_local_memory(ck)


def _classified(ptx: str, data_params: set, meta_written: set):
    taint = _param_taint(ptx)
    found = []
    for op, nbytes, line in _ptx_global_accesses(ptx):
        addr = re.search(r"\[([^\]]*)\]", line).group(1)
        src = set()
        for r in _REG.findall(addr):
            src |= taint.get(r, set())
        assert src, f"cannot trace the address of: {line}"
        kind = "data" if src & data_params else "written" if src & meta_written else "meta"
        found.append((kind, op, nbytes, line))
    return found


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _expected(case, kwargs, plan):
    """(body 16-byte loads, body 16-byte stores, tail scalar load bytes, tail scalar store bytes)."""
    dtypes, _, _, alone, kernel = CASES[case]
    s, f = (_size(d) for d in DTYPES[dtypes])
    per_thread = kwargs["BLOCK"] // (32 * kwargs["num_warps"])
    ins = [s] * kwargs["NUM_READ"] + [f] * kwargs["HAS_FEAT"]
    if kernel == "dots":
        outs = []
    else:
        outs = [s] * (kwargs["NUM_WRITE"] + kwargs["FIT"])
    return (sum(per_thread * b // VECTOR_BYTES for b in ins), sum(per_thread * b // VECTOR_BYTES for b in outs),
            sorted(ins), sorted(outs))


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] != "sum"])
def test_data_accesses_are_16_byte_vectors(case):
    ck, kwargs, plan = _compiled(case)
    dtypes, _, _, alone, kernel = CASES[case]
    data_params, written = DATA[kernel]
    acc = _classified(ck.asm["ptx"], data_params, written)
    data = [a for a in acc if a[0] == "data"]
    meta = [a for a in acc if a[0] == "meta"]
    assert all(op == "ld" for _, op, _, _ in meta), "table / step / offsets / sums: loads only"
    loads, stores, tail_ld, tail_st = _expected(case, kwargs, plan)
    vec = [op for _, op, n, _ in data if n == VECTOR_BYTES]
    scalar = [(op, n, line) for _, op, n, line in data if n != VECTOR_BYTES]
    assert (vec.count("ld"), vec.count("st")) == (loads, stores), (
        f"expected {loads} 16-byte loads and {stores} 16-byte stores, PTX has {vec.count('ld')} and "
        f"{vec.count('st')}; narrower data accesses:\n" + "\n".join(line for *_, line in scalar))
    assert (sorted(n for op, n, _ in scalar if op == "ld"), sorted(n for op, n, _ in scalar if op == "st")) == (
        tail_ld, tail_st), "scalar data accesses beyond the tail's:\n" + "\n".join(line for *_, line in scalar)
    # the fit's inputs: pass 1 reads the feature and X0..X2, pass 2 the feature, X0 and X1
    if plan.fit is not None:
        assert kwargs["NUM_READ"] == (3 if kernel == "dots" else 2) and kwargs["HAS_FEAT"] == 1
    if kernel == "group" and not alone:
        assert kwargs["NUM_WRITE"] == 1  # the feature's copy, in the same launch


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] in ("dots", "sum")])
def test_partials_and_sums_are_fp64_scalar_stores(case):
    ck, kwargs, _ = _compiled(case)
    kernel = CASES[case][4]
    acc = _classified(ck.asm["ptx"], *DATA[kernel])
    stores = [n for kind, op, n, _ in acc if op == "st"]
    assert stores == [8] * 5, stores
    assert all(kind == "written" for kind, op, _, _ in acc if op == "st")
