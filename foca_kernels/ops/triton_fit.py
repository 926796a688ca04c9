"""The calibrated reading's fit (ops/fit.py) on Triton, for one state or many at once, and the
full step of many states (``full_group_triton``).

pass 1  each program forms r, u, q on its block of one member (fp32, from the feature and up to
        three slot rows) and writes its five fp64 partial dot products u.u, u.q, q.q, r.u, r.q;
sum     one program per member adds its partials in a fixed order (a deterministic tree over
        fixed lanes: the same result on every run, which atomics would not give), all-reduced
        when sharded;
pass 2  the grouped update (ops/triton_group.py with ``FIT``): each program solves the 2x2
        system from its member's five sums (fp64; the branches of reference/foca_calibrated.py
        as selects), forms U, V on its block and stores phi U + theta V into the fitted slot,
        rounded once; in a full step the same launch stores the step's own writes (the
        feature's copy).

Members are addressed through the grouped kernel's table (ops/triton_group.py), so a full step
of many states with one history is three launches whatever their number. A member's partials
cover fixed ranges of ``FIT_BLOCK`` elements (its first also takes the < 16-element tail), so
its sums, and therefore its slope, are the same bits whichever group it runs in, alone or not.
(In the interpreter the block may be smaller when every member fits in it: its reduction is a
sequential sum, and the masked lanes add zeros after the member's own; every sum is normalised
with + 0.0 so a -0.0 cannot tell the two apart.)

Nothing is read on the host. Offsets are int64, loads masked. Import only after
TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .pattern import row_pattern
from .triton_group import (
    FIT_TAIL, TABLE_COLS, _fit_inputs, _fit_row, _table_row, block_size, group_triton, table_rows,
)
from .triton_lincomb import _load_inputs, interpreted

FIT_BLOCK = 1024  # elements per partial sum (fixed: see the module docstring)
FIT_WARPS = 4
FEATURE = -1  # ops/fit.py's FEATURE_KEY


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _total(x):
    # tl.reduce with this module's own combine function, not tl.sum: tl.sum is a jit function of
    # triton.language.standard, and the interpreter leaves triton.language.core patched after
    # interpreting a kernel that calls into another module's jit function (later compiles in the
    # same process then fail; tests/test_fit_ptx.py compiles after interpreted runs)
    return tl.reduce(x, 0, _add) + 0.0


@triton.jit
def _dots_block(slots_ptr, feat_ptr, offs, mask, read_offs, coef,
                NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, NZ: tl.constexpr):
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    xs = _load_inputs(slots_ptr, feat_ptr, offs, mask, read_offs, NUM_READ, HAS_FEAT)
    xf = _fit_inputs(xs, slots_ptr, NUM_READ, HAS_FEAT)
    r = _fit_row(xf, coef, 0, NZ, NUM_IN).to(tl.float64)
    u = _fit_row(xf, coef, NUM_IN, NZ >> NUM_IN, NUM_IN).to(tl.float64)
    q = _fit_row(xf, coef, 2 * NUM_IN, NZ >> (2 * NUM_IN), NUM_IN).to(tl.float64)
    return _total(u * u), _total(u * q), _total(q * q), _total(r * u), _total(r * q)


@triton.jit
def _fit_dots_kernel(slots_ptr, table_ptr, step_ptr, feat_ptr, feat_offs_ptr, partial_ptr,
                     NUM_READ: tl.constexpr, HAS_FEAT: tl.constexpr, NZ: tl.constexpr, SLOT_VEC: tl.constexpr,
                     FEAT_VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: program pid's five partial dot products into partial[pid]. ``step``: the rows
    r, u, q (3 x NUM_IN fp32 coefficients), then the NUM_READ slot indices."""
    NUM_IN: tl.constexpr = NUM_READ + HAS_FEAT
    pid = tl.program_id(0).to(tl.int64)
    slot_off, _, stride, start, body_end, n, member = _table_row(table_ptr, pid, SLOT_VEC, 1)
    coef = ()
    for k in tl.static_range(3 * NUM_IN):
        coef = coef + (tl.load(step_ptr + k),)
    read_offs = ()
    for i in tl.static_range(NUM_READ):
        slot = tl.load(step_ptr + 3 * NUM_IN + i).to(tl.int64)
        read_offs = read_offs + (tl.multiple_of(slot_off + slot * stride, SLOT_VEC),)
    feat = feat_ptr
    if HAS_FEAT:
        feat = feat_ptr + tl.multiple_of(tl.load(feat_offs_ptr + member), FEAT_VEC)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    uu, uq, qq, ru, rq = _dots_block(slots_ptr, feat, offs, offs < body_end, read_offs, coef, NUM_READ, HAS_FEAT, NZ)
    if (start == 0) & (body_end < n):
        toffs = body_end + tl.arange(0, 16).to(tl.int64)
        tuu, tuq, tqq, tru, trq = _dots_block(slots_ptr, feat, toffs, toffs < n, read_offs, coef, NUM_READ,
                                              HAS_FEAT, NZ)
        uu += tuu
        uq += tuq
        qq += tqq
        ru += tru
        rq += trq
    base = partial_ptr + pid * 5
    tl.store(base + 0, uu)
    tl.store(base + 1, uq)
    tl.store(base + 2, qq)
    tl.store(base + 3, ru)
    tl.store(base + 4, rq)


