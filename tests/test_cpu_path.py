"""The CPU path: the compiled C loop (foca_kernels/ops/cpu_codegen.py) against the PyTorch ops
it replaces (the fallback, run with FOCA_KERNELS_CPU_CODEGEN=0) and against float64, over the
signatures the planner can produce: any number of reads and writes, a feature and/or an out,
zero coefficients, equal rows, unit-copy rows, outputs that overwrite an input slot in place,
mixed storage / feature dtypes, sizes across block boundaries, streaming (non-temporal) stores,
misaligned rows, several threads. Also: the fallback without a compiler, the off switch, and
that compiling happens once per process."""

from __future__ import annotations

import math
import random

import pytest
import torch

from foca_kernels.ops import cpu_codegen
from foca_kernels.ops.torch_lincomb import lincomb_torch

needs_cc = pytest.mark.skipif(cpu_codegen.load() is None, reason=f"no compiled CPU path: {cpu_codegen.status()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (storage dtype, feature/out dtype)
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)]
SIZES = [1, 7, 2048, 2049, 3 * 2048 + 5]


def _ulp(dtype) -> float:
    return {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


def _signature(rng: random.Random, n_slots: int):
    """A random launch: (reads, writes, has_feature, has_out, coef)."""
    reads = rng.sample(range(n_slots), rng.randint(0, n_slots))
    has_feature = rng.random() < 0.6 or not reads
    writes = rng.sample(range(n_slots), rng.randint(0, n_slots))
    has_out = rng.random() < 0.5 or not writes
    n_in = len(reads) + has_feature
    pool = [0.0, 0.0, 1.0, -0.5, 1.5, 0.25, 2.0, -3.0, 0.7]
    rows = []
    for _ in range(len(writes) + has_out):
        if rows and rng.random() < 0.3:
            rows.append(list(rng.choice(rows)))  # an equal row: computed once, stored twice
        elif rng.random() < 0.2:  # a unit copy
            row = [0.0] * n_in
            row[rng.randrange(n_in)] = 1.0
            rows.append(row)
        else:
            rows.append([rng.choice(pool) for _ in range(n_in)])
    return reads, writes, has_feature, has_out, [c for row in rows for c in row]


def _run(slots, feature, out, n, reads, writes, coef, compiled: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not compiled:
            m.setenv(cpu_codegen.ENV, "0")
        lincomb_torch(slots, feature, out, n, reads, writes, coef)


def _expected(slots, feature, n, reads, writes, has_out, coef):
    """float64 rows (zero coefficients are not terms)."""
    xs = [slots[r, :n].double() for r in reads] + ([feature.double()] if feature is not None else [])
    rows = []
    for j in range(len(writes) + has_out):
        acc = torch.zeros(n, dtype=torch.float64)
        for c, x in zip(coef[j * len(xs) : (j + 1) * len(xs)], xs):
            if c != 0.0:
                acc = acc + c * x
        rows.append(acc)
    return rows


def _check_case(seed, sdt, fdt, n, monkeypatch, misalign=False):
    rng = random.Random(seed)
    n_slots = 4
    reads, writes, has_feature, has_out, coef = _signature(rng, n_slots)
    g = torch.Generator().manual_seed(seed)
    width = n + (1 if misalign else 0)  # an odd row stride: rows not 32-byte aligned
    slots = torch.randn(n_slots, width, generator=g).to(sdt)
    feature = torch.randn(n, generator=g).to(fdt) if has_feature else None
    unused = [r for r in range(n_slots) if r not in reads]
    if unused:
        slots[unused[0], : max(1, n // 2)] = float("nan")  # must not leak into any row
    zero_cols = [i for i in range(len(reads)) if all(coef[j * (len(reads) + has_feature) + i] == 0.0
                                                     for j in range(len(writes) + has_out))]
    for i in zero_cols:  # read but with only zero coefficients: not a term either
        slots[reads[i], 0] = float("inf")
    out = torch.full((n,), 5.0, dtype=fdt) if has_out else None
    expected = _expected(slots, feature, n, reads, writes, has_out, coef)

    results = {}
    for compiled in (True, False):
        s, o = slots.clone(), (out.clone() if out is not None else None)
        _run(s, feature, o, n, reads, writes, coef, compiled, monkeypatch)
        results[compiled] = [s[w, :n] for w in writes] + ([o] if o is not None else [])
        for r in range(n_slots):  # slots not written are untouched, including past n
            if r not in writes:
                assert torch.equal(s[r].nan_to_num(1.0, 2.0, 3.0), slots[r].nan_to_num(1.0, 2.0, 3.0))
        if misalign:
            assert torch.equal(s[:, n:], slots[:, n:])

    for got, ref, exact in zip(results[True], results[False], expected):
        assert not got.isnan().any(), f"a nan/inf of an unused input leaked (signature {reads, writes, coef})"
        dtype = got.dtype
        scale = 1.0 + exact.abs().max().item()
        # one rounding to the destination dtype plus fp32 accumulation, like the fallback
        bound = 0.5 * _ulp(dtype) * exact.abs() + 16 * 2.0**-24 * scale
        err = (got.double() - exact).abs()
        ref_err = (ref.double() - exact).abs()
        assert bool((err <= torch.maximum(bound, 2 * ref_err + 1e-12)).all()), (
            f"{dtype} signature {reads, writes, has_feature, has_out, coef}: max error {err.max().item():.3g}, "
            f"fallback {ref_err.max().item():.3g}"
        )


@needs_cc
@pytest.mark.parametrize("sdt,fdt", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
def test_compiled_matches_fallback_and_float64(sdt, fdt, n, monkeypatch):
    for seed in range(12):
        _check_case(seed, sdt, fdt, n, monkeypatch)


@needs_cc
@pytest.mark.parametrize("sdt,fdt", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_streaming_stores_and_misaligned_rows(sdt, fdt, monkeypatch):
    monkeypatch.setattr(cpu_codegen, "STREAM_BYTES", 0)  # non-temporal stores from the first byte
    for seed in range(8):
        _check_case(seed, sdt, fdt, 4 * 2048 + 37, monkeypatch, misalign=seed % 2 == 1)


@needs_cc
def test_split_across_threads(monkeypatch):
    monkeypatch.setattr(cpu_codegen, "PARALLEL_GRAIN", 2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for seed in range(6):
            _check_case(seed, torch.bfloat16, torch.bfloat16, 5 * 2048 + 11, monkeypatch)
            _check_case(seed, torch.float32, torch.float32, 5 * 2048 + 11, monkeypatch)
    finally:
        torch.set_num_threads(threads)


@needs_cc
def test_in_place_overwrite_of_a_read_slot(monkeypatch):
    """FoCa's full step: slot 1 <- feature while slot 2 <- -0.5 slot1 + 0.5 feature reads the old
    slot 1; and a swap of two slots. Every row sees the inputs as they were before the call."""
    n = 3 * 2048 + 1
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        slots = torch.randn(3, n, generator=g).to(dtype)
        feature = torch.randn(n, generator=g).to(dtype)
        old = slots.clone()
        lincomb_torch(slots, feature, None, n, [1], [1, 2], [0.0, 1.0, -0.5, 0.5])
        assert torch.equal(slots[1], feature)
        exact = (-0.5 * old[1].double() + 0.5 * feature.double()).to(dtype)
        assert torch.allclose(slots[2].double(), exact.double(), rtol=2 * _ulp(dtype), atol=1e-6)
        lincomb_torch(slots, None, None, n, [0, 1], [1, 0], [1.0, 0.0, 0.0, 1.0])  # a swap
        assert torch.equal(slots[0], feature) and torch.equal(slots[1], old[0])


@needs_cc
def test_compiled_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_codegen, "_build", lambda: calls.append(1) or (None, "stub"))
    slots = torch.randn(2, 16)
    out = torch.empty(16)
    for _ in range(3):
        lincomb_torch(slots, None, out, 16, [0, 1], [], [2.0, -1.0])
    assert calls == [] and cpu_codegen.compile_seconds is not None
    assert cpu_codegen.status().startswith("in use")


def test_fallback_without_a_compiler(monkeypatch):
    """No compiler on PATH: the first call records why, and the PyTorch ops give the results."""
    monkeypatch.setattr(cpu_codegen, "_lib", None)
    monkeypatch.setattr(cpu_codegen, "_tried", False)
    monkeypatch.setattr(cpu_codegen, "_reason", cpu_codegen._reason)  # restored afterwards
    monkeypatch.setattr(cpu_codegen, "compile_seconds", cpu_codegen.compile_seconds)
    monkeypatch.setattr(cpu_codegen, "_compilers", lambda: [])
    slots = torch.randn(3, 100)
    feature = torch.randn(100)
    out = torch.empty(100)
    lincomb_torch(slots, None, out, 100, [0, 1, 2], [], [1.5, -0.5, 0.25])
    assert torch.allclose(out, 1.5 * slots[0] - 0.5 * slots[1] + 0.25 * slots[2], atol=1e-6)
    lincomb_torch(slots, feature, None, 100, [0], [1], [2.0, 1.0])
    assert "no C compiler" in cpu_codegen.status()
    assert cpu_codegen.lincomb_cpu(slots, None, out, 100, [0], [], [1.0]) is False


def test_missing_c_source_is_named(monkeypatch, tmp_path):
    """The C source is package data: if an install dropped it, the reason names the file and
    the PyTorch ops run."""
    if not cpu_codegen._compilers():
        pytest.skip("no C compiler: the compiler check comes first")
    monkeypatch.setattr(cpu_codegen, "SOURCE_PATH", str(tmp_path / "lincomb.c"))
    lib, reason = cpu_codegen._build()
    assert lib is None and "lincomb.c is missing" in reason


def test_c_source_is_package_data():
    """pyproject ships the .c file cpu_codegen compiles (a wheel without it falls back silently)."""
    from pathlib import Path

    import foca_kernels

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    rel = Path(cpu_codegen.SOURCE_PATH).relative_to(Path(foca_kernels.__file__).parent).as_posix()
    assert Path(cpu_codegen.SOURCE_PATH).is_file()
    assert any(Path(rel).match(pattern) for pattern in data["foca_kernels"]), (rel, data)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_codegen.ENV, "0")
    slots = torch.randn(2, 10)
    out = torch.empty(10)
    assert cpu_codegen.lincomb_cpu(slots, None, out, 10, [0, 1], [], [1.0, 1.0]) is False
    assert cpu_codegen.status().startswith("off")
    lincomb_torch(slots, None, out, 10, [0, 1], [], [1.0, 1.0])
    assert torch.allclose(out, slots[0] + slots[1])


@needs_cc
def test_declines_what_it_cannot_take():
    """A non-contiguous out or an unsupported dtype goes to the PyTorch ops, nothing written."""
    slots = torch.randn(2, 8)
    out = torch.zeros(16)[::2]
    assert cpu_codegen.lincomb_cpu(slots, None, out, 8, [0], [], [2.0]) is False
    assert torch.equal(out, torch.zeros(8))
    s64 = torch.randn(2, 8, dtype=torch.float64)
    assert cpu_codegen.lincomb_cpu(s64, None, None, 8, [0], [1], [2.0]) is False
    lincomb_torch(slots, None, out, 8, [0], [], [2.0])
    assert torch.allclose(out, 2.0 * slots[0])


@needs_cc
def test_zero_length_and_no_destination():
    slots = torch.randn(2, 4)
    before = slots.clone()
    lincomb_torch(slots, None, None, 0, [0], [1], [3.0])
    lincomb_torch(slots, None, None, 4, [0], [], [])
    assert torch.equal(slots, before)
    assert math.isfinite(cpu_codegen.compile_seconds)


@needs_cc
@pytest.mark.parametrize("stream", [False, True])
def test_equal_rows_into_destinations_of_different_dtypes(stream, monkeypatch):
    """FoCa's skip on a bf16 state with fp32 features: the new slot (bf16) and out (fp32) share
    one row; each is that row rounded once to its own dtype."""
    if stream:
        monkeypatch.setattr(cpu_codegen, "STREAM_BYTES", 0)
    n = 2 * 2048 + 3
    g = torch.Generator().manual_seed(2)
    slots = torch.randn(4, n, generator=g).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.float32)
    coef = [1.5, -0.5, 0.5] * 2
    lincomb_torch(slots, None, out, n, [0, 1, 2], [3], coef)
    exact = 1.5 * slots[0].double() - 0.5 * slots[1].double() + 0.5 * slots[2].double()
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.equal(slots[3], out.to(torch.bfloat16))


@needs_cc
def test_out_of_range_slots_are_left_to_the_pytorch_ops():
    slots = torch.randn(2, 8)
    assert cpu_codegen.lincomb_cpu(slots, None, None, 8, [2], [0], [1.0]) is False
    assert cpu_codegen.lincomb_cpu(slots, None, None, 9, [0], [1], [1.0]) is False
    with pytest.raises(IndexError):
        lincomb_torch(slots, None, None, 8, [2], [0], [1.0])


@needs_cc
def test_version_counters_move_as_with_in_place_ops():
    """Raw writes still tell autograd that slots and out changed (as copy_ into them would)."""
    slots = torch.randn(2, 8)
    out = torch.empty(8)
    v_slots, v_out = slots._version, out._version
    lincomb_torch(slots, None, out, 8, [0], [1], [1.0, 2.0])
    assert slots._version > v_slots and out._version > v_out


@pytest.mark.parametrize("sdt,fdt", DTYPE_PAIRS)
def test_pure_copy_launches_are_plain_copies(sdt, fdt, monkeypatch):
    """A closed form's full step (feature -> one slot) and reuse's skip (slot -> out) are one
    copy_ per destination, never the loop; narrowing rounds once to nearest even."""
    def refuse(*a, **k):
        raise AssertionError("a pure copy reached the compiled loop")

    monkeypatch.setattr(cpu_codegen, "lincomb_cpu", refuse)
    n = 2 * 2048 + 3
    g = torch.Generator().manual_seed(5)
    slots = torch.randn(3, n + 61, generator=g).to(sdt)
    before = slots.clone()
    feature = torch.randn(n, generator=g).to(fdt)
    lincomb_torch(slots, feature, None, n, [], [1], [1.0])
    assert torch.equal(slots[1, :n], feature.to(sdt))
    assert torch.equal(slots[0], before[0]) and torch.equal(slots[2], before[2])
    assert torch.equal(slots[1, n:], before[1, n:])  # the row's padding is not touched
    out = torch.empty(n, dtype=fdt)
    lincomb_torch(slots, None, out, n, [2], [0], [1.0, 1.0])  # one input into a slot and out
    assert torch.equal(out, slots[2, :n].to(fdt)) and torch.equal(slots[0, :n], slots[2, :n])


def test_a_slot_copied_onto_itself_takes_the_general_path(monkeypatch):
    called = []
    monkeypatch.setattr(cpu_codegen, "lincomb_cpu", lambda *a: called.append(1) or False)
    slots = torch.randn(2, 64)
    before = slots.clone()
    lincomb_torch(slots, None, None, 64, [1], [1], [1.0])
    assert called and torch.equal(slots, before)


@needs_cc
def test_call_layouts_are_cached_by_structure_not_by_pointers():
    """The per-call Python is cut by caching everything but the pointers: a second call of the
    same structure on other tensors reuses the layout and is still right; a feature inside the
    slots (possible in a direct call) is never cached, since its pointer decides the hazards."""
    n = 3000
    coef = [1.5, -0.5, 0.25, 1.0, 0.0, 2.0]  # reads 0, 1 + feature -> slot 2, out
    cpu_codegen._layouts.clear()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        slots, feature, out = torch.randn(3, n, generator=g), torch.randn(n, generator=g), torch.empty(n)
        x0, x1 = slots[0].double(), slots[1].double()
        assert cpu_codegen.lincomb_cpu(slots, feature, out, n, [0, 1], [2], coef)
        exp2 = 1.5 * x0 - 0.5 * x1 + 0.25 * feature.double()
        exp_out = 1.0 * x0 + 2.0 * feature.double()
        assert torch.allclose(slots[2].double(), exp2, atol=1e-5) and torch.allclose(out.double(), exp_out, atol=1e-5)
    assert len(cpu_codegen._layouts) == 1
    slots = torch.randn(3, n)
    x0 = slots[0].clone()
    assert cpu_codegen.lincomb_cpu(slots, slots[0], None, n, [1], [0], [0.5, 2.0])  # feature = slot 0, written
    assert torch.allclose(slots[0], 0.5 * slots[1] + 2.0 * x0, atol=1e-5)
    assert len(cpu_codegen._layouts) == 1
