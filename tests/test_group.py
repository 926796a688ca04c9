"""Grouped skipped steps (foca_kernels/group.py): StateGroup.forecast_, pack_states_,
forecast_group_, and CacheState.move_to_.

* parity: a grouped step is BIT-IDENTICAL to ``forecast_(state, out, h)`` per state on the same
  backend (forecasts, stored slots and bookkeeping, after every step of a schedule of full and
  skipped steps with unequal step sizes), for every method, fp32/fp16/bf16 and a bf16 state with
  fp32 features, odd and mixed sizes, packed (members merged into one update) and unpacked
  (per-program table), members with different histories (one launch per history class),
  per-state step sizes, and outs the grouped launch cannot address (non-contiguous, or
  misaligned: they run on their own launch);
* the grouped forecasts against the float64 reference (tests/helpers.py tolerances);
* launches: one per skipped step when the states share a history, however many states;
* refusals: each names the problem and leaves every state and every out bit-identical;
* pack_states_ / move_to_: layout, bytes, results unchanged.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import foca_kernels as fk
from foca_kernels.group import StateGroup, forecast_group_, pack_states_
from helpers import (
    METHOD_IDS, METHODS, assert_close, interval_schedule, make_ref, make_steps, smooth_features, study, times_of,
)

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# (feature/out dtype, state dtype)
DTYPE_CASES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16state_fp32io": (torch.float32, torch.bfloat16),
}
SMALL_SHAPES = [(1,), (7,), (3, 5), (17,), (2, 8)]  # numel 1, 7, 15, 17 (tails), 16 (body only)
# warm-up, then skipped and full steps with unequal sizes: ("full" | "skip", h)
SCHEDULE = [("skip", 0.6), ("skip", 1.4), ("full", 0.8), ("full", 1.2), ("skip", 1.1), ("skip", 0.45)]


# ---- comparing bit for bit -----------------------------------------------------------------------
def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(_INT[x.dtype])


def assert_bits(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    diff = bits(a) != bits(b)
    if diff.any():
        i = int(torch.nonzero(diff.reshape(-1))[0])
        raise AssertionError(f"{name}: {int(diff.sum())}/{a.numel()} elements differ bitwise; first at flat index "
                             f"{i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


BOOK = ("t", "n_full", "n_skip", "n_steps", "_slot_of", "_time_of", "_memo")


def book(st) -> dict:
    return {k: copy.deepcopy(getattr(st, k)) for k in BOOK}


def assert_same_state(a, b, name: str, padding: bool = False) -> None:
    """Stored values (the live columns; with ``padding`` the whole allocation) bit for bit,
    and the bookkeeping."""
    if padding:
        assert_bits(a.slots, b.slots, f"{name} slots (with padding)")
    else:
        assert_bits(a.slots[:, : a.numel], b.slots[:, : b.numel], f"{name} slots")
    for k in BOOK:
        assert getattr(a, k) == getattr(b, k), f"{name}: {k} {getattr(a, k)!r} != {getattr(b, k)!r}"


def feature(shape, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


# ---- a group and its per-state twins, driven side by side -------------------------------------------
def full_backend(backend: str) -> str:
    """Backend for the full steps (update_) that set up and continue a history: the PyTorch
    path (an interpreted Triton launch costs 10-25 ms on this machine); what is under test is
    the skipped step, which always runs on ``backend``, and states and twins get the same
    full steps either way."""
    return "torch"


class Twins:
    """The same states in one or more StateGroups (unpacked: separate allocations, the
    per-program table; packed: pack_states_, members merged) and independent twins driven by
    single-state calls. Every group must give the twins' results bit for bit."""

    def __init__(self, specs, device, backend, variants=("unpacked", "packed")):
        """``specs``: (shape, method, opts, io_dtype, state_dtype, extra_full) per state."""
        self.backend, self.device, self.specs = backend, device, specs

        def make():
            return [fk.allocate(torch.empty(shape, dtype=io, device=device), method, dtype=sd, **opts)
                    for shape, method, opts, io, sd, _ in specs]

        self.twins = make()
        self.sets = {}
        for v in variants:
            states = make()
            outs = pack_states_(states) if v == "packed" else [
                torch.empty(st.shape, dtype=st.io_dtype, device=device) for st in states]
            self.sets[v] = (states, outs)
        self.seed = 0
        # warm-up: every state ready, plus its own extra full steps (a different history)
        for i, (spec, b) in enumerate(zip(specs, self.twins)):
            for k in range(max(2, b.method.min_full) + spec[5]):
                self.full_one(i, 1.0 if k == 0 else 0.7 + 0.1 * k)
        self.groups = {v: StateGroup(states, outs) for v, (states, outs) in self.sets.items()}

    def full_one(self, i, h):
        b = self.twins[i]
        self.seed += 1
        x = feature(b.shape, b.io_dtype, self.device, self.seed)
        for st in [states[i] for states, _ in self.sets.values()] + [b]:
            fk.update_(st, x, h, backend=full_backend(self.backend))

    def full(self, h):
        for i in range(len(self.twins)):
            self.full_one(i, h)
        self.check("full step")

    def skip(self, h, launches=1):
        """A grouped skipped step (``h`` one float or one per state) against per-state calls."""
        for v, group in self.groups.items():
            before = group.launches
            res = group.forecast_(h, backend=self.backend)
            outs = self.sets[v][1]
            assert len(res) == len(outs) and all(r is o for r, o in zip(res, outs)), "forecast_ returns the outs"
            got = group.launches - before
            assert got == launches, f"{v}: {got} launches, expected {launches}"
        hs = h if isinstance(h, (list, tuple)) else [h] * len(self.twins)
        for i, (b, hb) in enumerate(zip(self.twins, hs)):
            exp = torch.empty(b.shape, dtype=b.io_dtype, device=self.device)
            fk.forecast_(b, exp, hb, backend=self.backend)
            for v, (_, outs) in self.sets.items():
                assert_bits(outs[i], exp, f"{v} state {i} ({self.specs[i][0]}) forecast")
        self.check("skipped step")

    def check(self, when):
        for v, (states, _) in self.sets.items():
            for i, (a, b) in enumerate(zip(states, self.twins)):
                assert_same_state(a, b, f"{v}, after a {when}, state {i} ({self.specs[i][0]})")

    def run(self, schedule=SCHEDULE):
        for kind, h in schedule:
            self.full(h) if kind == "full" else self.skip(h)


