"""Time one cache step (a skipped step's forecast or a full step's update) per provider.

    python -m pytest bench -p no:cacheprovider

Providers:
  fused       foca_kernels.forecast_ / update_ on the benchmark device: the Triton kernel on
              CUDA, the fused PyTorch path on CPU (never the Triton interpreter)
  reference   reference/ (FoCaRef, FoCaRestartRef, TaylorSeerRef, ReuseRef), eager PyTorch, same dtype
  cache_dit   cache-dit's FoCa / TaylorSeer calibrators (optional extra "peers"; skipped
              when cache-dit is not installed; it has no plain-reuse calibrator)
  copy_floor  dst.copy_(src) over half the fused launch's bytes, so it reads and writes
              exactly the bytes the fused launch must move: the memory-bound floor

Every state is first driven to its steady state: four full steps, then skipped steps until a
skipped step's launch stops changing (one for every method but FoCa reading r4, whose first two
skips after a full step read three stored tensors and every later one four: its corrector pulls
toward the last computed value F_full, which shares F_prev's slot only until the second skip;
see ``_warmup_skips``). The timed call is then repeated, each repetition being one more step of
the same kind, and the launch is checked to be the same after the timing. Bytes moved
are the fused launch's (``CacheState.plan(...).tensors_moved`` tensors of numel elements) for
every provider, so GB/s is an effective bandwidth and "fraction of floor" = copy time / time.
Both use each benchmark's fastest round and the copy's fastest round, the copy timed right
after the benchmark: on a shared machine disturbances only add time. Medians are recorded too.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Optional

import pytest

import torch

import foca_kernels as fk
from foca_kernels.methods import FOCA_STUDY_READINGS, make_foca
from reference import make_ref

# op: (method, options, step), as the reference names them (the package builds a study reading,
# r4, as a Method: _package_method)
OPS = {
    "foca_skip": ("foca", {"anchor": "secant"}, "skip"),  # reading r0
    "foca_full": ("foca", {"anchor": "secant"}, "full"),
    "foca_r3_skip": ("foca", {"reading": "r3"}, "skip"),  # closed form (r6 and r7, the default, move the same tensors)
    "foca_r3_full": ("foca", {"reading": "r3"}, "full"),
    "foca_r4_skip": ("foca", {"reading": "r4"}, "skip"),  # a study reading: its state moves on skipped steps
    "foca_calibrated_skip": ("foca", {"reading": "calibrated"}, "skip"),  # the default: X0 + x Y
    "foca_calibrated_full": ("foca", {"reading": "calibrated"}, "full"),  # the copy plus the fit (two passes)
    "taylorseer2_skip": ("taylorseer", {"order": 2}, "skip"),
    "taylorseer2_full": ("taylorseer", {"order": 2}, "full"),
    "reuse_skip": ("reuse", {}, "skip"),
    "reuse_full": ("reuse", {}, "full"),
}
SIZES = {
    "dit-xl2-256px": (256, 1152),  # DiT-XL/2 at 256x256: 256 tokens x 1152
    "flux-1024px": (4608, 3072),  # FLUX at 1024x1024: 4096 image + 512 text tokens x 3072
    "video-100k": (100_000, 3072),  # a video DiT: ~100k tokens x 3072
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("fused", "reference", "cache_dit", "copy_floor")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL_WARMUP = 4  # full steps before the skips that end the warm-up: every role is defined
MAX_WARMUP_SKIPS = 8  # skips looked at for a launch that stops changing
ROUND_BUDGET_S = 0.4 if DEVICE.type == "cpu" else 0.2  # time per benchmark, roughly
MIN_ROUNDS, MAX_ROUNDS = 3, 200


def _video_enabled() -> bool:
    if os.environ.get("FOCA_BENCH_VIDEO") is not None:
        return os.environ["FOCA_BENCH_VIDEO"] == "1"
    return DEVICE.type == "cuda" and torch.cuda.get_device_properties(DEVICE).total_memory >= 40 * 2**30


def _cases():
    sizes = [s for s in SIZES if s != "video-100k" or _video_enabled()]
    dtypes = [d.strip() for d in os.environ.get("FOCA_BENCH_DTYPES", "bf16,fp32").split(",") if d.strip()]
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise ValueError(f"FOCA_BENCH_DTYPES: unknown {sorted(unknown)}, expected some of {sorted(DTYPES)}")
    cases = []
    for op in OPS:
        for size in sizes:
            for dtype in dtypes:
                for provider in PROVIDERS:
                    if provider == "cache_dit" and OPS[op][0] == "reuse":
                        continue
                    cases.append(pytest.param(op, size, dtype, provider, id=f"{op}-{size}-{dtype}-{provider}"))
    return cases


# ---- timing ----------------------------------------------------------------------------------
def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class _SyncEvery:
    """Calls ``fn``; on CUDA waits for the device after every ``k``-th call. pytest-benchmark's
    pedantic mode times ``k`` back-to-back calls per round, so the round ends only when the
    last launch has finished, without a host-device round trip between launches."""

    def __init__(self, fn, k: int):
        self.fn, self.k, self.n = fn, k, 0

    def __call__(self):
        self.fn()
        self.n += 1
        if self.n % self.k == 0:
            _sync()


def _plan(fn, budget_s: float = ROUND_BUDGET_S):
    """(iterations per round, rounds) from one timed call."""
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    est = max(time.perf_counter() - t0, 1e-7)
    iterations = 1 if DEVICE.type == "cpu" else max(1, min(1000, int(2e-3 / est)))
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s / (est * iterations))))
    return iterations, rounds


def _seconds(fn, budget_s: float) -> list:
    """Per-call times of ``fn`` over rounds, timed like the benchmarks."""
    iterations, rounds = _plan(fn, budget_s)
    target = _SyncEvery(fn, iterations)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iterations):
            target()
        times.append((time.perf_counter() - t0) / iterations)
    return times


def _copy_fn(nbytes: int):
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=DEVICE)  # touched: no page faults
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


# ---- providers -------------------------------------------------------------------------------

def _timed(benchmark, fn, nbytes: int, group: str, check=None) -> Optional[dict]:
    """Time ``fn`` (rounds from :func:`_plan`, synchronised), count host page faults per call,
    run ``check()`` (the state is still what the bytes were planned for), then time the copy
    floor of ``nbytes`` right after, under the same conditions (a shared machine drifts).
    The row's measured fields; None under --benchmark-disable."""
    iterations, rounds = _plan(fn)
    benchmark.group = group
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    benchmark.pedantic(_SyncEvery(fn, iterations), rounds=rounds, iterations=iterations, warmup_rounds=1)
    # Host page faults per call: on CPU, a fresh temporary above glibc's mmap threshold
    # (<= 32 MiB) faults in every page on each call, and whether an eager provider's
    # temporaries get recycled heap memory or fresh pages depends on the allocator's history.
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / ((rounds + 1) * iterations)
    if check is not None:
        check()
    if benchmark.stats is None:  # --benchmark-disable
        return None
    stats = benchmark.stats.stats
    floor = min(_seconds(_copy_fn(nbytes), ROUND_BUDGET_S / 2))
    return {
        "device": str(DEVICE),
        "threads": torch.get_num_threads() if DEVICE.type == "cpu" else None,
        "bytes_moved": nbytes,
        "min_s": stats.min,
        "median_s": stats.median,
        "gb_per_s": nbytes / stats.min / 1e9,  # from the least disturbed round
        "copy_floor_s": floor,
        "fraction_of_copy_floor": floor / stats.min,
        "page_faults_per_call": faults,
    }

