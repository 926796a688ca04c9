"""The state method under DuCa: a whole module output is reused on aggressive steps (plain
reuse, one slot); conservative steps rewrite rows of that same slot (tokens.py)."""

from __future__ import annotations

from ..methods import CLOSED_FOCA_READING
from ..methods.foca_closed import FoCaClosed
from ..methods.reuse import Reuse
from ..methods.taylorseer import TaylorSeer


class DucaReuse(Reuse):
    name = "duca"


class DucaTaylorSeer(TaylorSeer):
    """``forecast="taylorseer"``: skipped steps forecast instead of reusing."""

    def describe(self) -> str:
        return f"duca+taylorseer(order={self.order})"


class DucaFoCa(FoCaClosed):
    """``forecast="foca"``: skipped steps forecast with FoCa's default closed form (r7). Closed
    forms only: their state holds computed values, which is what lets a conservative step put
    its fresh rows into the output alone (the default reading, "calibrated", stores a fitted
    slope over the whole tensor, which fresh rows would make stale)."""

    def __init__(self):
        super().__init__(CLOSED_FOCA_READING)

    def describe(self) -> str:
        return f"duca+foca(reading={self.reading})"


def duca_method(options):
    """The state method of every cached stream under these DuCa options."""
    if options.forecast == "foca":
        return DucaFoCa()
    return DucaReuse() if options.forecast is None else DucaTaylorSeer(options.forecast_order)