# ---- parity: every method x dtype x backend, packed and not --------------------------------------
def _parity_cases():
    """Every method x every dtype case, on both backends."""
    cases = []
    for (method, opts), mid in zip(METHODS, METHOD_IDS):
        for dtypes in DTYPE_CASES:
            for be in ("torch", "triton"):
                cases.append(pytest.param(method, opts, dtypes, be, id=f"{be}-{mid}-{dtypes}"))
    return cases


def _use(be, device):
    """Skip where the conftest's ``backend`` fixture would."""
    if be == "triton":
        from foca_kernels.backend import interpreter_on, triton_installed

        if not triton_installed():
            pytest.skip("triton not installed")
        if device.type == "cpu" and not interpreter_on():
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    return be


@pytest.mark.parametrize("method,opts,dtypes,be", _parity_cases())
def test_group_equals_per_state(method, opts, dtypes, be, device):
    """Mixed odd sizes in one group, one shared history, unpacked and packed: one launch per
    skipped step, and every forecast, slot and counter bit-identical to forecast_ per state.
    The second skip of a row takes the "committed by one launch" fast path, the skip after a
    full step compares histories by value."""
    io, sd = DTYPE_CASES[dtypes]
    tw = Twins([(s, method, opts, io, sd, 0) for s in SMALL_SHAPES], device, _use(be, device))
    tw.run(SCHEDULE if be == "torch" else SCHEDULE[:3] + SCHEDULE[4:5])  # Triton: 3 skips (interpreted)


LARGE_SHAPES = [(1,), (3, 5), (4097,), (7, 10001)]  # 70007 > 65536: chunked torch path, several programs


@pytest.mark.parametrize("dtypes", ["fp32", "bf16"])
@pytest.mark.parametrize("mi", [0, 6], ids=[METHOD_IDS[i] for i in (0, 6)])
def test_group_large_and_odd_sizes(mi, dtypes, backend, device):
    method, opts = METHODS[mi]
    io, sd = DTYPE_CASES[dtypes]
    tw = Twins([(s, method, opts, io, sd, 0) for s in LARGE_SHAPES], device, backend)
    tw.run([("skip", 0.6), ("full", 1.3), ("skip", 0.9)])


# ---- different histories in one group ------------------------------------------------------------
def _history_specs():
    f32, bf = torch.float32, torch.bfloat16
    r3 = ("foca", {"reading": "r3"})
    return [
        ((3, 5), *r3, f32, f32, 0),  # A
        ((17,), *r3, f32, f32, 0),  # A: same history, other size
        ((7,), *r3, f32, f32, 1),  # B: one extra full step
        ((2, 8), "taylorseer", {"order": 2}, f32, f32, 0),  # C: another method
        ((9,), *r3, f32, bf, 0),  # D: another state dtype
        ((1,), *r3, f32, f32, 0),  # A
        ((4, 4), "foca", {"anchor": "secant"}, f32, f32, 1),  # E: another reading, extra full step
    ]


def test_different_histories_one_launch_per_class(backend, device):
    """One launch per class of states with equal history (method, clock, slot map, dtypes),
    each member still bit-identical to forecast_ per state; unpacked and packed."""
    tw = Twins(_history_specs(), device, backend)
    n_classes = 5  # A (3 states), B, C, D, E
    tw.skip(0.8, launches=n_classes)
    tw.skip(1.3, launches=n_classes)  # still 5: their clocks and methods stay apart
    tw.full(0.9)  # every state one full step: B and E keep their extra one
    # per-state step sizes: A's members part ways (state 1 gets another h) -> one more class
    tw.skip([0.5, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5], launches=n_classes + 1)
    tw.skip(tuple([0.25] * 7), launches=n_classes + 1)  # histories stay apart from now on


def test_same_history_after_separate_full_steps(backend, device):
    """States fed by their own update_ calls (separate launches) are still one class: the
    history is compared by value, not by which launch committed it."""
    f32 = torch.float32
    tw = Twins([((5,), "foca", {"reading": "r3"}, f32, f32, 0)] * 4, device, backend, ("unpacked",))
    states = tw.sets["unpacked"][0]
    assert len({id(st._launch) for st in states}) == 4
    tw.skip(0.5, launches=1)
    assert len({id(st._launch) for st in states}) == 1  # committed by the one grouped launch
    tw.skip(0.7, launches=1)