def _features(shape, dtype):
    """(warm, x): x is the feature of the timed full steps, warm(i) the i-th warm-up feature
    (made on demand: at the video size each one is 1.2 GB in fp32)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float32, device=DEVICE).to(dtype)
    return (lambda i: x * (1.0 + 0.1 * (i % FULL_WARMUP))), x


def _next_launch(buf, step):
    t = buf.t + 1.0
    ctx = buf.context(t)
    return buf.plan(buf.method.full(ctx) if step == "full" else buf.method.skip(ctx), t)


def _package_method(op):
    """(method, options) of ``op`` for foca_kernels: a study reading (r4), which the package
    refuses by name, as its Method (docs/method.md, "Which reading to choose")."""
    method, options, _ = OPS[op]
    if method == "foca" and options.get("reading") in FOCA_STUDY_READINGS:
        return make_foca(**options), {}
    return method, dict(options)


def _fused(op, warm, x):
    method, options = _package_method(op)
    step = OPS[op][2]
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    buf = fk.allocate(x, method, **options)
    out = torch.empty_like(x)
    for i in range(FULL_WARMUP):
        fk.update_(buf, warm(i), 1.0, backend=backend)
    for _ in range(_warmup_skips(op)):
        fk.forecast_(buf, out, 1.0, backend=backend)
    if step == "full":
        fn = lambda: fk.update_(buf, x, 1.0, backend=backend)  # noqa: E731
    else:
        fn = lambda: fk.forecast_(buf, out, 1.0, backend=backend)  # noqa: E731
    return fn, buf


def _meta_state(op, kinds, shape=(16,), dtype=torch.float32):
    """A meta-device state (no memory, no work) driven through ``kinds`` as bookkeeping only."""
    method, options = _package_method(op)
    buf = fk.allocate(torch.empty(shape, dtype=dtype, device="meta"), method, **options)
    for kind in kinds:
        t = 0.0 if buf.t is None else buf.t + 1.0
        ctx = buf.context(t)
        buf.commit(buf.plan(buf.method.full(ctx) if kind == "full" else buf.method.skip(ctx), t), t, kind == "full")
    return buf


def _warmup_skips(op) -> int:
    """Skipped steps after the full warm-up, so that the next step of the timed kind is one the
    following steps repeat (same tensors read and written). For a skip op: the first skip k >= 1
    from which every skip up to MAX_WARMUP_SKIPS moves the same number of tensors. Every method
    but FoCa r4 gets k = 1; r4 gets 2: its skips 1 and 2 after a full step move 5 tensors (F_full
    is F_prev's slot), skips 3 on move 6 (F_full is read as a fourth tensor), so a run of
    skipped steps settles at 6 and the timed skip is that one. A full op: one skip."""
    if OPS[op][2] != "skip":
        return 1
    buf = _meta_state(op, ["full"] * FULL_WARMUP)
    moved = []
    for _ in range(MAX_WARMUP_SKIPS + 1):
        moved.append(_next_launch(buf, "skip").tensors_moved)
        t = buf.t + 1.0
        buf.commit(buf.plan(buf.method.skip(buf.context(t)), t), t, False)
    return next(i for i in range(1, len(moved)) if len(set(moved[i:])) == 1)


def _warmup_kinds(op):
    return ["full"] * FULL_WARMUP + ["skip"] * _warmup_skips(op)


def _steady_launch(op, shape, dtype):
    """The launch of a steady-state step, planned on a meta-device state: the same warm-up as
    the providers, as bookkeeping only."""
    return _next_launch(_meta_state(op, _warmup_kinds(op), shape, dtype), OPS[op][2])


def _reference(op, warm, x):
    method, options, step = OPS[op]
    ref = make_ref(method, **options)
    for i in range(FULL_WARMUP):
        ref.full(warm(i), 1.0)
    for _ in range(_warmup_skips(op)):
        ref.forecast(1.0)
    return (lambda: ref.full(x, 1.0)) if step == "full" else (lambda: ref.forecast(1.0))


def _cache_dit(op, warm, x):
    calibrators = pytest.importorskip(
        "cache_dit.caching.cache_contexts.calibrators", reason="cache-dit (optional extra 'peers') not installed"
    )
    method, options, step = OPS[op]
    if options.get("reading") == "calibrated":
        pytest.skip("cache-dit has no calibrated FoCa")
    if method == "foca":
        cal = calibrators.FoCaCalibrator()
    elif method == "taylorseer":
        cal = calibrators.TaylorSeerCalibrator(n_derivatives=options["order"])
    else:
        raise AssertionError(f"no cache-dit calibrator for {method}")
    # cache-dit's TaylorSeer defines its derivatives later than ours (only from its step 2 on,
    # and its first mark_step_begin precedes any state): give it full steps until all are set.
    for i in range(3 * FULL_WARMUP):
        cal.mark_step_begin()
        cal.update(warm(i))
        if i + 1 >= FULL_WARMUP and (method != "taylorseer" or all(
            d is not None for d in cal.states["default"].state["dY_current"]
        )):
            break
    else:
        raise AssertionError("cache-dit's TaylorSeer never defined all of its derivatives")
    cal.mark_step_begin()
    cal.approximate()
    if step == "full":

        def fn():
            cal.mark_step_begin()
            cal.update(x)

        return fn
    # A skip one step after the last full compute (cache-dit damps longer gaps differently);
    # approximate() rolls its state forward without advancing the step counter.
    return cal.approximate


# ---- the benchmark ---------------------------------------------------------------------------
@pytest.mark.parametrize("op,size,dtype,provider", _cases())
def test_step(benchmark, op, size, dtype, provider, foca_bench_rows):
    shape, torch_dtype = SIZES[size], DTYPES[dtype]
    warm, x = _features(shape, torch_dtype)
    numel = math.prod(shape)

    # Bytes the fused launch moves in the steady state (bookkeeping on a meta-device state).
    tensors_moved = _steady_launch(op, shape, torch_dtype).tensors_moved
    nbytes = tensors_moved * numel * x.element_size()
    buf = None
    if provider == "fused":
        fn, buf = _fused(op, warm, x)
        assert _next_launch(buf, OPS[op][2]).tensors_moved == tensors_moved
    elif provider == "reference":
        fn = _reference(op, warm, x)
    elif provider == "cache_dit":
        fn = _cache_dit(op, warm, x)
    else:
        fn = _copy_fn(nbytes)
    del warm

    def steady():  # still in the steady state the bytes were planned for
        if buf is not None:
            assert _next_launch(buf, OPS[op][2]).tensors_moved == tensors_moved

    info = _timed(benchmark, fn, nbytes, f"{op} {size} {dtype}", steady)
    if info is None:  # --benchmark-disable
        return
    info.update(backend=("triton" if DEVICE.type == "cuda" else "torch") if provider == "fused" else provider,
                numel=numel, tensors_moved=tensors_moved)
    benchmark.extra_info.update(info)
    foca_bench_rows.append({"op": op, "size": size, "dtype": dtype, "provider": provider, **info})


# ---- a model's full step: many streams in one grouped update (update_group_) vs one update_ each ----
# DiT-XL/2: 28 blocks x (attention, feed-forward) = 56 cached outputs of [2, 256, 1152] (batch 2:
# the two CFG halves); on CPU 32 tokens instead of 256 (the per-stream host work is what differs).
GROUP_STREAMS = 56
GROUP_SHAPE = (2, 256, 1152) if DEVICE.type == "cuda" else (2, 32, 1152)
GROUP_OPS = ("foca_calibrated_full", "foca_r3_full")  # the default (copy + fit) and a closed form (copy)


def _group_cases():
    dtypes = [d.strip() for d in os.environ.get("FOCA_BENCH_DTYPES", "bf16,fp32").split(",") if d.strip()]
    return [pytest.param(op, dtype, provider, id=f"{op}-x{GROUP_STREAMS}-{dtype}-{provider}")
            for op in GROUP_OPS for dtype in dtypes for provider in ("group", "loop")]


@pytest.mark.parametrize("op,dtype,provider", _group_cases())
def test_full_step_of_many_streams(benchmark, op, dtype, provider, foca_bench_rows):
    """provider "group": fk.update_group_ over every stream (O(1) launches per step); "loop": one
    fk.update_ per stream, as the hooks did before. Both in the steady state (the fit runs at
    every calibrated full step); bytes are the fused launches' (fit at its two-pass floor)."""
    method, options = _package_method(op)
    torch_dtype = DTYPES[dtype]
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    numel = math.prod(GROUP_SHAPE)
    base = _features(GROUP_SHAPE, torch_dtype)[1]
    xs = [base * (1.0 + 0.01 * i) for i in range(GROUP_STREAMS)]
    states = [fk.allocate(x, method, **options) for x in xs]
    for i in range(FULL_WARMUP):
        fk.update_group_(states, [x * (1.0 + 0.1 * i) for x in xs], 1.0, backend=backend)
    tensors_moved = _steady_launch(op, GROUP_SHAPE, torch_dtype).tensors_moved
    nbytes = GROUP_STREAMS * tensors_moved * numel * xs[0].element_size()
    if provider == "group":
        fn = lambda: fk.update_group_(states, xs, 1.0, backend=backend)  # noqa: E731
    else:
        def fn():
            for st, x in zip(states, xs):
                fk.update_(st, x, 1.0, backend=backend)

    info = _timed(benchmark, fn, nbytes, f"{op} x{GROUP_STREAMS} {GROUP_SHAPE} {dtype}")
    if info is None:  # --benchmark-disable
        return
    info.update(backend=backend, streams=GROUP_STREAMS, numel=numel, tensors_moved=tensors_moved)
    benchmark.extra_info.update(info)
    size = f"x{GROUP_STREAMS} " + "x".join(map(str, GROUP_SHAPE))
    foca_bench_rows.append({"op": op, "size": size, "dtype": dtype, "provider": provider, **info})


# ---- the stored precision of a skipped step: bf16 state vs fp8 state (16-bit anchor + e4m3 increments) ----
STATE_DTYPE_SIZES = ("dit-xl2-256px", "flux-1024px")


def _state_dtype_cases():
    return [pytest.param(size, state, id=f"taylorseer2_skip-{size}-bf16-{state}-state")
            for size in STATE_DTYPE_SIZES for state in ("bf16", "fp8")]


@pytest.mark.parametrize("size,state", _state_dtype_cases())
def test_skip_by_state_dtype(benchmark, size, state, foca_bench_rows):
    """The default method's skipped step of one bf16 stream with its state stored in bf16 or in
    fp8 (foca_kernels/fp8.py); bytes per bench/bytes_moved.py skip_bytes (what the launch reads
    plus the forecast it writes), so the two rows' GB/s and floors are each their own."""
    from bytes_moved import skip_bytes
    from foca_kernels.fp8 import FP8_DTYPE

    if state == "fp8" and FP8_DTYPE is None:
        pytest.skip("torch build without float8_e4m3fn")
    dtype = {"bf16": torch.bfloat16, "fp8": FP8_DTYPE}[state]
    shape = SIZES[size]
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    warm, x = _features(shape, torch.bfloat16)
    buf = fk.allocate(x, "taylorseer", dtype=dtype, order=2)
    out = torch.empty_like(x)
    for i in range(FULL_WARMUP):
        fk.update_(buf, warm(i), 1.0, backend=backend)
    fk.forecast_(buf, out, 1.0, backend=backend)
    del warm
    fn = lambda: fk.forecast_(buf, out, 1.0, backend=backend)  # noqa: E731
    nbytes = skip_bytes("taylorseer", {"order": 2}, shape[0], shape[1], dtype, torch.bfloat16)
    info = _timed(benchmark, fn, nbytes, f"taylorseer2_skip {size} bf16: state dtype")
    if info is None:  # --benchmark-disable
        return
    info.update(backend=backend, state_dtype=str(dtype), numel=math.prod(shape))
    benchmark.extra_info.update(info)
    foca_bench_rows.append({"op": f"taylorseer2_skip, {state} state", "size": size, "dtype": "bf16",
                            "provider": "fused", **info})
