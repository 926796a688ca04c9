"""The state method under DuCa: a whole module output is reused on aggressive steps (plain
reuse, one slot); conservative steps rewrite rows of that same slot (tokens.py)."""

from __future__ import annotations

from ..methods.reuse import Reuse
from ..methods.taylorseer import TaylorSeer


class DucaReuse(Reuse):
    name = "duca"


class DucaTaylorSeer(TaylorSeer):
    """``forecast="taylorseer"``: skipped steps forecast instead of reusing."""

    def describe(self) -> str:
        return f"duca+taylorseer(order={self.order})"


def duca_method(options):
    """The state method of every cached stream under these DuCa options."""
    return DucaReuse() if options.forecast is None else DucaTaylorSeer(options.forecast_order)