# ---- launches: one per skipped step, independent of the number of states ----------------------
def _count_group_launches(monkeypatch):
    counts = {"n": 0}
    from foca_kernels.ops import torch_group

    def counting(fn):
        def wrapped(*a, **k):
            counts["n"] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch_group, "group_torch", counting(torch_group.group_torch))
    try:
        from foca_kernels.ops import triton_group
    except ImportError:  # pragma: no cover - triton not installed
        pass
    else:
        monkeypatch.setattr(triton_group, "group_triton", counting(triton_group.group_triton))
    return counts


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("n_states", [3, 40])
def test_one_launch_per_skipped_step(n_states, packed, backend, device, monkeypatch):
    shapes = [(4, 4 * (1 + i % 3)) for i in range(n_states)]  # numel 16, 32, 48
    states = [fk.allocate(torch.empty(s, device=device), "foca") for s in shapes]
    outs = pack_states_(states) if packed else [torch.empty(s, device=device) for s in shapes]
    for k, h in enumerate((1.0, 0.6)):
        for i, st in enumerate(states):
            fk.update_(st, feature(st.shape, torch.float32, device, 100 * k + i), h, backend="torch")
    counts = _count_group_launches(monkeypatch)
    group = StateGroup(states, outs)
    for j, h in enumerate((0.8, 1.25)):
        group.forecast_(h, backend=backend)
        assert counts["n"] == j + 1, f"{counts['n']} grouped launches after {j + 1} skipped steps of {n_states} states"
    assert group.launches == 2
    assert all(st.n_skip == 2 for st in states)


# ---- outs (and slots) the grouped launch cannot address ------------------------------------------------
def _misaligned_slots(st):
    """``st`` moved to slots starting one element past a 16-byte boundary."""
    n_slots, stride = st.slots.shape
    arena = torch.zeros(n_slots, stride + 64, dtype=st.dtype, device=st.device)
    st.move_to_(arena[:, 1: 1 + stride])
    assert st.slots.data_ptr() % 16 != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mi", [0, 5], ids=[METHOD_IDS[i] for i in (0, 5)])
def test_unaddressable_members_fall_back(mi, dtype, backend, device, monkeypatch):
    """Non-contiguous outs and outs / slots not 16-byte aligned each run on their own launch
    (as forecast_ would); the others share one; every result equals forecast_ per state, and
    nothing outside each out is written."""
    method, opts = METHODS[mi]
    shape = (3, 7)
    n = 21
    states = [fk.allocate(torch.empty(shape, dtype=dtype, device=device), method, **opts) for _ in range(6)]
    twins = [fk.allocate(torch.empty(shape, dtype=dtype, device=device), method, **opts) for _ in range(6)]
    _misaligned_slots(states[4])
    big = torch.full((n + 5,), 7.0, dtype=dtype, device=device)
    big2 = torch.full((2 * n,), 7.0, dtype=dtype, device=device)
    outs = [
        torch.empty(shape, dtype=dtype, device=device),
        torch.empty(shape[::-1], dtype=dtype, device=device).t(),  # transposed
        big[1: 1 + n].view(shape),  # contiguous, one element past a 16-byte boundary
        big2[::2].view(shape),  # every other element
        torch.empty(shape, dtype=dtype, device=device),  # its state's slots are misaligned
        torch.empty(shape, dtype=dtype, device=device),
    ]
    assert not outs[1].is_contiguous() and outs[2].data_ptr() % 16 != 0 and not outs[3].is_contiguous()
    for k, h in enumerate((1.0, 0.5, 1.5)):
        for i, (a, b) in enumerate(zip(states, twins)):
            x = feature(shape, dtype, device, 10 * k + i)
            fk.update_(a, x, h, backend=full_backend(backend))
            fk.update_(b, x, h, backend=full_backend(backend))
    counts = _count_group_launches(monkeypatch)
    group = StateGroup(states, outs)
    for j, h in enumerate((0.7, 1.3)):
        before = group.launches
        group.forecast_(h, backend=backend)
        assert counts["n"] == j + 1, "members 0 and 5 share one grouped launch"
        assert group.launches - before == 5, "one grouped launch and one of its own for each of 4 members"
        for i, (a, b, out) in enumerate(zip(states, twins, outs)):
            exp = fk.forecast(b, h, backend=backend)
            assert_bits(out, exp, f"member {i} forecast")
            assert_same_state(a, b, f"member {i}")
        assert_bits(big[:1], torch.full((1,), 7.0, dtype=dtype, device=device), "element before the misaligned out")
        assert_bits(big[1 + n:], torch.full((4,), 7.0, dtype=dtype, device=device), "elements after the misaligned out")
        assert_bits(big2[1::2], torch.full((n,), 7.0, dtype=dtype, device=device), "elements between the strided out's")


# ---- against the float64 reference ---------------------------------------------------------------
REF_METHODS = [("foca", {"reading": "r3"}), ("foca", {"anchor": "secant"}), ("taylorseer", {"order": 2}),
               ("reuse", {}), ("foca", {"reading": "calibrated"})]


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("method,opts", REF_METHODS,
                         ids=["foca-r3", "foca-r0-secant", "taylorseer-2", "reuse", "foca-calibrated"])
