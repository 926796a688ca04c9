"""Grouped full steps (foca_kernels/full_group.py): update_group_.

* parity: a grouped full step is BIT-IDENTICAL to ``update_(state, feature, h)`` per state on the
  same backend (stored slots and bookkeeping after every step), for every method (the calibrated
  reading's per-state fit included), fp32/fp16/bf16 and a bf16 state with fp32 features, odd
  sizes, unequal steps, per-state step sizes, states with different histories in one call (one
  class per history), features that are non-contiguous or not 16-byte aligned, and a member
  larger than the fit's block;
* launches: O(1) per class, the same for 2 and for 9 states (Triton: one for a closed form,
  three for the calibrated fit); a sharded fit all-reduces once per class;
* refusals: each names the problem and leaves every state bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch

import foca_kernels as fk
from foca_kernels import full_group
from foca_kernels.ops import fit as fit_ops
from helpers import METHOD_IDS, METHODS

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPE_CASES = {  # (feature dtype, state dtype)
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16state_fp32io": (torch.float32, torch.bfloat16),
}
CALIBRATED = ("foca", {})  # the default reading
ALL_METHODS = METHODS + [CALIBRATED]
ALL_IDS = METHOD_IDS + ["foca-calibrated"]
# 12 states (the PyTorch path's foreach update needs >= 8 in one class): numel 1..31, tails and bodies
SHAPES = [(1,), (7,), (3, 5), (17,), (2, 8), (5,), (9,), (4, 4), (31,), (2, 3), (16,), (19,)]
BOOK = ("t", "n_full", "n_skip", "n_steps", "_slot_of", "_time_of", "_memo")
# (kind, h): warm-up, then full steps with unequal sizes between skipped ones
SCHEDULE = [("full", 1.0), ("full", 0.8), ("full", 1.3), ("skip", 0.6), ("full", 1.1), ("full", 0.7),
            ("skip", 1.2), ("skip", 0.9), ("full", 1.4), ("full", 0.5)]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(_INT[x.dtype])


def assert_same(a, b, name: str) -> None:
    """Stored values (live columns) bit for bit, and the bookkeeping."""
    sa, sb = a.slots[:, :a.numel], b.slots[:, :b.numel]
    diff = bits(sa) != bits(sb)
    if diff.any():
        k = int(torch.nonzero(diff.reshape(-1))[0])
        raise AssertionError(f"{name}: {int(diff.sum())}/{sa.numel()} stored elements differ bitwise; first at "
                             f"{k}: {sa.reshape(-1)[k].item()!r} vs {sb.reshape(-1)[k].item()!r}")
    for k in BOOK:
        assert getattr(a, k) == getattr(b, k), f"{name}: {k} {getattr(a, k)!r} != {getattr(b, k)!r}"


def feature(shape, dtype, seed: int, t: float) -> torch.Tensor:
    """A smooth-in-time feature (so the fit has something to fit) plus noise."""
    g = torch.Generator().manual_seed(seed)
    base, slope, curve, noise = torch.randn((4,) + tuple(shape), generator=g, dtype=torch.float64)
    return (base + slope * t + 0.3 * curve * t * t + 0.05 * noise).to(dtype)


def snapshot(states):
    return [(st.slots.clone(), {k: copy.deepcopy(getattr(st, k)) for k in BOOK}) for st in states]


def assert_unchanged(states, snap) -> None:
    for i, (st, (slots, book)) in enumerate(zip(states, snap)):
        assert torch.equal(bits(st.slots), bits(slots)), f"state {i}: slots changed"
        assert {k: getattr(st, k) for k in BOOK} == book, f"state {i}: bookkeeping changed"


def drive(method, opts, dtypes, backend, shapes=SHAPES, extra=(0, 1), per_state_h=False, reset_at=None,
          odd_features=False):
    """Twins: ``groups`` take every full step in one update_group_, ``singles`` one update_ per
    state; both take the same skipped steps (forecast_ per state, PyTorch path). States in
    ``extra`` get one more full step first (another history, another class)."""
    io, sd = DTYPE_CASES[dtypes]

    def make():
        return [fk.allocate(torch.empty(s, dtype=io), method, dtype=sd, **opts) for s in shapes]

    groups, singles = make(), make()
    seed = 0
    for i in extra:
        seed += 1
        x = feature(shapes[i], io, seed, -1.0)
        fk.update_(groups[i], x, 1.0, backend=backend)
        fk.update_(singles[i], x, 1.0, backend=backend)
    t = 0.0
    for step, (kind, h) in enumerate(SCHEDULE):
        t += h
        if reset_at == step:  # a fresh history next to the others
            groups[2].reset()
            singles[2].reset()
        if kind == "skip":
            for a, b in zip(groups, singles):
                if a.ready:
                    fk.forecast_(a, torch.empty(a.shape, dtype=io), h, backend="torch")
                    fk.forecast_(b, torch.empty(b.shape, dtype=io), h, backend="torch")
            continue
        xs = []
        for i, s in enumerate(shapes):
            seed += 1
            x = feature(s, io, seed, t)
            if odd_features and i % 3 == 1:  # non-contiguous, or one element past a 16-byte boundary
                x = (torch.empty(tuple(s) + (2,), dtype=io).select(-1, 0).copy_(x) if i % 2
                     else torch.empty(x.numel() + 1, dtype=io)[1:].view(s).copy_(x))
            xs.append(x)
        hs = [h * (1.0 + 0.05 * (i % 3)) for i in range(len(shapes))] if per_state_h else h
        fk.update_group_(groups, xs, hs, backend=backend)
        for i, (b, x) in enumerate(zip(singles, xs)):
            fk.update_(b, x, hs[i] if per_state_h else h, backend=backend)
        for i, (a, b) in enumerate(zip(groups, singles)):
            assert_same(a, b, f"state {i} after step {step}")
    return groups, singles


# ---- parity ---------------------------------------------------------------------------------------------
PARITY = [(m, o, d) for (m, o), mid in zip(ALL_METHODS, ALL_IDS) for d in ("fp32", "bf16")] + [
    (m, o, d) for (m, o) in (CALIBRATED, ("foca", {"reading": "r7"})) for d in ("fp16", "bf16state_fp32io")]
PARITY_IDS = [f"{ALL_IDS[ALL_METHODS.index((m, o))]}-{d}" for m, o, d in PARITY]


@pytest.mark.parametrize("method,opts,dtypes", PARITY, ids=PARITY_IDS)
def test_group_equals_per_state(method, opts, dtypes, backend):
    groups, _ = drive(method, opts, dtypes, backend)
    assert all(st.n_full == 7 for st in groups[2:]) and groups[1].n_full == 8


@pytest.mark.parametrize("method,opts", [CALIBRATED, ("foca", {"reading": "r3"}), ("foca", {"anchor": "secant"})],
                         ids=["foca-calibrated", "foca-r3", "foca-r0"])
def test_per_state_steps_resets_and_odd_features(method, opts, backend):
    """Per-state step sizes (one class per size), a state reset mid-way (a fresh history in the
    same call), and features that are non-contiguous or misaligned by one element."""
    drive(method, opts, "fp32", backend, per_state_h=True, reset_at=4, odd_features=True)


@pytest.mark.parametrize("dtypes", ["fp32", "bf16"])
def test_calibrated_member_larger_than_the_fit_block(dtypes, backend):
    """A member of several fit blocks (and an odd tail) next to tiny ones: its sums are the
    same whichever group it runs in."""
    from foca_kernels.ops import triton_fit

    n = triton_fit.FIT_BLOCK + 77
    groups, _ = drive("foca", {}, dtypes, backend, shapes=[(3,), (n,), (1,)], extra=())
    assert groups[1].n_full == 7


def test_fit_really_runs_in_the_group(monkeypatch):
    """The calibrated parity above covers fitted steps: from the fourth computed value on, each
    full step refits (the launch carries a fit) and the slope moves."""
    seen = []
    orig = full_group.plan_step

    def spy(*a, **k):
        launch = orig(*a, **k)
        seen.append(launch.fit is not None)
        return launch

    monkeypatch.setattr(full_group, "plan_step", spy)
    drive("foca", {}, "fp32", "torch", shapes=[(5,), (9,)], extra=())
    assert seen[:3] == [False, False, False] and all(seen[3:]) and len(seen) == 7


def test_same_byte_layout_in_another_dtype():
    """The Triton table is cached by the members' layout; its rows hold offsets in elements, so
    two groups at the same byte offsets in bf16 and then fp32 need two tables (one shared table
    sent the fp32 group's second member to twice its distance: a write into other memory)."""
    if fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    arena = torch.zeros(16384, dtype=torch.uint8)  # room for where a wrong table would write
    for dtype in (torch.bfloat16, torch.float32):
        arena.zero_()
        es = torch.empty(0, dtype=dtype).element_size()
        states = []
        for k, byte in enumerate((0, 4096)):
            st = fk.allocate(torch.empty(16, dtype=dtype), "reuse")
            st.move_to_(arena[byte: byte + st.slots.numel() * es].view(dtype).view(st.slots.shape))
            states.append(st)
        feats = [torch.full((16,), 1.0 + k, dtype=dtype) for k in range(2)]
        fk.update_group_(states, feats, backend="triton")
        for k, st in enumerate(states):
            assert torch.equal(st.slots[0, :16], feats[k]), f"{dtype}: member {k} not written"
        assert int(arena[8192:].count_nonzero()) == 0, f"{dtype}: a write outside both members"


# ---- launches ---------------------------------------------------------------------------------------------
class _Counted:
    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def _launches(method, opts, n_states, monkeypatch):
    from foca_kernels.ops import triton_fit, triton_group

    counts: dict = {}
    monkeypatch.setattr(triton_group, "_group_kernel", _Counted(triton_group._group_kernel, counts, "group"))
    monkeypatch.setattr(triton_fit, "_fit_dots_kernel", _Counted(triton_fit._fit_dots_kernel, counts, "dots"))
    monkeypatch.setattr(triton_fit, "_fit_sum_kernel", _Counted(triton_fit._fit_sum_kernel, counts, "sum"))
    states = [fk.allocate(torch.empty(8 + i), method, **opts) for i in range(n_states)]
    per_step = []
    for k in range(5):
        counts.clear()
        fk.update_group_(states, [feature((8 + i,), torch.float32, 10 * k + i, float(k)) for i in range(n_states)],
                         backend="triton")
        per_step.append(dict(counts))
    return per_step


@pytest.mark.parametrize("method,opts,expected", [
    ("foca", {}, [{"group": 1}] * 3 + [{"group": 1, "dots": 1, "sum": 1}] * 2),  # the fit from the 4th value
    ("foca", {"reading": "r7"}, [{"group": 1}] * 5),
    ("reuse", {}, [{"group": 1}] * 5),
], ids=["foca-calibrated", "foca-r7", "reuse"])
def test_launches_do_not_grow_with_the_states(method, opts, expected, monkeypatch):
    if fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    assert _launches(method, opts, 2, monkeypatch) == expected
    assert _launches(method, opts, 9, monkeypatch) == expected


def test_torch_path_calls(monkeypatch):
    """The PyTorch path: one foreach copy per class for a closed form; the calibrated reading's
    fit one call per state (the compiled C loop or the PyTorch ops), then the one copy."""
    copies, fits = [], []
    real_copy, real_fit = torch._foreach_copy_, fit_ops.run_fit
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: (copies.append(len(d)), real_copy(d, s)))
    monkeypatch.setattr(fit_ops, "run_fit", lambda *a: (fits.append(a[3]), real_fit(*a)))
    for method, opts in (("foca", {"reading": "r3"}), CALIBRATED):
        copies.clear()
        fits.clear()
        states = [fk.allocate(torch.empty(8), method, **opts) for _ in range(6)]
        for k in range(5):
            fk.update_group_(states, [feature((8,), torch.float32, 10 * k + i, float(k)) for i in range(6)],
                             backend="torch")
        if method == "foca" and not opts:  # steps 2 and 3: r7's rows, per state; 4 and 5 fit
            assert copies == [6, 6, 6] and len(fits) == 2 * 6
        else:
            assert copies == [6] * 5 and not fits


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_sharded_fit_all_reduces_once_per_class(backend_name, monkeypatch):
    """``sharded=True``: every state's five sums go through ONE all_reduce per class (here a
    stand-in that adds a second, identical shard), and each state's result equals its own
    update_'s, which all-reduces per state."""
    if backend_name == "triton" and fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    calls = []

    def all_reduce(t, *a, **k):
        calls.append(tuple(t.shape))
        t.mul_(2.0)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    shapes = [(5,), (9,), (12,)]
    groups = [fk.allocate(torch.empty(s), "foca", sharded=True) for s in shapes]
    singles = [fk.allocate(torch.empty(s), "foca", sharded=True) for s in shapes]
    for st in (groups[0], singles[0]):  # another history: its own class
        fk.update_(st, feature(shapes[0], torch.float32, 99, -1.0), 1.0, backend=backend_name)
    for k, h in enumerate([1.0, 0.8, 1.3, 1.1, 0.7, 1.4]):
        xs = [feature(s, torch.float32, 10 * k + i, float(k)) for i, s in enumerate(shapes)]
        calls.clear()
        fk.update_group_(groups, xs, h, backend=backend_name)
        grouped = sorted(calls)
        calls.clear()
        for st, x in zip(singles, xs):
            fk.update_(st, x, h, backend=backend_name)
        single = calls[:]
        for i, (a, b) in enumerate(zip(groups, singles)):
            assert_same(a, b, f"state {i} after step {k}")
        fitted = [st.n_full >= 4 for st in groups]  # this step refitted (three values existed before it)
        assert grouped == sorted([(1, 5)] * fitted[0] + [(2, 5)] * fitted[1])
        assert len(single) == sum(fitted)
    assert groups[1].n_full == 6 and len(single) == 3 and grouped == [(1, 5), (2, 5)]


