"""The token-wise refresh kernel compiled for an H100 (sm_90) without a GPU: every access to
the cached rows, the fresh rows and the output is a 16-byte vector, each read or written once;
no local or shared memory. The only narrower accesses are the int32 row map and staleness
counters (one value per row). Odd hidden sizes compile too, with scalar accesses (a row then
starts at an address that is not 16-byte aligned). See tests/test_ptx.py for the method."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from test_ptx import _TOOLCHAIN, TARGET, _compilable, _ptx_global_accesses, _ptxas_report  # noqa: E402

pytestmark = pytest.mark.skipif(_TOOLCHAIN is None, reason="triton's CUDA backend is not in this wheel")

from triton.compiler.compiler import ASTSource  # noqa: E402

from foca_kernels.ops import triton_tokens as tt  # noqa: E402

KERNEL = _compilable(tt, "_tokens_kernel")
_T = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DIV16 = [["tt.divisibility", 16]]
# (state dtype, feature/out dtype, hidden size)
CASES = {
    "fp32-dit1152": (torch.float32, torch.float32, 1152),
    "bf16-dit1152": (torch.bfloat16, torch.bfloat16, 1152),
    "fp16-flux3072": (torch.float16, torch.float16, 3072),
    "bf16-flux3072": (torch.bfloat16, torch.bfloat16, 3072),
}


def _compile(state_dtype, io_dtype, c, n_rows=4096):
    mp = pytest.MonkeyPatch()
    mp.setattr(tt, "interpreted", lambda: False)  # the launch configuration of a CUDA call
    try:
        rows, block_c, num_warps = tt.launch_config(n_rows, c)
    finally:
        mp.undo()
    s, io = "*" + _T[state_dtype], "*" + _T[io_dtype]
    sig = {"state_ptr": s, "fresh_ptr": io, "out_ptr": io, "src_ptr": "*i32", "age_ptr": "*i32", "n_rows": "i32",
           "C": "i32", "ROWS": "constexpr", "BLOCK_C": "constexpr", "HAS_AGE": "constexpr"}
    # as triton's runtime specialises CUDA tensors (16-byte aligned) and ints divisible by 16
    attrs = {(i,): list(_DIV16) for i in range(5)}
    for i, v in ((5, n_rows), (6, c)):
        if v % 16 == 0:
            attrs[(i,)] = list(_DIV16)
    src = ASTSource(fn=KERNEL, signature=sig, constexprs={"ROWS": rows, "BLOCK_C": block_c, "HAS_AGE": 1}, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps}), rows * block_c // (32 * num_warps)


@pytest.mark.parametrize("case", list(CASES))
def test_row_accesses_are_16_byte_vectors(case):
    state_dtype, io_dtype, c = CASES[case]
    ck, per_thread = _compile(state_dtype, io_dtype, c)
    acc = _ptx_global_accesses(ck.asm["ptx"])
    s_bytes = per_thread * torch.empty((), dtype=state_dtype).element_size()
    io_bytes = per_thread * torch.empty((), dtype=io_dtype).element_size()
    vec = [op for op, n, _ in acc if n == 16]
    # state + fresh read, output + state written, each once, in 16-byte pieces
    assert (vec.count("ld"), vec.count("st")) == ((s_bytes + io_bytes) // 16, (io_bytes + s_bytes) // 16)
    narrow = [(op, n, line) for op, n, line in acc if n != 16]
    assert all(n in (4, 8) and re.search(r"\.[bsu]32\b", line) for _, n, line in narrow), narrow
    # per row segment a thread holds: the row map (loaded in up to two register layouts), one
    # counter load and one counter store
    segments = per_thread // (16 // max(torch.empty((), dtype=d).element_size() for d in (state_dtype, io_dtype)))
    assert len(narrow) <= 4 * segments, f"only the row map and the counters may be narrow: {narrow}"
    assert ck.metadata.shared == 0


@pytest.mark.parametrize("case", list(CASES))
def test_no_local_memory_or_spills(case):
    ck, _ = _compile(*CASES[case])
    ptx = ck.asm["ptx"]
    assert not [line for line in ptx.splitlines() if ".local" in line or "__local_depot" in line]
    report = _ptxas_report(ptx)
    assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\b", report), report


def test_odd_hidden_size_compiles_with_scalar_accesses():
    ck, _ = _compile(torch.float32, torch.float32, 41)
    acc = _ptx_global_accesses(ck.asm["ptx"])
    assert acc and all(n == 4 for _, n, _ in acc)