def test_group_matches_float64_reference(method, opts, packed, backend, device, gen):
    """fp32 features, three states of different shapes on one schedule (full every 3rd step,
    unequal steps): every grouped forecast within the fp32 tolerance of an independent float64
    run of the reference (tests/helpers.py), and the whole sequence too."""
    rng = random.Random(3)
    full = interval_schedule(11, 3)
    steps = make_steps(11, rng)
    shapes = [(3, 5), (17,), (2, 3, 4)]
    xs = [smooth_features(s, times_of(steps), gen) for s in shapes]
    states = [fk.allocate(torch.empty(s, device=device), method, **opts) for s in shapes]
    refs = [make_ref(method, **opts) for _ in shapes]
    outs = pack_states_(states) if packed else [torch.empty(s, device=device) for s in shapes]
    group = StateGroup(states, outs)
    got, exp = [[] for _ in shapes], [[] for _ in shapes]
    for i, is_full in enumerate(full):
        h = steps[i] if i else 1.0
        if is_full:
            for st, ref, x in zip(states, refs, xs):
                x32 = x[i].to(device, torch.float32)
                fk.update_(st, x32, h, backend=full_backend(backend))
                ref.full(x32.to("cpu", torch.float64), h)
            continue
        group.forecast_(h, backend=backend)
        for k, (out, ref) in enumerate(zip(outs, refs)):
            e = ref.forecast(h)
            assert_close(out, e, torch.float32, name=f"state {k} step {i} forecast")
            got[k].append(out.cpu().clone())
            exp[k].append(e)
    for k in range(len(shapes)):
        assert_close(torch.stack(got[k]), torch.stack(exp[k]), torch.float32, name=f"state {k} whole sequence")


# ---- refusals: each names the problem, nothing is written --------------------------------------------
SHAPES3 = [(3, 5), (17,), (7,)]
METHODS3 = [("foca", {"reading": "r3"}), ("foca", {"reading": "r3"}), ("taylorseer", {"order": 2})]  # 2 classes


def _three(device, backend, history=None):
    """Three ready states (two classes), their twins, outs filled with a known pattern."""
    def make():
        sts = [fk.allocate(torch.empty(s, device=device), m, **o) for s, (m, o) in zip(SHAPES3, METHODS3)]
        for k, h in enumerate((1.0, 0.5, 1.5)):
            for i, st in enumerate(sts):
                fk.update_(st, feature(st.shape, torch.float32, device, 10 * k + i), h, backend=full_backend(backend))
        if history is not None:
            history(sts, full_backend(backend))
        return sts
    states, twins = make(), make()
    outs = [feature(s, torch.float32, device, 99 + i) for i, s in enumerate(SHAPES3)]
    return states, twins, outs


def _assert_untouched(states, twins, outs, saved_outs):
    for i, (a, b) in enumerate(zip(states, twins)):
        assert_same_state(a, b, f"state {i} after a refused call", padding=True)
        assert not a.slots.requires_grad
    for i, (o, s) in enumerate(zip(outs, saved_outs)):
        assert_bits(o, s, f"out[{i}] after a refused call")


def _tiny_gap(states, backend):
    """States 0 and 2 start again: two full steps 1e-39 apart (accepted by the closed forms;
    their next forecast's coefficients overflow float32)."""
    for i in (0, 2):
        states[i].reset()
        for k, h in enumerate((1.0, 1e-39)):
            fk.update_(states[i], feature(states[i].shape, torch.float32, states[i].device, 77 + k), h, backend=backend)


def _not_ready(states, backend):
    states[1].reset()


FORECAST_REFUSALS = [
    # id, history, h, exception, message
    ("h zero", None, 0.0, ValueError, r"step size h must be finite and > 0, got 0\.0"),
    ("h negative", None, -1.0, ValueError, r"step size h must be finite and > 0, got -1\.0"),
    ("h nan", None, float("nan"), ValueError, r"step size h must be finite and > 0, got nan"),
    ("h inf", None, float("inf"), ValueError, r"step size h must be finite and > 0, got inf"),
    ("h bool", None, True, TypeError, r"step size h must be a real number, got bool"),
    ("h tensor of 2", None, torch.tensor([1.0, 1.0]), ValueError, r"step size h must be a scalar"),
    ("h list too short", None, [1.0, 1.0], ValueError, r"h: expected one step size or 3, got 2"),
    ("h list too long", None, [1.0] * 4, ValueError, r"h: expected one step size or 3, got 4"),
    ("h list one nan", None, [1.0, float("nan"), 1.0], ValueError, r"step size h\[1\] must be finite and > 0"),
    ("h list one negative", None, [0.5, 0.5, -2.0], ValueError, r"step size h\[2\] must be finite and > 0"),
    ("h list one zero first", None, [0.0, 1.0, 1.0], ValueError, r"step size h\[0\] must be finite and > 0"),
    ("h list one string", None, [1.0, "1.0", 1.0], TypeError, r"step size h\[1\] must be a real number, got str"),
    ("h list all nan", None, [float("nan")] * 3, ValueError, r"step size h\[0\] must be finite and > 0"),
    ("h overflows a coefficient", None, 1e39, ValueError,
     r"h=1e\+39 gives a forecast coefficient .*float32 cannot hold"),
    ("h astronomic", None, 1e200, ValueError, r"h=1e\+200 gives a forecast coefficient"),
    # only the last state's (second class's) coefficients overflow: the first class is not written either
    ("one h overflows", None, [1.0, 1.0, 1e39], ValueError, r"h=1e\+39 gives a forecast coefficient"),
    ("h too small for the clock", None, 1e-17, ValueError, r"step size h=1e-17 is too small to advance the clock"),
    ("h far beyond the history", None, 1e10, ValueError, r"step size h=10000000000\.0 is .* times the span"),
    ("tiny gap overflows", _tiny_gap, 1.0, ValueError, r"h=1\.0 gives a forecast coefficient"),
    ("not ready", _not_ready, 1.0, RuntimeError, r"needs 2 fully computed step\(s\) .* has seen 0"),
    ("unknown backend", None, "BACKEND", ValueError, r"backend must be one of"),
]


