"""Generated code for the fused update on CPU: one C loop, compiled at run time.

``lincomb_torch`` on CPU hands the whole update to :func:`lincomb_cpu` when it can: one pass
over the elements in 2048-element blocks, fp32 accumulation, one rounding per output (torch's
own round-to-nearest-even conversions), zero coefficients not terms, equal rows formed once,
in-place overwrites of input slots safe, non-temporal stores for large calls. The C source,
lincomb.c beside this module (shipped as package data), is compiled once per process, on the
first CPU update, with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``;
``-O2 -ftree-vectorize -march=native``, retried without ``-march=native``) in a temporary
directory, and loaded with ctypes. Nothing is compiled per signature: the loop takes any number
of inputs, rows and destinations and any mix of float32 / bfloat16 / float16, so new
coefficients, methods or dtypes never recompile. The first call's
cost (1.4-2.3 s on the project's 2-vCPU machine; ``compile_seconds`` after loading) is paid
once per process; see docs/benchmarks.md.

Without a compiler, when compiling fails, or with ``FOCA_KERNELS_CPU_CODEGEN=0``, the PyTorch
ops in torch_lincomb.py run instead (same results up to fp32 summation order); :func:`status`
says which path runs and why.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Optional

import torch
from torch.autograd.graph import increment_version

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lincomb.c")  # package data

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STREAM_BYTES = 8 << 20  # non-temporal stores once the call moves more than this (past L2, near L3)
BLOCK = 2048  # elements per block, as in lincomb.c
PARALLEL_GRAIN = 1 << 19  # elements per thread at least: with torch's threads > 1, large calls
# are split into that many contiguous ranges, one Python thread each (spawned per call: no pool
# to go stale across fork); below this a thread costs more than it saves
ENV = "FOCA_KERNELS_CPU_CODEGEN"
OPT = ["-O2", "-ftree-vectorize"]  # as fast here as -O3, and compiles in a third of the time

_lock = threading.Lock()
_lib = None
_tried = False
_reason = "not loaded yet"
compile_seconds: Optional[float] = None  # how long the first call spent compiling and loading


_OFF = ("0", "false", "off", "no")


def _enabled() -> bool:
    v = os.environ.get(ENV)
    return v is None or v.strip().lower() not in _OFF


def _compilers():
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    names += ["cc", "gcc", "clang"]
    seen = []
    for name in names:
        path = shutil.which(name)
        if path and path not in seen:
            seen.append(path)
    return seen


def _build():
    """Compile lincomb.c and load it; returns (library, reason)."""
    compilers = _compilers()
    if not compilers:
        return None, "no C compiler found (looked for $CC, cc, gcc, clang)"
    if not os.path.isfile(SOURCE_PATH):
        return None, f"the C source {SOURCE_PATH} is missing (package data not installed)"
    tmp = tempfile.mkdtemp(prefix="foca_kernels_cpu_")
    src = os.path.join(tmp, "lincomb.c")
    shutil.copyfile(SOURCE_PATH, src)  # compiled from a private copy, as the library is built there
    errors = []
    try:
        for cc in compilers:
            for arch in (["-march=native"], []):
                so = os.path.join(tmp, f"lincomb{len(errors)}.so")
                cmd = [cc, *OPT, *arch, "-fno-trapping-math", "-std=c11", "-shared", "-fPIC", src, "-o", so]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as e:
                    errors.append(f"{' '.join(cmd)}: {e}")
                    continue
                if r.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {r.stderr.strip()[-300:]}")
                    continue
                try:
                    lib = ctypes.CDLL(so)
                except OSError as e:
                    errors.append(f"loading {so}: {e}")
                    continue
                fn = lib.foca_lincomb
                fn.restype = ctypes.c_int
                fn.argtypes = [
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                ]
                fit = lib.foca_fit
                fit.restype = ctypes.c_int
                fit.argtypes = [
                    ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p, ctypes.c_int,
                ]
                skip8 = lib.foca_fp8_skip
                skip8.restype = ctypes.c_int
                skip8.argtypes = [
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                ]
                full8 = lib.foca_fp8_full
                full8.restype = ctypes.c_int
                full8.argtypes = [
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                ]
                return lib, f"compiled with {' '.join(cmd[:-4])}"
        return None, "compiling failed: " + " | ".join(errors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a loaded library stays mapped


def load():
    """The compiled library, compiling it on the first call of the process; None if unavailable."""
    global _lib, _tried, _reason, compile_seconds
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            t0 = time.perf_counter()
            try:
                _lib, _reason = _build()
            except Exception as e:  # never let the fast path break the fallback
                _lib, _reason = None, f"compiling failed: {type(e).__name__}: {e}"
            compile_seconds = time.perf_counter() - t0
            _tried = True
    return _lib


def status() -> str:
    """Whether the generated CPU code is used, and why (or why not)."""
    if not _enabled():
        return f"off ({ENV}=0): plain PyTorch ops"
    if not _tried:
        return "not loaded yet (compiled on the first CPU update)"
    if _lib is None:
        return f"unavailable, plain PyTorch ops: {_reason}"
    t = f" in {compile_seconds:.2f} s" if compile_seconds is not None else ""
    return f"in use ({_reason}{t})"


def _flat_code(t, n: int):
    """The loop's dtype code of a contiguous CPU tensor of n elements, else None."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        return None
    return code


