"""The demo's methods, by name: which names the harness, the CLI and the plots accept, what
each stands for, how each maps to a cache configuration, and its plot colour. One table for
harness.py, plots.py, cli.py and the studies; the package's own methods and their options are
``foca_kernels.methods.make_method``'s.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

from ..methods import DEFAULT_FOCA_READING, FOCA_READINGS, make_method


BASELINES = ("full", "steps")
CACHED = ("reuse", "taylorseer1", "taylorseer2", "foca-r0", "foca-r3", "foca-r4", "foca-r6", "foca-bdf2", "duca", "rfc",
          "foca-rcs", "rfc-rcs")
ADAPTIVE = ("foca-rcs", "rfc-rcs")
"""Methods on the adaptive RCS schedule: at each N their threshold is calibrated on the recording
run's samples so that they compute as many steps as the fixed schedule at N (equal compute)."""
FITTED = {"fitted": "line", "fitted-free": "free"}
"""The ``fitted`` method's runs and their ``fit`` (hooks.calibrate): weights fitted per interval on
a full-compute generation of other seeds before the timed runs."""
ALL_METHODS = BASELINES + CACHED
"""Every run of the full table, in table order."""
METHOD_NAMES = (BASELINES + ("reuse", "taylorseer1", "taylorseer2", "taylorseer3")
                + tuple(f"foca-{r}" for r in FOCA_READINGS) + ("foca-bdf2", "duca", "rfc") + tuple(FITTED) + ADAPTIVE)
"""Every name :func:`canonical_method` returns (the one list of accepted names), in table order."""
METHOD_ALIASES = {"fora": "reuse", "foca": f"foca-{DEFAULT_FOCA_READING}", "foca-secant": "foca-r0"}
"""Other accepted names and the method each stands for (``foca``: the package's default reading)."""
DEFAULT_INTERVALS = (2, 3, 5, 7, 9)
DEMO_METHODS = ("full", "steps", "reuse", "taylorseer2", "foca", "rfc")
DEMO_INTERVALS = (3, 5, 7)
DEMO_SAMPLES = 30
DEMO_STEPS = 50


def default_reading() -> str:
    """The FoCa reading the package uses when none is given."""
    return DEFAULT_FOCA_READING


def canonical_method(name: str) -> str:
    """Harness method name: one of :data:`METHOD_NAMES` (``full``, ``steps``, ``reuse``,
    ``taylorseerK`` (K = 1..3), ``foca-<reading>``, ``foca-bdf2`` (r0 with the bdf2 anchor),
    ``duca``, ``rfc``, the RCS runs), or an alias of :data:`METHOD_ALIASES` (``foca`` alone is
    the package default reading, ``foca-secant`` is ``foca-r0``, ``fora`` is ``reuse``)."""
    n = str(name).strip().lower().replace("_", "-")
    n = METHOD_ALIASES.get(n, n)
    if n in METHOD_NAMES:
        return n
    raise ValueError(f"unknown harness method {name!r}; expected one of {method_choices()}")


def method_choices() -> str:
    """Every accepted method name, the aliases with what they stand for (for messages and help)."""
    aliases = ", ".join(f"{a} = {m}" for a, m in METHOD_ALIASES.items())
    return f"{', '.join(METHOD_NAMES)} (aliases: {aliases})"


def ordered_methods(names: Sequence[str]) -> Tuple[str, ...]:
    """``names`` as canonical names, each once, in table order (:data:`METHOD_NAMES`)."""
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    return tuple(sorted({canonical_method(m) for m in names}, key=order.__getitem__))


def cache_method(name: str) -> Tuple[str, Dict[str, object]]:
    """(method, method_options) of a cached harness method, for :class:`CacheConfig`."""
    n = canonical_method(name)
    if n in ("reuse", "duca", "rfc"):
        return n, {}
    if n in FITTED:
        return "fitted", {}  # the weights come from run_harness's calibration
    if n in ADAPTIVE:
        return cache_method(n[:-4])
    if n.startswith("taylorseer"):
        return "taylorseer", {"order": int(n[-1])}
    if n == "foca-bdf2":
        return "foca", {"reading": "r0", "anchor": "bdf2"}
    if n.startswith("foca-"):
        opts = {"reading": n[5:]}
        make_method("foca", **opts)  # validates
        return "foca", opts
    raise ValueError(f"{name!r} is not a caching method")


COLORS = {
    "full": "#000000",
    "steps": "#8c564b",
    "reuse": "#7f7f7f",
    "taylorseer1": "#9ecae1",
    "taylorseer2": "#1f77b4",
    "taylorseer3": "#08306b",
    "foca-r0": "#d62728",
    "foca-r3": "#ff9896",
    "foca-r4": "#e377c2",
    "foca-r6": "#f7b6d2",
    "foca-r7": "#9467bd",
    "foca-calibrated": "#2ca02c",
    "foca-bdf2": "#ff7f0e",
    "duca": "#bcbd22",
    "rfc": "#17becf",
    "fitted": "#98df8a",
    "fitted-free": "#c5b0d5",
    "foca-rcs": "#ffbb78",
    "rfc-rcs": "#9edae5",
}
"""One colour per harness method name (every name of :data:`METHOD_NAMES`; no two alike, so
no two curves of a plot share a colour: tests/test_demo_output.py checks both)."""


__all__ = [
    "BASELINES",
    "CACHED",
    "ADAPTIVE",
    "FITTED",
    "ALL_METHODS",
    "METHOD_NAMES",
    "METHOD_ALIASES",
    "DEFAULT_INTERVALS",
    "DEMO_METHODS",
    "DEMO_INTERVALS",
    "DEMO_SAMPLES",
    "DEMO_STEPS",
    "default_reading",
    "canonical_method",
    "method_choices",
    "ordered_methods",
    "cache_method",
    "COLORS",
]