# the refusals happen before any backend is touched: all on the PyTorch path, and on Triton the
# ones where a first class of states could have been launched before a later one refuses
_ON_TRITON = ("h overflows a coefficient", "one h overflows", "tiny gap overflows", "not ready", "unknown backend")


@pytest.mark.parametrize("case,be", [pytest.param(c, be, id=f"{be}-{c[0]}") for c in FORECAST_REFUSALS
                                     for be in ("torch", "triton") if be == "torch" or c[0] in _ON_TRITON])
def test_refused_forecast_leaves_everything_as_it_was(case, be, device):
    name, history, h, exc, match = case
    backend = _use(be, device)
    states, twins, outs = _three(device, backend, history)
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    be = backend
    if isinstance(h, str) and h == "BACKEND":
        h, be = 1.0, "nope"
    with pytest.raises(exc, match=match):
        group.forecast_(h, backend=be)
    _assert_untouched(states, twins, outs, saved)
    assert group.launches == 0
    # the group still works, and gives what the twins give
    for a, b in zip(states, twins):
        if not a.ready:
            for k in range(2):
                x = feature(a.shape, torch.float32, device, 50 + k)
                fk.update_(a, x, 1.0, backend=full_backend(backend))
                fk.update_(b, x, 1.0, backend=full_backend(backend))
        if history is _tiny_gap:  # the tiny gap must leave the stored history first
            for k in range(a.method.n_slots):
                x = feature(a.shape, torch.float32, device, 60 + k)
                fk.update_(a, x, 0.5, backend=full_backend(backend))
                fk.update_(b, x, 0.5, backend=full_backend(backend))
    group.forecast_(0.5, backend=backend)
    for i, (b, out) in enumerate(zip(twins, outs)):
        assert_bits(out, fk.forecast(b, 0.5, backend=backend), f"state {i} forecast after the refusal")
        assert_same_state(states[i], b, f"state {i} after the refusal")


def test_refused_bool_in_h_list(device):
    states, twins, outs = _three(device, "torch")
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    with pytest.raises(TypeError, match=r"step size h\[1\] must be a real number, got bool"):
        group.forecast_([1.0, True, 1.0], backend="torch")
    _assert_untouched(states, twins, outs, saved)


def test_refused_tensor_in_h_list(device):
    states, twins, outs = _three(device, "torch")
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    with pytest.raises(ValueError, match=r"step size h\[1\] must be a scalar"):
        group.forecast_([1.0, torch.tensor([1.0, 1.0]), 1.0], backend="torch")
    _assert_untouched(states, twins, outs, saved)


def _bad_outs(kind, states, outs, device):
    outs = list(outs)
    if kind == "shape":
        outs[1] = torch.empty(18, device=device)
    elif kind == "dtype":
        outs[1] = torch.empty(17, dtype=torch.float64, device=device)
    elif kind == "device":
        outs[1] = torch.empty(17, device="meta")
    elif kind == "shared":
        outs[2] = outs[0].view(-1)[3:10]  # overlaps out[0]
    elif kind == "shared, transposed":
        outs[0] = torch.empty(5, 3, device=device).t()  # non-contiguous; out[2] inside its memory
        outs[2] = outs[0].as_strided((7,), (1,), outs[0].storage_offset() + 8)
    elif kind == "aliases own slots":
        outs[1] = states[1].slots[0, :17]
    elif kind == "aliases another state's slots":
        outs[2] = states[0].slots[2, 3:10]
    elif kind == "requires grad":
        outs[1] = torch.zeros(17, device=device, requires_grad=True)
    elif kind == "expanded":
        outs[1] = torch.zeros(1, device=device).expand(17)
    return outs


CONSTRUCTION_REFUSALS = [
    ("shape", ValueError, r"out\[1\] has shape \(18,\) but the state caches shape \(17,\)"),
    ("dtype", TypeError, r"out\[1\] has dtype torch.float64 but the state expects torch.float32"),
    ("device", ValueError, r"out\[1\] is on meta but the state lives on"),
    ("shared", ValueError, r"out\[2\] and out\[0\] share memory"),
    ("shared, transposed", ValueError, r"out\[2\] and out\[0\] share memory"),
    ("aliases own slots", ValueError, r"out\[1\] aliases the state's own storage"),
    ("aliases another state's slots", ValueError, r"out\[2\] aliases the state's own storage"),
    ("requires grad", ValueError, r"out requires grad"),
    ("expanded", ValueError, r"out\[1\] has overlapping elements"),
]