_LAYOUT_CACHE = 256  # call structures kept (a model has a handful: one per method and step kind)
_layouts: dict = {}
_fit_layouts: dict = {}  # the same for fit_cpu


def _layout(ptrs, in_dt, dst_ptrs, dst_codes, coef):
    """The pointer-independent part of a call: the order in which ``ptrs + dst_ptrs`` are
    handed to the loop (destinations grouped by distinct row), the meta and coefficient
    arrays, and the bytes moved per element."""
    n_in = len(ptrs)
    targets: dict = {}  # distinct row -> indices of its destinations
    for j in range(len(dst_ptrs)):
        targets.setdefault(tuple(coef[j * n_in : (j + 1) * n_in]), []).append(j)
    order, flat_coef, row_start, dsts_dt, row_copy, row_hazard = list(range(n_in)), [], [0], [], [], []
    written, read = set(dst_ptrs), set(ptrs)
    for r, ds in targets.items():
        row_hazard.append(1 if any(dst_ptrs[j] in read for j in ds) else 0)
        flat_coef.extend(r)
        row_start.append(row_start[-1] + len(ds))
        for j in ds:
            order.append(n_in + j)
            dsts_dt.append(dst_codes[j])
        nz = [j for j, c in enumerate(r) if c != 0.0]
        copy = -1
        if len(nz) == 1 and r[nz[0]] == 1.0:
            j = nz[0]
            if ptrs[j] not in written and all(dst_codes[d] == in_dt[j] for d in ds):
                copy = j
        row_copy.append(copy)
    meta = in_dt + row_start + dsts_dt + row_copy + row_hazard
    bytes_per_elem = sum(2 if c else 4 for c in in_dt) + sum(2 if c else 4 for c in dsts_dt)
    return (order, (ctypes.c_int * len(meta))(*meta), (ctypes.c_float * len(flat_coef))(*flat_coef),
            len(targets), len(dsts_dt), bytes_per_elem)


