"""fp8 storage of a closed-form method's history, rule by rule (docs/method.md, "fp8 state").

A closed-form method (TaylorSeer, FoCa r3 / r6 / r7) forecasts from its last m computed values
X0 (newest) .. X{m-1}. The fp8 state keeps

* the anchor A = X0 in a 16-bit dtype (the feature's dtype; bfloat16 for float32 features),
  rounded once from the feature;
* the increments D_j = X{j-1} - X_j, j = 1..m-1, in float8 e4m3 with one power-of-two scale per
  row (a row is the last dimension: one token's channels). D_1 is formed at the full step that
  makes X0, in float32, from the rounded new anchor minus the stored old one, and never
  changes afterwards (it becomes D_2 at the next full step, and so on).

Scale rule, per row of an increment d (float32 values): amax = max |d| over the row's finite
elements; with 2^(e-1) <= amax < 2^e, s = 2^(e-8) (so |d| / s < 256 <= 448, e4m3's largest
finite value), and s = 2^-126 when amax < 2^-119 (also when it is 0). d / s is exact (a power of
two) and is rounded to e4m3 to nearest even; a non-finite element is stored as nan (e4m3 has
no inf), the rest of its row as usual. Decoding q * s is exact.

The forecast is the method's own, in float64, on the values the state represents:
X0 = A, X_j = X{j-1} - s_j q_j. This module imports nothing from foca_kernels: the method's
forecast comes from a reference (``make_base``: TaylorSeerRef, FoCaRestartRef) replayed on
those values and on the step times since the oldest of them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

FP8 = getattr(torch, "float8_e4m3fn", None)
SCALE_SHIFT = 8  # s = 2^(e - 8): the scaled row stays below 2^8 = 256
TINY_AMAX = 2.0**-119  # below it, s = 2^-126 (the smallest normal float32)


def round_anchor(x: torch.Tensor, dtype: torch.dtype, mode: str = "rne") -> torch.Tensor:
    """``x`` stored as an anchor of ``dtype``, as float64: rounded through float32 to nearest
    even, or (``mode="trunc"``, bfloat16 only: the Triton interpreter's cast) truncated."""
    x32 = x.to(torch.float32)
    if mode == "trunc" and dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        bits = x32.contiguous().view(torch.int32) & -65536
        return bits.view(torch.float32).to(torch.float64)
    return x32.to(dtype).to(torch.float64)


def row_scales(d: torch.Tensor) -> torch.Tensor:
    """The power-of-two scale of each row of ``d`` ([rows, C], float32 values), float64."""
    fin = torch.isfinite(d)
    amax = torch.where(fin, d.abs(), torch.zeros_like(d)).amax(dim=1).to(torch.float64)
    _, e = torch.frexp(amax)  # amax = m 2^e, 1/2 <= m < 1
    s = torch.pow(2.0, (e - SCALE_SHIFT).to(torch.float64))
    return torch.where(amax >= TINY_AMAX, s, torch.full_like(s, 2.0**-126))


def quantize(d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, float64 scales) of an increment ``d`` ([rows, C], float32 values)."""
    if FP8 is None:
        raise RuntimeError("this torch build has no torch.float8_e4m3fn")
    d = d.to(torch.float64)
    s = row_scales(d)
    v = torch.where(torch.isfinite(d), d / s[:, None], torch.full_like(d, float("nan")))
    return v.to(torch.float32).to(FP8), s  # v is a float32 value already: one rounding, to e4m3


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float64) * scales.to(torch.float64)[:, None]


class Fp8StorageRef:
    """A closed-form reference forecaster fed the values an fp8 state represents.

    ``make_base()`` builds the method's reference (e.g. ``lambda: TaylorSeerRef(2)``); ``m`` is
    how many computed values it uses; ``anchor_dtype`` the anchor's storage dtype;
    ``anchor_mode`` its rounding ("rne", or "trunc" for the Triton interpreter's bf16 cast)."""

    def __init__(self, make_base: Callable[[], object], m: int, anchor_dtype: torch.dtype, anchor_mode: str = "rne"):
        self.make_base = make_base
        self.m = m
        self.anchor_dtype = anchor_dtype
        self.anchor_mode = anchor_mode
        self.anchor: Optional[torch.Tensor] = None  # float64, the stored anchor's values
        self.incs: List[torch.Tensor] = []  # dequantized D_1, D_2, .. (float64), newest first
        self.codes: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (codes, scales) of each, newest first
        self.events: list = []  # ("full" | "skip", h) since the oldest value kept
        self.shape = None

    def full(self, x: torch.Tensor, h: float = 1.0) -> None:
        self.shape = x.shape
        new = round_anchor(x, self.anchor_dtype, self.anchor_mode)
        if self.anchor is not None:
            c = x.shape[-1] if x.dim() else 1
            d = (new - self.anchor).to(torch.float32).reshape(-1, c)  # formed in float32
            codes, s = quantize(d)
            self.codes = [(codes, s)] + self.codes[: self.m - 2]
            self.incs = [dequantize(codes, s).reshape(x.shape)] + self.incs[: self.m - 2]
        self.anchor = new
        self.events.append(("full", h))
        fulls = [i for i, (kind, _) in enumerate(self.events) if kind == "full"]
        if len(fulls) > self.m:
            self.events = self.events[fulls[-self.m]:]

    def values(self) -> List[torch.Tensor]:
        """X0, X1, .. as the state represents them now (float64), newest first."""
        xs = [self.anchor]
        for d in self.incs:
            xs.append(xs[-1] - d)
        return xs

    def forecast(self, h: float = 1.0) -> torch.Tensor:
        self.events.append(("skip", h))
        xs = self.values()
        n_full = sum(kind == "full" for kind, _ in self.events)
        olds = list(reversed(xs[:n_full]))  # oldest first, as the base saw them
        base = self.make_base()
        out = None
        for kind, step in self.events:
            if kind == "full":
                base.full(olds.pop(0), step)
            elif base.n_full >= base.min_full:
                out = base.forecast(step)
            else:  # a skipped step before the base could forecast (its value was not kept): the clock moves
                base.t += step
        return out
