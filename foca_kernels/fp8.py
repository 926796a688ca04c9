"""fp8 cache state: a closed-form method's history as a 16-bit anchor and float8 increments.

``allocate(x, "taylorseer", dtype=torch.float8_e4m3fn)`` (hooks: ``CacheConfig(state_dtype=
torch.float8_e4m3fn)``) gives an :class:`Fp8State`. A closed-form method (TaylorSeer, FoCa
r3 / r6 / r7: methods/history.py) forecasts ``sum_j c_j X_j`` from its last m computed values.
Storing X_j in e4m3 (3 mantissa bits) would put ~3% of each value's magnitude into every
forecast. Instead the state holds

* the anchor ``A = X0`` in a 16-bit dtype (the feature's; bfloat16 for float32 features), and
* the increments ``D_j = X{j-1} - X_j`` (j = 1..m-1) in e4m3 with one power-of-two float32
  scale per row (per token: a row is the last dimension), made at the full step that computes
  X0 from the rounded new anchor minus the old one, and never touched again: at the next full
  step D_j simply becomes D_{j+1} (its memory row is re-pointed, not copied).

Since ``X_j = A - D_1 - .. - D_j``, the forecast is ``(sum_j c_j) A - sum_i (sum_{j>=i} c_j) D_i``:
the e4m3 error enters scaled by increments, not by values. A skipped step reads the anchor,
the m-1 e4m3 increments and their scales and writes the forecast in the feature's dtype (fp32
arithmetic, one pass); a full step reads the feature and the anchor, writes the new increment,
its scales and the anchor (one pass per row: the row's scale needs the row's maximum first).
The rules (scale, rounding, non-finite values) are reference/fp8.py's; grouped steps run one
launch per class of states on Triton (ops/triton_fp8.py), and per state on the PyTorch path
(ops/torch_fp8.py).

Not for methods that carry more than computed values (FoCa r0 / r4 / calibrated, RFC, DuCa):
their stored tensors are derivatives or fitted slopes, not increments between computed
values, so allocate refuses them; reuse keeps one value (the anchor itself), so there is
nothing to store in fp8 and it is refused too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .methods import Method, RawHistory
from .state import CacheState, Launch, slot_stride

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_DTYPES = () if FP8_DTYPE is None else (FP8_DTYPE,)
SCALE_ALIGN = 16  # scale rows padded to 16 float32 (64 bytes)
_SUPPORT: dict = {}  # device type -> None or the reason float8 does not work there


def is_fp8(dtype) -> bool:
    return FP8_DTYPE is not None and dtype == FP8_DTYPE


def anchor_dtype_for(io_dtype: torch.dtype) -> torch.dtype:
    """The anchor's storage dtype: the feature's when it is 16-bit, else bfloat16."""
    return io_dtype if io_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def check_fp8_supported(device) -> None:
    """Refuse (RuntimeError naming why) where float8 storage cannot run."""
    if FP8_DTYPE is None:
        raise RuntimeError(f"fp8 state storage needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    dev = torch.device(device)
    if dev.type not in _SUPPORT:
        try:
            torch.ones(2, device=dev).to(FP8_DTYPE).to(torch.float32)
            _SUPPORT[dev.type] = None
        except Exception as e:  # noqa: BLE001 - any failure means: not here
            _SUPPORT[dev.type] = f"{type(e).__name__}: {e}"
    if _SUPPORT[dev.type] is not None:
        raise RuntimeError(f"fp8 state storage does not run on {dev.type} tensors with this torch build "
                           f"({_SUPPORT[dev.type]}); use dtype=torch.bfloat16")


def check_fp8_method(method: Method) -> None:
    if not isinstance(method, RawHistory) or method.n_slots < 2:
        raise ValueError(
            f"fp8 state storage applies to closed-form methods (taylorseer, foca reading r3 / r7), "
            f"whose state is the last computed values; {method.describe()} stores "
            + ("one value only (nothing to keep in fp8)" if getattr(method, "n_slots", 0) < 2 else
               "derivatives or fitted slopes")
            + "; use dtype=torch.bfloat16 or a closed-form method"
        )


def _align(nbytes: int, to: int = 128) -> int:
    return -(-nbytes // to) * to


def fp8_layout(method: Method, shape, io_dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(bytes in all, anchor bytes, increment row stride, scale row stride, rows) of a state."""
    shape = torch.Size(shape)
    numel = shape.numel()
    c = shape[-1] if len(shape) else 1
    rows = numel // c
    stride = slot_stride(numel)
    a_bytes = _align(stride * torch.empty((), dtype=anchor_dtype_for(io_dtype)).element_size())
    s_stride = -(-rows // SCALE_ALIGN) * SCALE_ALIGN
    k = method.n_slots - 1
    return a_bytes + _align(k * stride) + _align(k * s_stride * 4), a_bytes, stride, s_stride, rows


class Fp8State(CacheState):
    """A :class:`CacheState` of a closed-form method stored as anchor + e4m3 increments (module
    docstring). The bookkeeping (roles, times, plans) is CacheState's over m logical slots;
    the memory is one byte allocation ``slots`` ([1, nbytes], uint8) holding

    * ``anchor``: [stride] in ``anchor_dtype``,
    * ``incs``: [m-1, stride] e4m3, the increment D_j in row ``inc_row(j)``,
    * ``scales``: [m-1, rows padded to 16] float32, the row scales of each increment row."""

    def __init__(self, method: Method, shape, device, io_dtype: torch.dtype):
        check_fp8_method(method)
        check_fp8_supported(device)
        if io_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"feature dtype must be float32, float16 or bfloat16, got {io_dtype}")
        self.method = method
        self.shape = torch.Size(shape)
        self.numel = self.shape.numel()
        if self.numel == 0:
            raise ValueError(f"cannot cache an empty tensor (shape {tuple(self.shape)})")
        self.dtype = FP8_DTYPE
        self.io_dtype = io_dtype
        self.anchor_dtype = anchor_dtype_for(io_dtype)
        self.row_len = self.shape[-1] if len(self.shape) else 1
        total, a_bytes, stride, s_stride, rows = fp8_layout(method, self.shape, io_dtype)
        self.n_rows = rows
        k = method.n_slots - 1
        self.slots = torch.zeros(1, total, dtype=torch.uint8, device=device)
        flat = self.slots[0]
        self.anchor = flat[:a_bytes].view(self.anchor_dtype)[: self.numel]
        i0 = a_bytes
        self.incs = flat[i0: i0 + k * stride].view(FP8_DTYPE).view(k, stride)
        s0 = i0 + _align(k * stride)
        self.scales = flat[s0: s0 + k * s_stride * 4].view(torch.float32).view(k, s_stride)
        self._rows = None
        self.reset()

    # ---- memory -----------------------------------------------------------------------
    def inc_row(self, j: int, n_full: Optional[int] = None) -> int:
        """Memory row of the increment D_j (j >= 1) while ``n_full`` full steps have been seen:
        the full step that brought the count from n to n + 1 (n >= 1) wrote row (n - 1) mod (m - 1)."""
        n = self.n_full if n_full is None else n_full
        return (n - 1 - j) % (self.method.n_slots - 1)

    def move_to_(self, slots: torch.Tensor) -> None:
        raise TypeError("fp8 states keep their own allocation (anchor, e4m3 increments, scales); "
                        "they are not moved or packed")

    def row(self, slot: int) -> torch.Tensor:
        raise TypeError("an fp8 state has no slot rows; role(name) gives a role's value")

    def role(self, name: str) -> Optional[torch.Tensor]:
        """The value role ``name`` (X_j) represents now, as a new float32 tensor (not a view)."""
        j = self.method.roles.index(name)
        if self._time_of[name] is None:
            return None
        x = self.anchor.float()
        for i in range(1, j + 1):
            r = self.inc_row(i)
            d = self.incs[r, : self.numel].float().view(self.n_rows, self.row_len)
            x = x - (d * self.scales[r, : self.n_rows, None]).view(-1)
        return x.view(self.shape)

    # ---- coefficients -----------------------------------------------------------------------
    def skip_terms(self, launch: Launch) -> Tuple[float, Tuple[Tuple[int, float], ...]]:
        """A skipped step's launch (over the logical slots X_j) as (coefficient of the anchor,
        ((memory row, coefficient) of each increment with a nonzero one))."""
        m = self.method.n_slots
        role_of = {s: self.method.roles.index(r) for r, s in self._slot_of.items() if s is not None}
        c = [0.0] * m
        for s, coef in zip(launch.reads, launch.coef):
            c[role_of[s]] += coef
        a0 = sum(c)
        terms = []
        for i in range(1, m):
            b = -sum(c[i:])
            if b != 0.0:
                terms.append((self.inc_row(i), b))
        return a0, tuple(terms)

    def __repr__(self) -> str:
        return (f"Fp8State({self.method.describe()}, shape={tuple(self.shape)}, anchor={self.anchor_dtype}, "
                f"increments=float8_e4m3fn, device={self.device}, n_full={self.n_full}, n_skip={self.n_skip}, "
                f"nbytes={self.nbytes})")