@pytest.mark.parametrize("case", CONSTRUCTION_REFUSALS, ids=[c[0] for c in CONSTRUCTION_REFUSALS])
def test_refused_construction(case, device):
    kind, exc, match = case
    states, twins, outs = _three(device, "torch")
    bad = _bad_outs(kind, states, outs, device)
    saved = [o.clone() for o in outs]
    with pytest.raises(exc, match=match):
        StateGroup(states, bad)
    with pytest.raises(exc, match=match):
        forecast_group_(states, bad, 1.0)
    _assert_untouched(states, twins, outs, saved)


def test_refused_construction_lists(device):
    states, twins, outs = _three(device, "torch")
    with pytest.raises(ValueError, match=r"one out per state, got 3 states and 2 outs"):
        StateGroup(states, outs[:2])
    with pytest.raises(ValueError, match=r"at least one state"):
        StateGroup([], [])
    with pytest.raises(ValueError, match=r"lists the same state twice"):
        StateGroup([states[0], states[0]], [outs[0], torch.empty_like(outs[0])])
    with pytest.raises(TypeError, match=r"must be a foca_kernels CacheState"):
        StateGroup([states[0], "x"], outs[:2])
    with pytest.raises(TypeError, match=r"out\[1\] must be a torch.Tensor"):
        StateGroup(states[:2], [outs[0], [0.0] * 17])
    _assert_untouched(states, twins, outs, [o.clone() for o in outs])


STALE = {
    "move_to_": lambda sts: sts[1].move_to_(torch.zeros_like(sts[1].slots)),
    "pack_states_": lambda sts: pack_states_(sts),
    "pack_states_ of one": lambda sts: pack_states_([sts[2]]),
}


@pytest.mark.parametrize("how", list(STALE))
def test_stale_group_refused(how, backend, device):
    states, twins, outs = _three(device, backend)
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    STALE[how](states)
    with pytest.raises(RuntimeError, match=r"stale StateGroup: state \d was moved"):
        group.forecast_(1.0, backend=backend)
    _assert_untouched(states, twins, outs, saved)
    # a new group over the moved states works (the old outs are still separate tensors)
    StateGroup(states, outs).forecast_(0.5, backend=backend)
    for i, (b, out) in enumerate(zip(twins, outs)):
        assert_bits(out, fk.forecast(b, 0.5, backend=backend), f"state {i} forecast from a new group")


