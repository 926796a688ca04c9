"""DuCa (dual caching), stated plainly in float64: the token-wise refresh of a conservative
step, the token scores and bonuses, the selection, the fresh-ratio schedule and the
full / conservative / aggressive step pattern. Loops over samples and blocks instead of
vectorised tricks; imports nothing from foca_kernels. See docs/method.md, "DuCa".
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch


# ---- the conservative step's cache update ---------------------------------------------------
def refresh_tokens(value, age, fresh, index):
    """(out, new_value, new_age): ``fresh[b, j]`` replaces token ``index[b, j]`` of sample b."""
    value = value.to(torch.float64).clone()
    age = age.to(torch.int64).clone() + 1
    for b in range(value.shape[0]):
        for j in range(index.shape[1]):
            t = int(index[b, j])
            value[b, t] = fresh[b, j].to(torch.float64)
            age[b, t] = 0
    return value.clone(), value, age


# ---- scores (higher = refreshed first) ------------------------------------------------------
def v_norm_score(v, heads: int):
    """DuCa's V-caching score: ``sum_h (1 - ||v_h||)`` per token, L2-normalised over the tokens
    of each sample. ``v``: (B, N, heads * head_dim), the value projection at the last full step."""
    b, n, _ = v.shape
    norms = v.to(torch.float64).reshape(b, n, heads, -1).norm(dim=-1)  # (B, N, heads)
    s = (1.0 - norms).sum(dim=-1)
    return s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)


def staleness_bonus(age, weight: float, interval: int):
    """``weight * age / interval``: tokens not refreshed for long move up."""
    return weight * age.to(torch.float64) / interval


def spatial_bonus(score, grid: Tuple[int, int], ratio: float, size: int = 2):
    """In every ``size x size`` block of the token grid, the best token gets ``ratio * |its
    score|`` added (tokens of incomplete edge blocks get none)."""
    score = score.to(torch.float64).clone()
    h, w = grid
    for b in range(score.shape[0]):
        for i0 in range(0, h - h % size, size):
            for j0 in range(0, w - w % size, size):
                cells = [(i0 + di) * w + (j0 + dj) for di in range(size) for dj in range(size)]
                vals = [float(score[b, c]) for c in cells]
                best = cells[vals.index(max(vals))]  # first maximum, as torch.max does
                score[b, best] += ratio * abs(max(vals))
    return score


def select(score, ratio: float):
    """Indices (B, k) of the ``k = floor(ratio * N)`` highest scores per sample (stable order)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fresh ratio must be in [0, 1], got {ratio}")
    k = int(math.floor(ratio * score.shape[1] + 1e-9))
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    return order[:, :k]


def fresh_ratio(step: int, num_steps: Optional[int], base: float, schedule: str = "constant", weight: float = 0.0):
    """The fresh ratio at ``step`` (0-based, sampling order), clamped to [0, 1].
    "linear": base * (1 - w + 2 w p), "exp": base * w ** (1 - p), with p = step / num_steps."""
    if schedule == "constant" or num_steps is None:
        r = base
    else:
        p = step / num_steps
        if schedule == "linear":
            r = base * (1.0 - weight + 2.0 * weight * p)
        elif schedule == "exp":
            r = base * weight ** (1.0 - p)
        else:
            raise ValueError(schedule)
    return min(1.0, max(0.0, r))


def phases(full: Sequence[bool], order: str = "code") -> List[str]:
    """"full" / "conservative" / "aggressive" per step. "code" (DuCa's public code): a skipped
    step at an odd distance from the next full step is conservative. "alternate": the first
    skipped step after a full one is conservative, then they alternate."""
    out = []
    for s, f in enumerate(full):
        if f:
            out.append("full")
            continue
        if order == "code":
            d = 1
            while s + d < len(full) and not full[s + d]:
                d += 1
            out.append("conservative" if d % 2 == 1 else "aggressive")
        else:
            j = 1
            while s - j >= 0 and not full[s - j]:
                j += 1
            out.append("conservative" if j % 2 == 1 else "aggressive")
    return out
