"""Per-stream cache state: one allocation of full-size slots plus the bookkeeping that says
which slot holds which role of the method, and at what time.

:meth:`CacheState.plan` turns a method's :class:`~foca_kernels.methods.Transition` into one
fused launch: the distinct slots to read, the slots to write, and a coefficient matrix.
Roles that are carried over keep their slot (rotation is re-pointing, not copying); every
new value goes into a slot nobody keeps, possibly one it reads (safe in an elementwise pass).
Nothing here touches a model, and nothing changes until :meth:`commit`.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from .methods import FEATURE, Keep, Method, Same, StepContext, Transition
from .methods.base import Fit

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_ALIGN = 64  # slot stride in elements: keeps every slot 128-byte aligned for vector loads


def slot_stride(numel: int) -> int:
    """Elements between consecutive slots: numel rounded up to SLOT_ALIGN."""
    return -(-numel // SLOT_ALIGN) * SLOT_ALIGN


class SlotFit(NamedTuple):
    """A :class:`~foca_kernels.methods.base.Fit` in physical slots: each combination is a tuple
    of (slot or FEATURE, coefficient) pairs (hashable: what runs it caches per structure);
    ``slot`` is overwritten before the launch runs."""

    slot: int
    r: tuple
    u: tuple
    q: tuple
    U: tuple
    V: tuple
    phi_range: tuple
    theta_range: tuple
    fixed: tuple  # (phi, theta) when a sum is not finite (methods.base.Fit)
    sharded: bool = False

    @property
    def coef(self) -> Tuple[float, ...]:
        return tuple(c for combo in (self.r, self.u, self.q, self.U, self.V) for _, c in combo)

    @property
    def tensors_moved(self) -> int:
        """The fit's traffic in its two-pass form: pass 1 reads what r, u, q are made of (the
        dot products), pass 2 what U, V are made of, and writes the slot."""
        first = {k for c in (self.r, self.u, self.q) for k, _ in c}
        second = {k for c in (self.U, self.V) for k, _ in c}
        return len(first) + len(second) + 1


class Launch(NamedTuple):
    """One fused update, in physical slots. (A named tuple: planned on every step, and
    building one costs a fraction of a frozen dataclass's.)"""

    reads: Tuple[int, ...]
    has_feature: bool
    writes: Tuple[int, ...]
    has_out: bool
    coef: Tuple[float, ...]  # rows: writes then out; columns: reads then feature
    slot_of: Dict[str, Optional[int]]  # role -> slot after the step
    time_of: Dict[str, Optional[float]]  # role -> time after the step
    memo: Any = None  # the method's host-side scalars after the step
    fit: Optional[SlotFit] = None  # a role refitted on the device before the launch (ops/fit.py)

    @property
    def tensors_moved(self) -> int:
        """Full-size tensors read plus written: the memory traffic of this launch (and of its
        fit, if any, counted at its two-pass floor: ops/fit.py)."""
        fit = 0 if self.fit is None else self.fit.tensors_moved
        return len(self.reads) + int(self.has_feature) + len(self.writes) + int(self.has_out) + fit


class CacheState:
    """Stored tensors of one cached stream (one module output) for one method."""

    # Bumped by every change of any state's bookkeeping or slots (commit, reset, move_to_): a
    # caller that saw the value after its own change knows nothing changed since (StateGroup's
    # per-step checks are then O(1) in its number of states).
    stamp = 0

    def __init__(self, method: Method, shape, dtype: torch.dtype, device, io_dtype: Optional[torch.dtype] = None,
                 slots: Optional[torch.Tensor] = None):
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"state dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        io_dtype = dtype if io_dtype is None else io_dtype
        if io_dtype not in STORAGE_DTYPES:
            raise TypeError(f"feature dtype must be one of {STORAGE_DTYPES}, got {io_dtype}")
        self.method = method
        self.shape = torch.Size(shape)
        self.numel = self.shape.numel()
        if self.numel == 0:
            raise ValueError(f"cannot cache an empty tensor (shape {tuple(self.shape)})")
        self.dtype = dtype
        self.io_dtype = io_dtype
        stride = slot_stride(self.numel)
        if slots is None:
            slots = torch.zeros(method.n_slots, stride, dtype=dtype, device=device)
        elif (slots.shape != (method.n_slots, stride) or slots.dtype != dtype or slots.device != torch.device(device)
              or slots.stride(1) != 1 or slots.stride(0) % SLOT_ALIGN):
            # slots handed in: a view of a larger allocation shared with other tensors (RFC keeps
            # its input history in the same allocation as the output history)
            raise ValueError(f"slots must be a ({method.n_slots}, {stride}) {dtype} view on {device} with unit "
                             f"column stride and a row stride that is a multiple of {SLOT_ALIGN}")
        self.slots = slots
        self._rows = None  # (slots, flat views of its rows): see row()
        self.reset()

    def move_to_(self, slots: torch.Tensor) -> None:
        """Keep this state's slots in ``slots`` from now on (e.g. a column range of one
        allocation shared by many states, so one launch can update them all): the contents
        are copied, the bookkeeping is unchanged."""
        if slots.shape != self.slots.shape or slots.dtype != self.dtype or slots.device != self.device:
            raise ValueError(
                f"new slots must be {tuple(self.slots.shape)} {self.dtype} on {self.device}, got "
                f"{tuple(slots.shape)} {slots.dtype} on {slots.device}"
            )
        if slots.stride(1) != 1 or slots.stride(0) % SLOT_ALIGN:
            raise ValueError(f"new slots need unit column stride and a row stride that is a multiple of {SLOT_ALIGN}")
        slots.copy_(self.slots)
        self.slots = slots
        CacheState.stamp += 1

    # ---- bookkeeping -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all history (the allocation is kept and reused)."""
        self._slot_of: Dict[str, Optional[int]] = {r: None for r in self.method.roles}
        self._time_of: Dict[str, Optional[float]] = {r: None for r in self.method.roles}
        self.t: Optional[float] = None  # time of the latest step
        self.n_full = 0  # fully computed steps since the last reset
        self.n_skip = 0  # consecutive skipped steps since the last full one
        self.n_steps = 0
        self._memo: Any = None  # the method's host-side scalars (Transition.memo)
        self._launch: Optional[Launch] = None  # the launch last committed
        CacheState.stamp += 1

    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    @property
    def ready(self) -> bool:
        """Whether enough full steps were seen for a forecast."""
        return self.n_full >= self.method.min_full

    def row(self, slot: int) -> torch.Tensor:
        """Flat view of one slot's ``numel`` elements (cached: made once per allocation)."""
        rows = self._rows
        if rows is None or rows[0] is not self.slots:
            rows = self._rows = (self.slots, [self.slots[s, : self.numel] for s in range(self.slots.shape[0])])
        return rows[1][slot]

    def role(self, name: str) -> Optional[torch.Tensor]:
        """View of the tensor a role holds now (None while undefined)."""
        slot = self._slot_of[name]
        return None if slot is None else self.slots[slot, : self.numel].view(self.shape)

    def __repr__(self) -> str:
        return (
            f"CacheState({self.method.describe()}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, n_full={self.n_full}, n_skip={self.n_skip}, nbytes={self.nbytes})"
        )

    # ---- planning ----------------------------------------------------------------------
    def context(self, t_new: float) -> StepContext:
        return StepContext(t_new, dict(self._time_of), self.n_full, self.t, self._memo)

    def plan(self, tr: Transition, t_new: float) -> Launch:
        # Runs on every step of every stream that is not planned in a group: kept lean.
        roles, trr, old_slot, old_time = self.method.roles, tr.roles, self._slot_of, self._time_of
        if len(trr) != len(roles) or any(r not in trr for r in roles):
            missing = set(roles) - set(trr)
            raise AssertionError(f"{self.method.describe()} left roles {sorted(missing)} unspecified")
        kept = set()
        for v in trr.values():
            if type(v) is Keep:
                kept.add(old_slot[v.role])
        free = [s for s in range(self.method.n_slots) if s not in kept]

        slot_of: Dict[str, Optional[int]] = {}
        time_of: Dict[str, Optional[float]] = {}
        written: List[Tuple[int, dict]] = []  # (slot, {slot or FEATURE: coef})
        aliases = None
        for role in roles:
            v = trr[role]
            if type(v) is Keep:
                slot_of[role], time_of[role] = old_slot[v.role], old_time[v.role]
            elif v is None or isinstance(v, Same):
                aliases = True
            else:
                if not free:
                    raise AssertionError(f"{self.method.describe()}: not enough slots for {role}")
                slot = free.pop(0)
                written.append((slot, self._in_slots(v)))
                slot_of[role], time_of[role] = slot, tr.times.get(role, t_new)
        if aliases:
            for role in roles:
                v = trr[role]
                if v is None:
                    slot_of[role] = time_of[role] = None
                elif isinstance(v, Same):
                    slot_of[role], time_of[role] = slot_of[v.role], time_of[v.role]

        rows = [c for _, c in written]
        if tr.out is not None:
            rows.append(self._in_slots(tr.out))
        if len(rows) == 1 and len(rows[0]) == 1:  # one term (a closed form's full step, reuse)
            (k, c), = rows[0].items()
            reads, has_feature, coef = (() if k == FEATURE else (k,)), k == FEATURE, (float(c),)
        else:
            reads = tuple(sorted({k for row in rows for k in row if k != FEATURE}))
            has_feature = any(FEATURE in row for row in rows)
            cols = list(reads) + ([FEATURE] if has_feature else [])
            coef = tuple(float(row.get(k, 0.0)) for row in rows for k in cols)
        fit = None if tr.fit is None else self._plan_fit(tr.fit, slot_of, reads)
        return Launch(reads, has_feature, tuple(s for s, _ in written), tr.out is not None, coef, slot_of, time_of,
                      tr.memo, fit)

    def _plan_fit(self, fit: Fit, slot_of: dict, reads: tuple) -> SlotFit:
        slot = self._slot_of[fit.role]
        if slot is None or slot_of[fit.role] != slot:
            raise AssertionError(f"{self.method.describe()}: a fitted role must hold a value and keep its slot")
        combos = [tuple(self._in_slots(c).items()) for c in (fit.r, fit.u, fit.q, fit.U, fit.V)]
        if slot in reads or any(k == slot for c in combos for k, _ in c):
            raise AssertionError(f"{self.method.describe()}: the fitted role is read in the same step")
        return SlotFit(slot, *combos, tuple(fit.phi_range), tuple(fit.theta_range), tuple(fit.fixed),
                       bool(fit.sharded))

    def plan_rotation(self, t_new: float) -> Launch:
        """The full step of a closed form (:class:`~foca_kernels.methods.RawHistory`) without
        building its transition: the feature goes into the first slot no kept role holds, every
        other role is re-pointed one place older. The same launch as
        ``plan(method.full(context(t_new)), t_new)`` (tests/test_state.py checks it); it exists
        because this is the one plan a single stream makes at every full step."""
        roles = self.method.roles
        old_slot, old_time = self._slot_of, self._time_of
        kept = {old_slot[r] for r in roles[:-1] if old_time[r] is not None}
        slot = next(s for s in range(self.method.n_slots) if s not in kept)
        slot_of: Dict[str, Optional[int]] = {roles[0]: slot}
        time_of: Dict[str, Optional[float]] = {roles[0]: t_new}
        for prev, role in zip(roles, roles[1:]):
            if old_time[prev] is None:
                slot_of[role] = time_of[role] = None
            else:
                slot_of[role], time_of[role] = old_slot[prev], old_time[prev]
        memo = self.method.full_memo(self.context(t_new))
        return Launch((), True, (slot,), False, (1.0,), slot_of, time_of, memo)

    def _in_slots(self, combo) -> dict:
        """A role-level combination as a slot-level one (aliased roles add up)."""
        res: dict = {}
        for key, c in combo.items():
            if key == FEATURE:
                k = FEATURE
            else:
                k = self._slot_of[key]
                if k is None:
                    raise AssertionError(f"{self.method.describe()} read undefined role {key!r}")
            res[k] = res.get(k, 0.0) + float(c)
        return {k: c for k, c in res.items() if c != 0.0}

    def commit(self, launch: Launch, t_new: float, full: bool) -> None:
        """Adopt the bookkeeping of a launch that has run."""
        # The launch's dicts are shared, never copied: nothing mutates them (plan builds new
        # ones), and states committed by one launch share them, which StateGroup uses to see
        # at a glance that they still share a history.
        CacheState.commit_all((self,), launch, t_new, full)

    @staticmethod
    def commit_all(states, launch: Launch, t_new: float, full: bool) -> None:
        """:meth:`commit` for many states (one launch ran for all of them), in one tight loop:
        grouped steps commit every state of a model at every step."""
        slot_of, time_of, memo = launch.slot_of, launch.time_of, launch.memo
        for st in states:
            st._slot_of = slot_of
            st._time_of = time_of
            st._memo = memo
            st._launch = launch
            st.t = t_new
            st.n_steps += 1
            if full:
                st.n_full += 1
                st.n_skip = 0
            else:
                st.n_skip += 1
        CacheState.stamp += 1
