"""DuCa's options (``CacheConfig(method="duca", method_options={...})``), validated on creation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Optional, Tuple

SCORES = ("v-norm", "random")
RATIO_SCHEDULES = ("constant", "linear", "exp")
PHASE_ORDERS = ("code", "alternate")
FORECASTS = (None, "taylorseer", "foca")
DEFAULT_PARTIAL = (r"(?:.*\.)?(ff|ffn|mlp)",)


@dataclass(frozen=True)
class DucaOptions:
    """
    fresh_ratio: share of a partially recomputed module's tokens computed on a conservative
        step, before the schedule (default 0.175 = DuCa-DiT's 0.07 times its MLP factor 2.5).
    ratio_schedule / ratio_weight: "constant"; "linear" (DuCa-DiT's step factor, in sampling
        order: ratio * (1 - w + 2 w p), p = step / num_steps; default w = 2, as its code);
        "exp": ratio * w ** (1 - p). Clamped to [0, 1]; needs the step count (else constant).
    score: "v-norm" (DuCa's V-caching: sum over heads of 1 - ||v||, from the block's attention
        at the last full step; works with any attention kernel) or "random".
    staleness_weight: + weight * (conservative steps since refreshed) / interval (DuCa: 0.25).
    spatial_bonus / spatial_size: the best token of every size x size block of the token grid
        gets + bonus * |its score| (DuCa-DiT: 0.8, 2). 0 turns it off.
    grid: (h, w) of the token grid; None: a square grid when the token count is a square
        (else no spatial bonus, with a warning).
    partial: regexes over cached module names: the token-wise modules recomputed for the
        fresh tokens on conservative steps (default: ff / ffn / mlp, not ff_context).
    cfg_batched: whether a model call holds CFG halves (cond and uncond of the same latents):
        None detects it per call (first input's two halves equal), True / False force it.
    cfg_half: which half the selection is scored on when batched (0: first, as diffusers'
        DiT pipeline puts cond first; PixArt / SD3 put uncond first: use 1).
    phase_order: "code" (DuCa's code: a skipped step at odd distance from the next full step
        is conservative) or "alternate" (conservative right after a full step).
    seed: seed of the "random" score.
    forecast / forecast_order (beyond the paper): None reuses on skipped steps (DuCa);
        "taylorseer" forecasts every cached module with TaylorSeer of that order instead, and
        "foca" with FoCa's default reading (closed form); a conservative step writes the fresh
        rows into its output only (the forecast state keeps values of full steps, so no
        per-token time is needed). forecast_order is TaylorSeer's order.
    """

    fresh_ratio: float = 0.175
    ratio_schedule: str = "linear"
    ratio_weight: float = 2.0
    score: str = "v-norm"
    staleness_weight: float = 0.25
    spatial_bonus: float = 0.8
    spatial_size: int = 2
    grid: Optional[Tuple[int, int]] = None
    partial: Tuple[str, ...] = DEFAULT_PARTIAL
    cfg_batched: Optional[bool] = None
    cfg_half: int = 0
    phase_order: str = "code"
    seed: int = 0
    forecast: Optional[str] = None
    forecast_order: int = 1

    def __post_init__(self):
        check_ratio(self.fresh_ratio, "fresh_ratio")
        for name in ("ratio_weight", "staleness_weight", "spatial_bonus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"duca option {name} must be a finite number >= 0, got {v!r}")
        if self.ratio_schedule not in RATIO_SCHEDULES:
            raise ValueError(f"duca option ratio_schedule must be one of {RATIO_SCHEDULES}, "
                             f"got {self.ratio_schedule!r}")
        if self.score == "attention":
            raise ValueError(
                "duca score 'attention' is not available: diffusers' attention processors (SDPA / flash) never form "
                "the attention map; use 'v-norm' (DuCa's V-caching, needs no map) or 'random'"
            )
        if self.score not in SCORES:
            raise ValueError(f"duca option score must be one of {SCORES}, got {self.score!r}")
        if isinstance(self.spatial_size, bool) or not isinstance(self.spatial_size, int) or self.spatial_size < 1:
            raise ValueError(f"duca option spatial_size must be an int >= 1, got {self.spatial_size!r}")
        if self.grid is not None:
            g = tuple(self.grid)
            if len(g) != 2 or not all(isinstance(x, int) and x >= 1 for x in g):
                raise ValueError(f"duca option grid must be (h, w) positive ints, got {self.grid!r}")
            object.__setattr__(self, "grid", g)
        partial = (self.partial,) if isinstance(self.partial, str) else tuple(self.partial)
        for p in partial:
            re.compile(p)
        object.__setattr__(self, "partial", partial)
        if self.cfg_batched not in (None, True, False):
            raise ValueError(f"duca option cfg_batched must be None, True or False, got {self.cfg_batched!r}")
        if self.cfg_half not in (0, 1):
            raise ValueError(f"duca option cfg_half must be 0 or 1, got {self.cfg_half!r}")
        if self.forecast not in FORECASTS:
            raise ValueError(f"duca option forecast must be one of {FORECASTS}, got {self.forecast!r}")
        if self.forecast_order not in (1, 2, 3):
            raise ValueError(f"duca option forecast_order must be 1, 2 or 3, got {self.forecast_order!r}")
        if self.forecast != "taylorseer" and self.forecast_order != 1:
            raise ValueError(f"duca option forecast_order is TaylorSeer's order: give forecast='taylorseer' with it, "
                             f"got forecast={self.forecast!r}")
        if self.phase_order not in PHASE_ORDERS:
            raise ValueError(f"duca option phase_order must be one of {PHASE_ORDERS}, got {self.phase_order!r}")

    @classmethod
    def from_dict(cls, options) -> "DucaOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown duca option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


def check_ratio(r, name: str = "fresh ratio") -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(r).__name__}")
    if not 0.0 <= float(r) <= 1.0:  # nan fails too
        raise ValueError(f"{name} must be in [0, 1], got {r!r}")
    return float(r)
