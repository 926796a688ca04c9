"""DuCa (dual caching): aggressive steps reuse every cached output; conservative steps
recompute a token-wise module (the feed-forward) for a selected share of tokens and scatter
them into the cache. Hook integration: ``enable_cache(model, method="duca")``; see
docs/method.md, "DuCa"."""

from .options import DucaOptions
from .phases import pattern, phase
from .select import add_spatial_bonus_, add_staleness_, fresh_ratio, random_score, top_k, v_norm_score
from .tokens import TokenCache, refresh_tokens_

__all__ = [
    "DucaOptions", "TokenCache", "add_spatial_bonus_", "add_staleness_", "fresh_ratio", "pattern", "phase",
    "random_score", "refresh_tokens_", "top_k", "v_norm_score",
]
