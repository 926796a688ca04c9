"""Compile the fused Triton kernel for an H100 (sm_90) without a GPU, and check its code.

For every launch the real rules produce (FoCa r0 skip/full, r3 skip, TaylorSeer-3 skip, reuse; a
closed-form full step is reuse's launch, r4's skip is r0's), in
fp32, fp16, bf16 and a bf16 state with fp32 features, at a DiT-XL/2-sized and a FLUX-sized
feature (the launcher picks BLOCK=1024/4 warps and BLOCK=2048/8 warps for them):

* every global load and store in the PTX is a 16-byte vector access, and there are exactly
  as many as it takes to read each input and write each output once;
* no local memory: no ld.local/st.local or local depot in the PTX, ptxas reports a 0-byte
  stack frame and no spill stores/loads, and the SASS has no LDL/STL;
* no shared memory either (an elementwise kernel needs none), except one known case marked
  xfail: a 16-bit state with fp32 features on a skipped step (see _LAYOUT_CONVERSION).

A feature whose numel is not a multiple of 16 keeps its 16-byte body and adds one scalar
access per tensor for the tail (see test_odd_sized_feature_is_vectorised).

How the launches are obtained: a state of the real size is allocated on the meta device (no
memory), driven to its steady state through CacheState.plan/commit (bookkeeping only), and the
real launcher ``lincomb_triton`` is called with ``_lincomb_kernel`` replaced by a recorder, so
the grid, arguments and BLOCK/num_warps are exactly what a CUDA call would launch. Those
arguments are turned into the compiler's (signature, constexprs, attrs) the way triton's
runtime JIT does it for aligned CUDA tensors (``_specialisation`` below; one test checks it
against triton's own binder), then compiled with ``triton.compile(..., target=GPUTarget)``.
Nothing is launched, so no driver or GPU is needed; the test skips only when triton's CUDA
backend (its compiler module, ptxas, cuobjdump) is missing from the wheel.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
import types

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _cuda_toolchain():
    """(sm arch name, ptxas path, cuobjdump path), or None when the wheel lacks them."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        tools = (knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path)
    except Exception:  # backend module or its bundled binaries not importable/found
        return None
    if not all(p and os.path.isfile(p) and os.access(p, os.X_OK) for p in tools):
        return None
    return (sm_arch_from_capability(90),) + tools


_TOOLCHAIN = _cuda_toolchain()
pytestmark = pytest.mark.skipif(
    _TOOLCHAIN is None, reason="triton's CUDA backend (compiler, ptxas, cuobjdump) is not in this wheel"
)

import foca_kernels as fk  # noqa: E402
from foca_kernels.ops import triton_lincomb as tlc  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100
VECTOR_BYTES = 16

# The kernel for the compiler: under TRITON_INTERPRET=1 (tests/conftest.py) @triton.jit
# returns an InterpretedFunction, which only runs on CPU tensors and cannot be compiled.
# Both it and the JITFunction that @triton.jit returns otherwise keep the undecorated Python
# function in ``.fn``; wrapping that in a fresh JITFunction gives exactly the object the
# decorator would have built with the interpreter off. The code generator only reads its
# source, globals and parameter list, and triton.compile does not consult TRITON_INTERPRET.
# (The interpreter patches triton.language only for the duration of a launch and restores it
# afterwards, so interpreted launches earlier in the session do not leak into compilation.)
# The kernel calls a @triton.jit helper, which the code generator resolves through the
# kernel's globals: every jitted function of the module is rebuilt as a JITFunction over a
# copy of those globals, so helpers resolve to compilable functions too.
def _compilable(module, name):
    g = dict(vars(module))
    for key, val in vars(module).items():
        fn = getattr(val, "fn", None)
        if isinstance(fn, types.FunctionType) and type(val).__name__ in ("JITFunction", "InterpretedFunction"):
            clone = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
            clone.__annotations__ = dict(fn.__annotations__)  # tl.constexpr marks live here
            g[key] = JITFunction(clone)
    return g[name]


KERNEL = _compilable(tlc, "_lincomb_kernel")

# name: (method, options, step, (NUM_READ, HAS_FEAT, NUM_WRITE, HAS_OUT) the planner must give)
RULES = {
    "foca_skip": ("foca", {"anchor": "secant"}, "skip", (3, 0, 1, 1)),
    "foca_full": ("foca", {"anchor": "secant"}, "full", (1, 1, 2, 0)),
    "foca_bdf2_full": ("foca", {"anchor": "bdf2"}, "full", (2, 1, 2, 0)),
    "foca_r3_skip": ("foca", {"reading": "r3"}, "skip", (3, 0, 0, 1)),  # closed form: state stays
    "taylorseer3_skip": ("taylorseer", {"order": 3}, "skip", (4, 0, 0, 1)),
    "reuse_skip": ("reuse", {}, "skip", (1, 0, 0, 1)),
    "reuse_full": ("reuse", {}, "full", (0, 1, 1, 0)),
}
# (state dtype, feature/out dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16state_fp32io": (torch.bfloat16, torch.float32),
}
SIZES = {"dit256": (256, 1152), "flux1024": (4608, 3072)}
_ODD_SIZE = (333, 41)  # numel 13653, not a multiple of 16

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DIV16 = [["tt.divisibility", 16]]