@triton.jit
def _fit_sum_kernel(partial_ptr, starts_ptr, sums_ptr, LANES: tl.constexpr):
    """Program m: sums[m] = the partials of member m's programs (rows starts[m] .. starts[m+1]),
    accumulated LANES at a time per lane, then reduced over the lanes: a fixed order."""
    m = tl.program_id(0).to(tl.int64)
    p0 = tl.load(starts_ptr + m)
    p1 = tl.load(starts_ptr + m + 1)
    lanes = tl.arange(0, LANES).to(tl.int64)
    a = tl.full([LANES], 0.0, tl.float64)
    b = tl.full([LANES], 0.0, tl.float64)
    c = tl.full([LANES], 0.0, tl.float64)
    d = tl.full([LANES], 0.0, tl.float64)
    e = tl.full([LANES], 0.0, tl.float64)
    for p in range(p0, p1, LANES):
        rows = p + lanes
        mask = rows < p1
        a += tl.load(partial_ptr + rows * 5 + 0, mask=mask, other=0.0)
        b += tl.load(partial_ptr + rows * 5 + 1, mask=mask, other=0.0)
        c += tl.load(partial_ptr + rows * 5 + 2, mask=mask, other=0.0)
        d += tl.load(partial_ptr + rows * 5 + 3, mask=mask, other=0.0)
        e += tl.load(partial_ptr + rows * 5 + 4, mask=mask, other=0.0)
    out = sums_ptr + m * 5
    tl.store(out + 0, _total(a))
    tl.store(out + 1, _total(b))
    tl.store(out + 2, _total(c))
    tl.store(out + 3, _total(d))
    tl.store(out + 4, _total(e))


# ---- host side ------------------------------------------------------------------------------------------
def fit_block(max_numel: int) -> int:
    """BLOCK of the fit's launches (pass 1 and the pass 2 it feeds): FIT_BLOCK; through the
    interpreter, which pays per lane, down to the members' size when all of them fit in it."""
    if interpreted():
        return min(FIT_BLOCK, max(16, triton.next_power_of_2(max_numel)))
    return FIT_BLOCK


def _sum_lanes() -> int:
    return 16 if interpreted() else 128


_TABLES: dict = {}  # (slot byte offsets, element size, strides, sizes, block, device) -> (table, starts, n_programs)
_TABLE_CACHE = 64