# ---- refusals ---------------------------------------------------------------------------------------------
def _ready_states(n=3, method="foca", **opts):
    states = [fk.allocate(torch.empty(6), method, **opts) for _ in range(n)]
    for k in range(4):
        fk.update_group_(states, [feature((6,), torch.float32, 10 * k + i, float(k)) for i in range(n)],
                         backend="torch")
    return states


def _refusal_cases():
    x = [torch.randn(6) for _ in range(3)]
    return {
        "length": (lambda s: (s, x[:2]), ValueError, "one feature per state"),
        "empty": (lambda s: ([], []), ValueError, "at least one state"),
        "twice": (lambda s: ([s[0], s[0], s[1]], x), ValueError, "same state twice"),
        "not a state": (lambda s: (s[:2] + ["x"], x), TypeError, "CacheState"),
        "shape": (lambda s: (s, x[:2] + [torch.randn(7)]), ValueError, r"features\[2\] has shape"),
        "dtype": (lambda s: (s, [x[0].half()] + x[1:]), TypeError, r"features\[0\] has dtype"),
        "alias own": (lambda s: (s, x[:1] + [s[1].slots[0, :6]] + x[2:]), ValueError,
                      r"features\[1\] aliases its state"),
        "alias other": (lambda s: (s, x[:2] + [s[0].slots[1, :6]]), ValueError, r"features\[2\] aliases states\[0\]"),
        "h": (lambda s: (s, x, -1.0), ValueError, "must be finite and > 0"),
        "h list": (lambda s: (s, x, [1.0, 1.0]), ValueError, "one step size or 3"),
        "h in list": (lambda s: (s, x, [1.0, float("nan"), 1.0]), ValueError, r"h\[1\]"),
        "coefficient": (lambda s: (s, x, 1e-39), ValueError, "step size h"),
        "far beyond the history": (lambda s: (s, x, 1e10), ValueError, r"h=10000000000\.0 is .* times the span"),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_refused_update_group_changes_nothing(case, backend):
    states = _ready_states()
    make, exc, match = _refusal_cases()[case]
    args = make(states)
    snap = snapshot(states)
    with pytest.raises(exc, match=match):
        fk.update_group_(*args, backend=backend)
    assert_unchanged(states, snap)


def test_rfc_state_refused():
    u = torch.randn(6)
    st = fk.allocate(torch.randn(6), "rfc", input=u)
    with pytest.raises(TypeError, match="needs the module's input"):
        fk.update_group_([st], [torch.randn(6)])


def test_inference_state_refused_outside_inference_mode():
    with torch.inference_mode():
        states = [fk.allocate(torch.empty(6), "foca", reading="r3") for _ in range(2)]
    snap = snapshot(states)
    with pytest.raises(RuntimeError, match="inference_mode"):
        fk.update_group_(states, [torch.randn(6), torch.randn(6)])
    assert_unchanged(states, snap)