# ---- launches as the real rules produce them -------------------------------------------------
class _Recorder:
    """Stands in for ``_lincomb_kernel``: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _steady_state_launch(rule: str, size: str, dtypes: str):
    """(grid, args, kwargs) of the CUDA launch for ``rule`` once the state is warmed up."""
    method, options, step, expected = RULES[rule]
    state_dtype, io_dtype = DTYPES[dtypes]
    example = torch.empty(_ODD_SIZE if size == "odd" else SIZES[size], dtype=io_dtype, device="meta")
    buf = fk.allocate(example, method, dtype=state_dtype, **options)
    # Warm up by bookkeeping only: enough full steps to define every role, then a skip.
    for kind in ["full"] * 4 + ["skip"]:
        t = 0.0 if buf.t is None else buf.t + 1.0
        tr = buf.method.full(buf.context(t)) if kind == "full" else buf.method.skip(buf.context(t))
        buf.commit(buf.plan(tr, t), t, full=kind == "full")
    t = buf.t + 1.0
    tr = buf.method.full(buf.context(t)) if step == "full" else buf.method.skip(buf.context(t))
    launch = buf.plan(tr, t)
    shape = (len(launch.reads), int(launch.has_feature), len(launch.writes), int(launch.has_out))
    assert shape == expected, f"{rule}: planner gave (reads, feat, writes, out) = {shape}, expected {expected}"

    feature = torch.empty(buf.numel, dtype=io_dtype, device="meta") if launch.has_feature else None
    out = torch.empty(buf.numel, dtype=io_dtype, device="meta") if launch.has_out else None
    rec = _Recorder()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(tlc, "_lincomb_kernel", rec)
        mp.setattr(tlc, "interpreted", lambda: False)  # launch configuration of a CUDA call
        tlc.lincomb_triton(buf.slots, feature, out, buf.numel, launch.reads, launch.writes, launch.coef)
    finally:
        mp.undo()
    assert len(rec.calls) == 1, "one fused launch per step"
    return rec.calls[0]


# ---- what triton's runtime would compile for those arguments ---------------------------------
def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    if 2**31 <= v < 2**32:
        return "u32"
    if -(2**63) <= v < 2**63:
        return "i64"
    return "u64"


def _specialisation(args, kwargs, kernel=None, dtype_names=None):
    """(signature, constexprs, attrs, options) for ``triton.compile``, built the way
    triton/runtime/jit.py does for a launch on CUDA tensors from PyTorch's allocator.
    ``kernel``: the compilable kernel (default: the fused one); ``dtype_names``: tensor dtype ->
    triton type name (default: the float dtypes; the grouped kernel adds int64).

    * tensors -> "*<dtype>" with tt.divisibility=16 (data_ptr % 16 == 0: CUDA allocations
      are 256-byte aligned; the feature, out and the slot allocation are whole tensors);
    * ints -> i32/i64 by range, divisibility 16 when value % 16 == 0 (BaseBackend.
      get_int_specialization); floats -> "fp32", never specialised;
    * a tuple argument -> a tuple of its elements' types in the signature, and attrs keyed
      by the path (argument index, element index), e.g. (4, 0) for read_offs[0];
    * constexprs keyed by parameter name (ASTSource maps them to (index,)).
    """
    kernel = KERNEL if kernel is None else kernel
    dtype_names = _TRITON_DTYPE if dtype_names is None else dtype_names
    names = kernel.arg_names
    values = list(args) + [kwargs[k] for k in names[len(args):]]
    signature, constexprs, attrs = {}, {}, {}

    def one(path, v):
        if isinstance(v, torch.Tensor):
            attrs[path] = list(_DIV16) if v.data_ptr() % 16 == 0 else []
            return "*" + dtype_names[v.dtype]
        if isinstance(v, bool):
            return "u1"
        if isinstance(v, int):
            attrs[path] = list(_DIV16) if v % 16 == 0 else []
            return _int_type(v)
        if isinstance(v, float):
            return "fp32"
        if isinstance(v, tuple):
            return tuple(one(path + (i,), x) for i, x in enumerate(v))
        raise TypeError(f"no rule for {type(v).__name__}")

    for i, (name, v) in enumerate(zip(names, values)):
        if kernel.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
        else:
            signature[name] = one((i,), v)
    options = {k: v for k, v in kwargs.items() if k not in names}
    return signature, constexprs, attrs, options


def compile_launch(kernel, args, kwargs, dtype_names=None):
    """The sm_90 binary triton's runtime would build for ``kernel[grid](*args, **kwargs)``."""
    signature, constexprs, attrs, options = _specialisation(args, kwargs, kernel, dtype_names)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


