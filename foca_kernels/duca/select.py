"""Which tokens a conservative step recomputes: scores, DuCa's two bonuses, the top-k choice
and the fresh ratio over steps. Plain PyTorch on (batch, tokens) scores in fp32 (the
reference in reference/duca.py states the same rules in float64)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .options import check_ratio


def v_norm_score(v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N) ``sum_h (1 - ||v_h||)``, L2-normalised over tokens, from the value projection
    ``v`` (B, N, heads * head_dim) of the block's attention."""
    b, n, _ = v.shape
    s = (1.0 - v.detach().float().reshape(b, n, heads, -1).norm(dim=-1)).sum(dim=-1)
    return s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)


def random_score(batch: int, n: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(batch, n, generator=g, device=device)


def add_staleness_(score: torch.Tensor, age: torch.Tensor, weight: float, interval: int) -> torch.Tensor:
    if weight:
        score.add_(age.float(), alpha=weight / interval)
    return score


def add_spatial_bonus_(score: torch.Tensor, grid: Tuple[int, int], ratio: float, size: int = 2) -> torch.Tensor:
    """The best token of every ``size x size`` block gets ``ratio * |its score|`` (edge
    tokens of incomplete blocks get none)."""
    if not ratio:
        return score
    b = score.shape[0]
    h, w = grid
    hb, wb = h // size, w // size
    if hb == 0 or wb == 0:
        return score
    g = score.view(b, h, w)[:, : hb * size, : wb * size]
    blocks = g.reshape(b, hb, size, wb, size).permute(0, 1, 3, 2, 4).reshape(b, hb, wb, size * size)
    best, arg = blocks.max(dim=-1, keepdim=True)
    bonus = torch.zeros_like(blocks).scatter_(-1, arg, best.abs() * ratio)
    bonus = bonus.reshape(b, hb, wb, size, size).permute(0, 1, 3, 2, 4).reshape(b, hb * size, wb * size)
    g.add_(bonus)  # g is a view of score
    return score


def top_k(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, k) indices of the ``k = floor(ratio * N)`` best tokens per sample."""
    ratio = check_ratio(ratio)
    k = int(math.floor(ratio * score.shape[1] + 1e-9))
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def fresh_ratio(step: int, num_steps: Optional[int], base: float, schedule: str, weight: float) -> float:
    """Fresh ratio at ``step`` (sampling order), clamped to [0, 1]; constant without a step count."""
    if schedule == "constant" or not num_steps:
        r = base
    else:
        p = step / num_steps
        r = base * (1.0 - weight + 2.0 * weight * p) if schedule == "linear" else base * weight ** (1.0 - p)
    return min(1.0, max(0.0, r))


def square_grid(n: int) -> Optional[Tuple[int, int]]:
    s = math.isqrt(n)
    return (s, s) if s * s == n else None