@pytest.mark.parametrize("change", ["update_", "reset", "move_to_"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_state_changed_after_a_group_step_is_seen(change, packed, backend, device):
    """After a step of the group, its next step skips the per-state checks when no state
    changed since (CacheState.stamp); a state changed by another call in between is seen: its
    own class, bit-identical to forecast_ per state, or a refusal when it was moved."""
    def make():
        sts = [fk.allocate(torch.empty(5, 3, device=device), "foca", reading="r3") for _ in range(4)]
        for k in range(3):
            for i, st in enumerate(sts):
                fk.update_(st, feature(st.shape, torch.float32, device, 10 * k + i), 1.0, backend=full_backend(backend))
        return sts

    states, twins = make(), make()
    outs = pack_states_(states) if packed else [torch.empty(5, 3, device=device) for _ in states]
    group = StateGroup(states, outs)
    for h in (1.0, 0.5):  # the second step takes the O(1) path
        group.forecast_(h, backend=backend)
        for b in twins:
            fk.forecast(b, h, backend=backend)
    if change == "move_to_":
        states[1].move_to_(torch.zeros_like(states[1].slots))
        with pytest.raises(RuntimeError, match=r"stale StateGroup: state 1 was moved"):
            group.forecast_(1.0, backend=backend)
        return
    for sts in (states, twins):
        if change == "reset":
            sts[1].reset()
        for k in range(1 if change == "update_" else 2):
            fk.update_(sts[1], feature(sts[1].shape, torch.float32, device, 55 + k), 1.0, backend=full_backend(backend))
    group.forecast_(0.75, backend=backend)
    for i, (b, out) in enumerate(zip(twins, outs)):
        assert_bits(out, fk.forecast(b, 0.75, backend=backend), f"state {i} after state 1 changed ({change})")


def test_inference_states_refused_outside_inference_mode(backend, device):
    with torch.inference_mode():
        states, twins, outs = _three(device, backend)
    outs = [torch.zeros(s, device=device) for s in SHAPES3]
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    with pytest.raises(RuntimeError, match=r"state was allocated under torch.inference_mode"):
        group.forecast_(1.0, backend=backend)
    _assert_untouched(states, twins, outs, saved)
    with torch.inference_mode():  # where they belong: works, and equals the twins
        group.forecast_(0.5, backend=backend)
        for i, (b, out) in enumerate(zip(twins, outs)):
            assert_bits(out, fk.forecast(b, 0.5, backend=backend), f"state {i} forecast in inference_mode")


def test_inference_out_refused_outside_inference_mode(backend, device):
    states, twins, outs = _three(device, backend)
    with torch.inference_mode():
        outs[1] = torch.zeros(17, device=device)
    saved = [o.clone() for o in outs]
    group = StateGroup(states, outs)
    with pytest.raises(RuntimeError, match=r"out is an inference tensor"):
        group.forecast_(1.0, backend=backend)
    _assert_untouched(states, twins, outs, saved)


def test_forecast_group_function(backend, device):
    """forecast_group_ (validates and runs once), per-state h with a 0-d tensor among them,
    then a 0-d tensor h for all."""
    states, twins, outs = _three(device, backend)
    hs = [0.5, torch.tensor(0.5), 0.75]
    res = forecast_group_(states, outs, hs, backend=backend)
    assert all(r is o for r, o in zip(res, outs))
    for i, (b, hb) in enumerate(zip(twins, [0.5, 0.5, 0.75])):
        assert_bits(outs[i], fk.forecast(b, hb, backend=backend), f"state {i}")
        assert_same_state(states[i], b, f"state {i}")
    forecast_group_(states, outs, torch.tensor(1.25, dtype=torch.float64), backend=backend)
    for i, b in enumerate(twins):
        assert_bits(outs[i], fk.forecast(b, 1.25, backend=backend), f"state {i}, tensor h")
        assert_same_state(states[i], b, f"state {i}, tensor h")


def test_merged_span_does_not_write_another_out(backend, device):
    x = feature((10,), torch.float32, device, 1)
    a, b, c, c_twin = (fk.allocate(x, "reuse") for _ in range(4))
    for s in (a, b):
        fk.update_(s, x, backend=backend)
    for s in (c, c_twin):  # another history: its own class, launched first
        fk.update_(s, x, backend=backend)
        fk.update_(s, 2 * x, backend=backend)
    out_a, out_b = pack_states_([a, b])  # columns [0, 10) and [64, 74) of one out arena
    out_c = out_a.as_strided((10,), (1,), out_a.storage_offset() + 10)  # [10, 20): no other out there
    group = StateGroup([c, a, b], [out_c, out_a, out_b])
    group.forecast_(1.0, backend=backend)
    assert_bits(out_c, fk.forecast(c_twin, 1.0, backend=backend), "out of the state placed in the padding")


# ---- pack_states_ -----------------------------------------------------------------------------------
def _kinds(device):
    f32, bf = torch.float32, torch.bfloat16
    return [  # shape, method, opts, io dtype, state dtype, kind
        ((3, 5), "foca", {}, f32, f32, "fp32-4"),  # the default reading, calibrated: 4 slots
        ((70,), study("r6"), {}, f32, f32, "fp32-3"),
        ((7,), "taylorseer", {"order": 2}, f32, f32, "fp32-3"),
        ((9,), "reuse", {}, f32, f32, "fp32-1"),
        ((17,), "foca", {"anchor": "secant"}, f32, f32, "fp32-4"),
        ((2, 2), "foca", {}, bf, bf, "bf16-4"),
        ((5,), "foca", {}, f32, bf, "bf16state-4"),
        ((65,), "foca", {}, f32, bf, "bf16state-4"),
        ((4,), "reuse", {}, f32, f32, "fp32-1"),
    ]


def test_pack_states_layout(device):
    specs = _kinds(device)
    states = [fk.allocate(torch.empty(s, dtype=io, device=device), m, dtype=sd, **o) for s, m, o, io, sd, _ in specs]
    for k, h in enumerate((1.0, 0.5)):
        for i, st in enumerate(states):
            fk.update_(st, feature(st.shape, st.io_dtype, device, 10 * k + i), h, backend="torch")
    before = [(st.slots.clone(), book(st), st.nbytes, st.slots.shape) for st in states]
    outs = pack_states_(states)
    by_kind: dict = {}
    for st, out, (slots, bk, nbytes, shape), spec in zip(states, outs, before, specs):
        assert st.nbytes == nbytes == fk.state_nbytes(st) and st.slots.shape == shape
        assert_bits(st.slots, slots, f"{spec[-1]} slots after packing")
        assert book(st) == bk
        assert out.shape == st.shape and out.dtype == st.io_dtype and out.device == st.device and out.is_contiguous()
        assert out.data_ptr() % 16 == 0 and st.slots.data_ptr() % 16 == 0 and st.slots.stride(0) % 64 == 0
        by_kind.setdefault(spec[-1], []).append((st, out))
    storages = {}
    for kind, members in by_kind.items():
        slot_store = {st.slots.untyped_storage().data_ptr() for st, _ in members}
        out_store = {out.untyped_storage().data_ptr() for _, out in members}
        assert len(slot_store) == 1 and len(out_store) == 1, f"{kind}: one allocation for the slots, one for the outs"
        storages[kind] = slot_store.pop()
        st0, out0 = members[0]
        assert st0.slots.untyped_storage().nbytes() == sum(st.nbytes for st, _ in members)
        for st, out in members:  # an out sits at its state's slot columns
            col = (st.slots.data_ptr() - st0.slots.data_ptr()) // st.slots.element_size()
            assert (out.data_ptr() - out0.data_ptr()) // out.element_size() == col
    assert len(set(storages.values())) == len(storages), "different kinds, different allocations"


def test_pack_states_refusals(device):
    a = fk.allocate(torch.empty(5, device=device))
    slots = a.slots
    with pytest.raises(ValueError, match=r"pack_states_ got the same state twice"):
        pack_states_([a, a])
    with pytest.raises(TypeError, match=r"must be a foca_kernels CacheState"):
        pack_states_([a, "x"])
    assert a.slots is slots


@pytest.mark.parametrize("mi", [0, 6], ids=[METHOD_IDS[i] for i in (0, 6)])
def test_packed_states_single_calls_unchanged(mi, backend, device):
    """update_ / forecast_ / forecast on packed states (their slots a column range of a shared
    allocation, row stride > their own) give exactly what unpacked twins give; packing again
    (already packed, another order) changes nothing either."""
    method, opts = METHODS[mi]
    shapes = [(3, 5), (70,)]
    states = [fk.allocate(torch.empty(s, device=device), method, **opts) for s in shapes]
    twins = [fk.allocate(torch.empty(s, device=device), method, **opts) for s in shapes]
    outs = pack_states_(states)
    assert states[0].slots.stride(0) > states[0].slots.shape[1]
    sched = [("full", 1.0), ("full", 0.5), ("skip", 0.7), ("full", 1.3), ("repack", None), ("skip", 1.1),
             ("full", 0.6)]
    for j, (kind, h) in enumerate(sched):
        if kind == "repack":
            outs = pack_states_(states[::-1])[::-1]
            continue
        for i, (a, b) in enumerate(zip(states, twins)):
            if kind == "full":
                x = feature(a.shape, torch.float32, device, 10 * j + i)
                fk.update_(a, x, h, backend=backend)
                fk.update_(b, x, h, backend=backend)
            else:
                fk.forecast_(a, outs[i], h, backend=backend)
                assert_bits(outs[i], fk.forecast(b, h, backend=backend), f"step {j} state {i}")
            assert_same_state(a, b, f"step {j} state {i}")


def test_packed_members_merged_into_one_update(backend, device, monkeypatch):
    """A packed group's members are one update (one PyTorch member / one Triton program for
    these small sizes); unpacked, the launch has one member / program per state."""
    seen = []
    from foca_kernels.ops import torch_group

    orig_torch = torch_group.group_torch
    monkeypatch.setattr(torch_group, "group_torch", lambda members, *a: (seen.append(len(members)),
                                                                          orig_torch(members, *a))[1])
    if backend == "triton":
        from foca_kernels.ops import triton_group

        orig = triton_group.group_triton
        monkeypatch.setattr(triton_group, "group_triton", lambda *a: (seen.append(a[4]), orig(*a))[1])
    for v in ("unpacked", "packed"):
        tw = Twins([(s, "foca", {}, torch.float32, torch.float32, 0) for s in SMALL_SHAPES], device, backend, (v,))
        seen.clear()
        tw.skip(0.75)
        assert seen == [1 if v == "packed" else len(SMALL_SHAPES)], (v, seen)
    # packed, but the group lists them in another order (and leaves one out): nothing to merge
    # except the pair that still follows each other (3 then 4), still one launch, same results
    states, outs = tw.sets["packed"]
    order = [3, 4, 0, 2]
    group = StateGroup([states[i] for i in order], [outs[i] for i in order])
    seen.clear()
    group.forecast_(0.6, backend=backend)
    assert seen == [3], seen
    for i in order:
        assert_bits(outs[i], fk.forecast(tw.twins[i], 0.6, backend=backend), f"state {i}, reordered group")
        assert_same_state(states[i], tw.twins[i], f"state {i}, reordered group")
    assert_same_state(states[1], tw.twins[1], "state 1, left out")


# ---- CacheState.move_to_ -------------------------------------------------------------------------
def test_move_to_keeps_contents_and_history(backend, device):
    x = [feature((3, 7), torch.float32, device, k) for k in range(3)]
    a, b = fk.allocate(x[0]), fk.allocate(x[0])
    for s in (a, b):
        fk.update_(s, x[0], backend=backend)
        fk.update_(s, x[1], 0.5, backend=backend)
    target = torch.full((a.slots.shape[0], a.slots.shape[1] + 64), float("nan"), device=device)[:, 64:]
    a.move_to_(target)
    assert a.slots is target
    assert_same_state(a, b, "moved state", padding=True)
    for h in (0.7, 1.2):
        assert_bits(fk.forecast(a, h, backend=backend), fk.forecast(b, h, backend=backend), "forecast after move_to_")
    fk.update_(a, x[2], 0.3, backend=backend)
    fk.update_(b, x[2], 0.3, backend=backend)
    assert_same_state(a, b, "moved state after a full step", padding=True)
    assert torch.isnan(target._base[:, :64]).all(), "nothing outside the new slots is written"


def test_move_to_refusals(device):
    a = fk.allocate(torch.empty(3, 7, device=device))
    fk.update_(a, torch.ones(3, 7, device=device))
    slots, bk = a.slots, book(a)
    n, s = a.slots.shape
    bad = [
        (torch.zeros(n, s + 64, device=device),
         rf"new slots must be \({n}, {s}\) torch.float32 .* got \({n}, {s + 64}\)"),
        (torch.zeros(n, s, dtype=torch.float16, device=device), r"new slots must be .* got .* torch.float16"),
        (torch.zeros(n, s, device="meta"), r"new slots must be .* got .* on meta"),
        (torch.zeros(s, n, device=device).t(), r"unit column stride"),
        (torch.zeros(n, s + 1, device=device)[:, :s], r"row stride that is a multiple of 64"),
    ]
    for tensor, match in bad:
        with pytest.raises(ValueError, match=match):
            a.move_to_(tensor)
        assert a.slots is slots and book(a) == bk