@functools.lru_cache(maxsize=None)
def _compiled(rule: str, size: str, dtypes: str):
    grid, args, kwargs = _steady_state_launch(rule, size, dtypes)
    return compile_launch(KERNEL, args, kwargs), args, kwargs


# ---- reading the generated code --------------------------------------------------------------
# ld.global[.qualifiers][.vN].<type><bits>, e.g. "ld.global.v4.b32" (16 bytes: also the form
# 8 packed fp16/bf16 values take) or "ld.global.b16" (one 16-bit value).
_PTX_GLOBAL = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d+))?\.[bfsu](\d+)\b")
_SASS_GLOBAL = re.compile(r"\b(LDG|STG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")


def _ptx_global_accesses(ptx: str):
    """[(op, bytes, line)] for every global load/store in the PTX."""
    found = []
    for line in ptx.splitlines():
        m = _PTX_GLOBAL.search(line)
        if m:
            op, vec, bits = m.group(1), int(m.group(2) or 1), int(m.group(3))
            found.append((op, vec * bits // 8, line.strip()))
    return found


def _ptxas_report(ptx: str) -> str:
    """ptxas -v for the PTX triton produced (triton runs it too but discards the log)."""
    arch, ptxas, _ = _TOOLCHAIN
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
            capture_output=True, text=True, check=True,
        )
    return res.stdout + res.stderr


def _case_id(rule, size, dtypes):
    return f"{rule}-{size}-{dtypes}"


CASES = [(r, s, d) for r in RULES for s in SIZES for d in DTYPES]


def _expected_vector_accesses(kwargs, dtypes):
    """(loads, stores) of 16 bytes a thread needs to read each input and write each output once."""
    per_thread = kwargs["BLOCK"] // (32 * kwargs["num_warps"])
    state_dtype, io_dtype = DTYPES[dtypes]
    s_bytes = per_thread * torch.empty((), dtype=state_dtype).element_size()
    io_bytes = per_thread * torch.empty((), dtype=io_dtype).element_size()
    loads = (kwargs["NUM_READ"] * s_bytes + kwargs["HAS_FEAT"] * io_bytes) // VECTOR_BYTES
    stores = (kwargs["NUM_WRITE"] * s_bytes + kwargs["HAS_OUT"] * io_bytes) // VECTOR_BYTES
    return loads, stores


def _check_vectorised(ck, kwargs, dtypes):
    ptx = ck.asm["ptx"]
    accesses = _ptx_global_accesses(ptx)
    narrow = [line for _, nbytes, line in accesses if nbytes != VECTOR_BYTES]
    assert not narrow, f"{len(narrow)} global accesses are not {VECTOR_BYTES}-byte vectors:\n" + "\n".join(narrow[:20])

    # Each input read once and each output written once, all in 16-byte pieces.
    loads, stores = _expected_vector_accesses(kwargs, dtypes)
    n_ld = sum(op == "ld" for op, _, _ in accesses)
    n_st = sum(op == "st" for op, _, _ in accesses)
    assert (n_ld, n_st) == (loads, stores), f"expected {loads} loads and {stores} stores, PTX has {n_ld} and {n_st}"

    # The machine code keeps them: 128-bit LDG/STG only.
    sass = ck.asm["sass"]
    ldst = [(m.group(1), m.group(2), line.strip())
            for line in sass.splitlines() for m in [_SASS_GLOBAL.search(line)] if m]
    ops = [op for op, _, _ in ldst]
    assert (ops.count("LDG"), ops.count("STG")) == (loads, stores), "\n".join(line for _, _, line in ldst)
    wrong = [line for _, mods, line in ldst if ".128" not in mods]
    assert not wrong, "SASS global accesses that are not 128-bit:\n" + "\n".join(wrong)


@pytest.mark.parametrize("rule,size,dtypes", CASES, ids=[_case_id(*c) for c in CASES])
def test_global_accesses_are_16_byte_vectors(rule, size, dtypes):
    ck, _, kwargs = _compiled(rule, size, dtypes)
    _check_vectorised(ck, kwargs, dtypes)


@pytest.mark.parametrize("dtypes", ["bf16", "fp32"])
def test_odd_sized_feature_is_vectorised(dtypes):
    """numel % 16 != 0: the body (n rounded down to a multiple of 16) is still all 16-byte
    vectors; only the < 16-element tail, done by program 0, uses one scalar access per
    tensor (without the split, triton cannot prove 16-byte groups in bounds and every access
    of the kernel was scalar)."""
    ck, _, kwargs = _compiled("foca_skip", "odd", dtypes)
    assert kwargs["TAIL"] == 16
    accesses = _ptx_global_accesses(ck.asm["ptx"])
    vec = [(op, line) for op, nbytes, line in accesses if nbytes == VECTOR_BYTES]
    scalar = [(op, nbytes, line) for op, nbytes, line in accesses if nbytes != VECTOR_BYTES]
    loads, stores = _expected_vector_accesses(kwargs, dtypes)
    assert ([op for op, _ in vec].count("ld"), [op for op, _ in vec].count("st")) == (loads, stores)
    n_in = kwargs["NUM_READ"] + kwargs["HAS_FEAT"]
    n_out = kwargs["NUM_WRITE"] + kwargs["HAS_OUT"]
    esize = torch.empty((), dtype=DTYPES[dtypes][0]).element_size()
    assert sorted(op for op, _, _ in scalar) == ["ld"] * n_in + ["st"] * n_out, "\n".join(line for *_, line in scalar)
    assert all(nbytes == esize for _, nbytes, _ in scalar), "\n".join(line for *_, line in scalar)


@pytest.mark.parametrize("rule,size,dtypes", CASES, ids=[_case_id(*c) for c in CASES])
def test_no_local_memory_or_spills(rule, size, dtypes):
    ck, _, _ = _compiled(rule, size, dtypes)
    assert_no_local_memory(ck)


def assert_no_local_memory(ck) -> None:
    """No local memory in the PTX, a 0-byte stack frame and no spills (ptxas), no LDL/STL."""
    ptx = ck.asm["ptx"]
    local = [line.strip() for line in ptx.splitlines() if ".local" in line or "__local_depot" in line]
    assert not local, "local memory in the PTX:\n" + "\n".join(local)
    report = _ptxas_report(ptx)
    assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\b", report), report
    assert not re.search(r"\b(LDL|STL)\b", ck.asm["sass"]), "local loads/stores in the SASS"


# A 16-bit state with fp32 features: on a skipped step the state's loads get 8 elements per
# thread (16 bytes of bf16) but triton's coalescing pass caps every *store* at 16 bytes per
# thread, so the fp32 out store gets 4; the result then moves between the two layouts through
# shared memory (st.shared + bar.sync + ld.shared, 2-8 KiB per program). Global traffic is
# unchanged and still 16-byte vectors; this only costs a round trip through shared memory.
_LAYOUT_CONVERSION = pytest.mark.xfail(
    strict=True,
    reason="16-bit state with fp32 out: fp32 stores are capped at 4 elements/thread, the 16-bit "
    "loads use 8, so the result goes through a shared-memory layout conversion",
)
SHARED_CASES = [
    pytest.param(
        *c, id=_case_id(*c),
        marks=[_LAYOUT_CONVERSION] if c[2] == "bf16state_fp32io" and RULES[c[0]][2] == "skip" else [],
    )
    for c in CASES
]


@pytest.mark.parametrize("rule,size,dtypes", SHARED_CASES)
def test_no_shared_memory_round_trip(rule, size, dtypes):
    ck, _, _ = _compiled(rule, size, dtypes)
    shared = [line.strip() for line in ck.asm["ptx"].splitlines() if re.search(r"\b(ld|st)\.shared|\bbar\.sync", line)]
    assert ck.metadata.shared == 0 and not shared, (
        f"an elementwise kernel should not use shared memory; uses {ck.metadata.shared} B:\n" + "\n".join(shared)
    )


@pytest.mark.parametrize("rule", list(RULES))
def test_specialisation_matches_triton_runtime(rule):
    """The signature/attrs compiled above are what triton's own JIT binder derives from the
    same launch (private triton API: a failure here after a triton upgrade means the mirror
    in _specialisation must follow the runtime again)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(TARGET)
    binder = create_function_from_signature(KERNEL.signature, KERNEL.params, backend)
    for size, dtypes in [(s, d) for s in SIZES for d in DTYPES] + [("odd", "bf16")]:
        # meta tensors report data_ptr() == 0: aligned, like CUDA allocations
        _, args, kwargs = _steady_state_launch(rule, size, dtypes)
        bound, spec, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = KERNEL._pack_args(backend, dict(kwargs), bound, spec, options)
        mine_sig, mine_cx, mine_attrs, mine_opts = _specialisation(args, kwargs)
        assert signature == mine_sig
        assert {(KERNEL.arg_names.index(k),): v for k, v in mine_cx.items()} == constexprs
        assert {k: v for k, v in attrs.items() if v} == {k: v for k, v in mine_attrs.items() if v}
        assert opts.num_warps == mine_opts["num_warps"]