def fp8_nbytes(method: Method, shape, io_dtype: torch.dtype) -> int:
    """Bytes an fp8 state of ``method`` for a ``shape`` / ``io_dtype`` feature holds."""
    check_fp8_method(method)
    return fp8_layout(method, shape, io_dtype)[0]


# ---- running steps ---------------------------------------------------------------------------
def run_full(states: Sequence[Fp8State], flats: Sequence[torch.Tensor], backend: str) -> None:
    """The full step of states that share a history (same n_full): each feature (flat,
    contiguous, the state's io dtype) becomes its state's anchor, and the increment from the
    old anchor goes into the oldest increment row."""
    counts = split_by_full_count(states)
    if len(counts) > 1:
        for idx in counts:
            run_full([states[i] for i in idx], [flats[i] for i in idx], backend)
        return
    if backend == "triton":
        from .ops.triton_fp8 import full_triton  # imported late: TRITON_INTERPRET must be settled

        full_triton(list(states), list(flats))
        return
    from .ops.torch_fp8 import full_torch

    for st, f in zip(states, flats):
        full_torch(st, f)


def run_skip(launch: Launch, states: Sequence[Fp8State], outs: Sequence[torch.Tensor], backend: str) -> None:
    """The skipped step of states that share a history: ``launch`` is its plan over the
    logical slots (the first state's; every state has the same); each out is contiguous and
    flat."""
    a0, terms = states[0].skip_terms(launch)
    if backend == "triton":
        from .ops.triton_fp8 import skip_triton

        skip_triton(list(states), list(outs), a0, terms)
        return
    from .ops.torch_fp8 import skip_torch

    for st, o in zip(states, outs):
        skip_torch(st, o, a0, terms)


def run_one(buf: Fp8State, launch: Launch, feature, out, backend: str) -> None:
    """One state's step (update_ / forecast_): ``feature`` (flat) for a full step, else ``out``
    (flat, contiguous)."""
    with torch.no_grad():
        if feature is not None:
            run_full([buf], [feature.detach()], backend)
        else:
            run_skip(launch, [buf], [out], backend)


def split_by_full_count(states: Sequence[Fp8State]) -> List[List[int]]:
    """Indices of ``states`` grouped by n_full (states of one history share it; the grouped
    paths check so rather than assume it)."""
    by: dict = {}
    for i, st in enumerate(states):
        by.setdefault(st.n_full, []).append(i)
    return list(by.values())