def _table(slots: Sequence[torch.Tensor], numels: Sequence[int], block: int, ptrs: Optional[Sequence[int]] = None):
    """The grouped kernel's table for these members (cached by what it is made of: byte
    offsets, element size, strides and sizes, so a reused allocation can never get a stale
    table; the rows hold offsets in elements, so the same byte layout in another dtype is
    another table). ``ptrs``: the members' byte offsets from the first one's data, if the
    caller has them."""
    s0 = slots[0]
    if ptrs is None:
        ptrs = [s.data_ptr() - s0.data_ptr() for s in slots]
    ptrs = tuple(ptrs)
    strides = tuple([s.stride(0) for s in slots])
    es = s0.element_size()
    key = (ptrs, es, strides, tuple(numels), block, s0.device)
    hit = _TABLES.get(key)
    if hit is None:
        rows, starts = table_rows([(p - ptrs[0]) // es for p in ptrs], [0] * len(ptrs), strides, numels, block)
        # non_blocking: from pageable memory the copy is staged at once, without waiting for the device
        table = torch.tensor(rows, dtype=torch.int64).to(s0.device, non_blocking=True)
        starts_t = torch.tensor(starts, dtype=torch.int64).to(s0.device, non_blocking=True)
        if len(_TABLES) >= _TABLE_CACHE:
            _TABLES.clear()
        hit = _TABLES[key] = (table, starts_t, len(rows))
    return hit


def _upload(values: List[float], dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


_CONSTANTS: dict = {}  # (values, dtype, device) -> a device tensor nobody writes
_CONSTANT_CACHE = 256


def _constant(values: tuple, dtype, device) -> torch.Tensor:
    """``values`` on the device, uploaded once: a method's full steps repeat a handful of
    coefficient vectors, so most steps upload nothing."""
    key = (values, dtype, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        if len(_CONSTANTS) >= _CONSTANT_CACHE:
            _CONSTANTS.clear()
        hit = _CONSTANTS[key] = _upload(list(values), dtype, device)
    return hit


def _bits(rows: Sequence[Sequence[float]]) -> int:
    """Bit r * num_in + i set when row r has a term in input i."""
    out, k = 0, 0
    for row in rows:
        for c in row:
            if c != 0.0:
                out |= 1 << k
            k += 1
    return out


class FitSpec(NamedTuple):
    """A fit in dense form (ops/fit.py ``flatten``: ``inputs``, five coefficient rows r, u, q, U,
    V, six bounds: the clip box, then the fixed weights taken when a sum is not finite), split
    into what each pass reads: pass 1 the inputs r, u, q use (slots ascending, the feature
    last), pass 2 those U, V use. Build it with :func:`fit_spec`."""

    slot: int
    bounds: tuple  # phi lo, hi, theta lo, hi, fixed phi, fixed theta
    parallel: float
    sharded: bool
    has_feat: bool  # pass 1 reads the feature
    reads1: tuple  # pass 1's slots
    rows1: tuple  # r, u, q over reads1 (+ the feature)
    slots2: tuple  # pass 2's slots
    feat2: bool  # pass 2 reads the feature
    uv: tuple  # ((slot or FEATURE, (U coefficient, V coefficient)), ...)


@functools.lru_cache(maxsize=256)
def fit_spec(slot: int, inputs: tuple, coef: tuple, bounds: tuple, parallel: float, sharded: bool) -> FitSpec:
    n_in = len(inputs)
    rows = [coef[i * n_in:(i + 1) * n_in] for i in range(5)]

    def used(rs):
        return [j for j in range(n_in) if any(r[j] != 0.0 for r in rs)]

    cols1 = used(rows[:3])
    cols1 = [j for j in cols1 if inputs[j] != FEATURE] + [j for j in cols1 if inputs[j] == FEATURE]
    cols2 = used(rows[3:])
    return FitSpec(
        int(slot), tuple(map(float, bounds)), float(parallel), bool(sharded),
        any(inputs[j] == FEATURE for j in cols1), tuple(int(inputs[j]) for j in cols1 if inputs[j] != FEATURE),
        tuple(tuple(float(r[j]) for j in cols1) for r in rows[:3]),
        tuple(int(inputs[j]) for j in cols2 if inputs[j] != FEATURE), any(inputs[j] == FEATURE for j in cols2),
        tuple((int(inputs[j]), (float(rows[3][j]), float(rows[4][j]))) for j in cols2),
    )


@functools.lru_cache(maxsize=256)
def _step_layout(reads: tuple, has_feat_lc: bool, writes: tuple, coef: tuple, fit: Optional[FitSpec]):
    """Pass 2 (or a full step without a fit): its inputs (the step's reads and the fit's U, V
    inputs together), the row pattern of its writes over them, the step tensor's values and
    the fit rows' bits. Cached: a method's full steps repeat a handful of structures."""
    all_reads = tuple(sorted(set(reads) | (set(fit.slots2) if fit is not None else set())))
    has_feat = has_feat_lc or (fit is not None and fit.feat2)
    cols = list(all_reads) + ([FEATURE] if has_feat else [])
    own_cols = list(reads) + ([FEATURE] if has_feat_lc else [])
    n_own = len(own_cols)
    dense = []
    for j in range(len(writes)):
        row = dict(zip(own_cols, coef[j * n_own:(j + 1) * n_own]))
        dense.extend(float(row.get(k, 0.0)) for k in cols)
    pattern = row_pattern(dense, len(writes), len(cols))
    values = list(pattern.flat) + [float(r) for r in all_reads] + [float(w) for w in writes]
    fit_nz = 0
    if fit is not None:
        uv = dict(fit.uv)
        u = [uv.get(k, (0.0, 0.0))[0] for k in cols]
        v = [uv.get(k, (0.0, 0.0))[1] for k in cols]
        fit_nz = _bits([u, v])
        values += u + v + [float(fit.slot)] + list(fit.bounds) + [fit.parallel]
        assert len(values) == pattern.num_rows * len(cols) + len(all_reads) + len(writes) + 2 * len(cols) + FIT_TAIL
    return all_reads, has_feat, pattern, values, fit_nz


def _vec(rel_bytes: Sequence[int], element_size: int) -> int:
    """The alignment hint for members at these byte offsets from the first: 16 bytes of
    elements when every offset is a multiple of 16 bytes (the first pointer's own alignment
    is seen by Triton's specialisation), else 1."""
    return 16 // element_size if all(d % 16 == 0 for d in rel_bytes) else 1


def full_group_triton(slots: Sequence[torch.Tensor], numels: Sequence[int], feats: Optional[Sequence[torch.Tensor]],
                      reads: Sequence[int], has_feature: bool, writes: Sequence[int], coef: Sequence[float],
                      fit: Optional[FitSpec] = None) -> int:
    """A full step of members that share one plan: ``slots`` their allocations, ``feats``
    their features (flat, contiguous; None when nothing reads one), the plan's read slots,
    whether it reads the feature, its written slots and coefficient rows (over the reads, then
    the feature), and the fit if the step refits a slot (:func:`fit_spec`). Members need not be
    16-byte aligned (the alignment hints then drop to one element). Returns the number of
    launches: one without a fit, three with one (pass 1, the sums, pass 2 with the writes)."""
    s0 = slots[0]
    device = s0.device
    has_feat_lc = bool(has_feature) and bool(writes)
    ptrs = [s.data_ptr() for s in slots]
    p0 = ptrs[0]
    slot_rel = [p - p0 for p in ptrs]
    slot_vec = _vec(slot_rel, s0.element_size())
    feat_vec, feat_rel = 1, None
    if feats is not None:
        fes = feats[0].element_size()
        feat_rel = [f.data_ptr() - feats[0].data_ptr() for f in feats]
        if any(d % fes for d in feat_rel):  # not whole elements apart (a view at an odd byte): copied
            feats = [f.clone() for f in feats]
            feat_rel = [f.data_ptr() - feats[0].data_ptr() for f in feats]
        feat_vec = _vec(feat_rel, fes)
    if fit is None:
        block, num_warps = block_size(max(numels))
    else:
        block, num_warps = fit_block(max(numels)), FIT_WARPS
    table, starts, n_programs = _table(slots, numels, block, slot_rel)
    feat_offs = None
    if feats is not None and (has_feat_lc or (fit is not None and (fit.has_feat or fit.feat2))):
        feat_offs = _upload([d // fes for d in feat_rel], torch.int64, device)
    launches = 0
    sums = None
    if fit is not None:
        assert fit.reads1 or fit.has_feat
        step1 = _constant(tuple(c for row in fit.rows1 for c in row) + tuple(float(r) for r in fit.reads1),
                          torch.float32, device)
        partial = torch.empty(n_programs, 5, dtype=torch.float64, device=device)
        _fit_dots_kernel[(n_programs,)](
            s0, table, step1, feats[0] if fit.has_feat else s0, feat_offs if fit.has_feat else table, partial,
            NUM_READ=len(fit.reads1), HAS_FEAT=int(fit.has_feat), NZ=_bits(fit.rows1),
            SLOT_VEC=slot_vec, FEAT_VEC=feat_vec,
            BLOCK=block, num_warps=num_warps)
        sums = torch.empty(len(slots), 5, dtype=torch.float64, device=device)
        _fit_sum_kernel[(len(slots),)](partial, starts, sums, LANES=_sum_lanes())
        launches += 2
        if fit.sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # every member's sums over the shards, in one call

    # pass 2 / the step
    all_reads, has_feat, pattern, values, fit_nz = _step_layout(
        tuple(int(r) for r in reads), has_feat_lc, tuple(int(w) for w in writes), tuple(coef), fit)
    if fit is None and not writes:
        return launches
    step = _constant(tuple(values), torch.float32, device)
    group_triton(s0, s0, table, step, n_programs, pattern, len(all_reads), len(writes), False, block, num_warps,
                 feature0=feats[0] if has_feat else None, feat_offs=feat_offs if has_feat else None, sums=sums,
                 fit_nz=fit_nz, slot_vec=slot_vec, feat_vec=feat_vec)
    return launches + 1


def fit_triton(slots, numel: int, feature, slot: int, inputs, coef, bounds, parallel: float,
               sharded: bool = False) -> None:
    """ops/fit.py's refit of one state (arguments: fit.flatten, then the threshold): the grouped
    launches with one member and no other write."""
    spec = fit_spec(int(slot), tuple(inputs), tuple(coef), tuple(bounds), float(parallel), bool(sharded))
    feats = None if feature is None else [feature.reshape(-1)]
    full_group_triton([slots], [numel], feats, (), False, (), (), spec)


assert TABLE_COLS == 7  # _table_row's layout