def lincomb_cpu(slots, feature, out, n, reads, writes, coef) -> bool:
    """``lincomb_torch``'s update with the compiled loop, straight from data pointers (no
    tensor views: on small tensors the per-call cost is the Python around the loop). Returns
    False, having written nothing, when the compiled code cannot take this call (switched off,
    no compiler, a dtype it does not know, a non-contiguous tensor); the caller then runs the
    PyTorch ops."""
    if not _enabled():
        return False
    lib = _lib if _tried else load()
    if lib is None:
        return False
    if isinstance(coef, torch.Tensor):
        return False  # coefficients as a tensor: the PyTorch ops take them as they are
    code = DTYPE_CODES.get(slots.dtype)
    if code is None or slots.dim() != 2 or slots.stride(1) != 1 or slots.device.type != "cpu":
        return False
    rows, width = slots.shape
    if n > width or any(not 0 <= r < rows for r in (*reads, *writes)):
        return False  # the PyTorch ops raise the proper error
    size = slots.element_size()
    base, row = slots.data_ptr(), slots.stride(0) * size
    ptrs = [base + r * row for r in reads]
    in_dt = [code] * len(ptrs)
    fcode = ocode = fptr = optr = None
    if feature is not None:
        fcode = _flat_code(feature, n)
        if fcode is None:
            return False
        fptr = feature.data_ptr()
        ptrs.append(fptr)
        in_dt.append(fcode)
    dst_ptrs = [base + w * row for w in writes]
    dst_codes = [code] * len(dst_ptrs)
    if out is not None:
        ocode = _flat_code(out, n)
        if ocode is None:
            return False
        optr = out.data_ptr()
        dst_ptrs.append(optr)
        dst_codes.append(ocode)
    if n <= 0 or not dst_ptrs:
        return True
    # The layout repeats every step; it depends on the pointers only through which of them
    # coincide, and with the feature and out outside the slots (and apart) slot indices decide
    # that: then it is cached under the call's structure.
    end = base + rows * row
    structural = not ((fptr is not None and base <= fptr < end) or (optr is not None and base <= optr < end)
                      or (fptr is not None and fptr == optr))
    key = (code, tuple(reads), tuple(writes), tuple(coef), fcode, ocode) if structural else None
    lay = _layouts.get(key) if structural else None
    if lay is None:
        lay = _layout(ptrs, in_dt, dst_ptrs, dst_codes, coef)
        if structural:
            if len(_layouts) >= _LAYOUT_CACHE:
                _layouts.clear()
            _layouts[key] = lay
    order, meta, flat_coef, n_rows, n_dst, bytes_per_elem = lay
    every = ptrs + dst_ptrs
    args = (
        len(ptrs), n_rows, n_dst, (ctypes.c_void_p * len(order))(*[every[i] for i in order]),
        meta, flat_coef, 1 if n * bytes_per_elem > STREAM_BYTES else 0,
    )
    threads = min(torch.get_num_threads(), n // PARALLEL_GRAIN)
    if threads <= 1:
        rcs = [lib.foca_lincomb(0, n, *args)]
    else:  # contiguous ranges, a whole number of blocks each; ctypes releases the GIL
        step = -(-n // threads)
        step = -(-step // BLOCK) * BLOCK
        bounds = [(b, min(n, b + step)) for b in range(0, n, step)]
        rcs = [0] * len(bounds)

        def part(i):
            rcs[i] = lib.foca_lincomb(bounds[i][0], bounds[i][1], *args)

        workers = [threading.Thread(target=part, args=(i,), daemon=True) for i in range(1, len(bounds))]
        for w in workers:
            w.start()
        part(0)
        for w in workers:
            w.join()
    if any(rcs):
        raise MemoryError("foca_kernels: the compiled CPU update could not allocate its block buffers")
    # written behind autograd's back: bump the version counters as the in-place ops would
    if writes:
        increment_version(slots)
    if out is not None:
        increment_version(out)
    return True


def fit_cpu(slots, numel: int, feature, slot: int, inputs, coef, bounds, parallel: float) -> bool:
    """ops/fit.py's refit with the compiled two-pass loop (``foca_fit``; arguments: fit.flatten,
    then the parallel threshold); False, having written nothing, when the compiled code cannot
    take the call (the caller runs the PyTorch ops)."""
    if not _enabled():
        return False
    lib = _lib if _tried else load()
    if lib is None:
        return False
    code = DTYPE_CODES.get(slots.dtype)
    if code is None or slots.dim() != 2 or slots.stride(1) != 1 or slots.device.type != "cpu":
        return False
    rows, width = slots.shape
    if numel > width or not 0 <= slot < rows or any(not -1 <= k < rows for k in inputs) or slot in inputs:
        return False
    if -1 in inputs:  # the fit sees the feature as stored: other dtypes take the PyTorch ops
        if feature is None or _flat_code(feature, numel) != code:
            return False
    key = (tuple(inputs), tuple(coef), tuple(bounds), code)
    lay = _fit_layouts.get(key)
    if lay is None:  # the ctypes arrays of a call structure, made once
        lay = ((ctypes.c_int * len(inputs))(*([code] * len(inputs))), (ctypes.c_float * len(coef))(*coef),
               (ctypes.c_double * 6)(*bounds))
        if len(_fit_layouts) >= _LAYOUT_CACHE:
            _fit_layouts.clear()
        _fit_layouts[key] = lay
    codes, flat, bounds_c = lay
    base, stride = slots.data_ptr(), slots.stride(0) * slots.element_size()
    ptrs = [feature.data_ptr() if k == -1 else base + k * stride for k in inputs]
    rc = lib.foca_fit(numel, len(inputs), (ctypes.c_void_p * len(inputs))(*ptrs), codes, flat, bounds_c, parallel,
                      base + slot * stride, code)
    if rc:
        raise MemoryError("foca_kernels: the compiled CPU fit could not allocate its block buffers")
    increment_version(slots)
    return True


# ---- the fp8 state (foca_kernels/fp8.py): foca_fp8_skip / foca_fp8_full of lincomb.c ----
FP8_MAX_TERMS = 16


def _cpu_contiguous(*ts) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in ts)


def fp8_skip_cpu(anchor, rows: int, c: int, a0: float, incs, scales, coefs, out) -> bool:
    """``out = a0 anchor + sum_d (coefs[d] scales[d]) incs[d]`` (ops/torch_fp8.py skip_torch)
    with the compiled loop; ``incs`` / ``scales``: one contiguous e4m3 / float32 row per term.
    False, having written nothing, when the compiled code cannot take the call."""
    if not _enabled() or len(incs) > FP8_MAX_TERMS:
        return False
    lib = _lib if _tried else load()
    if lib is None or out.dtype not in DTYPE_CODES or anchor.dtype not in DTYPE_CODES:
        return False
    if not _cpu_contiguous(anchor, out, *incs, *scales):
        return False
    nd = len(incs)
    rc = lib.foca_fp8_skip(rows, c, anchor.data_ptr(), DTYPE_CODES[anchor.dtype], float(a0), nd,
                           (ctypes.c_void_p * max(nd, 1))(*[t.data_ptr() for t in incs]),
                           (ctypes.c_void_p * max(nd, 1))(*[t.data_ptr() for t in scales]),
                           (ctypes.c_float * max(nd, 1))(*coefs), out.data_ptr(), DTYPE_CODES[out.dtype])
    if rc:
        return False
    increment_version(out)
    return True


def fp8_full_cpu(feature, rows: int, c: int, anchor, inc, scale) -> bool:
    """The fp8 state's full step (ops/torch_fp8.py full_torch) with the compiled loop; ``inc``
    / ``scale`` None before the first increment. False, having written nothing, when the
    compiled code cannot take the call."""
    if not _enabled():
        return False
    lib = _lib if _tried else load()
    if lib is None or feature.dtype not in DTYPE_CODES or anchor.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not _cpu_contiguous(feature, anchor, *(() if inc is None else (inc, scale))):
        return False
    has_prev = inc is not None
    lib.foca_fp8_full(rows, c, feature.data_ptr(), DTYPE_CODES[feature.dtype], anchor.data_ptr(),
                      DTYPE_CODES[anchor.dtype], int(has_prev), inc.data_ptr() if has_prev else None,
                      scale.data_ptr() if has_prev else None)
    increment_version(anchor)
    return True
