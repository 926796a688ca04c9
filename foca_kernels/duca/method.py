"""The state method under DuCa: a whole module output is reused on aggressive steps (plain
reuse, one slot); conservative steps rewrite rows of that same slot (tokens.py)."""

from __future__ import annotations

from ..methods.reuse import Reuse


class DucaReuse(Reuse):
    name = "duca"
