"""The demo's methods, by name: which names the harness, the CLI and the plots accept, what
each stands for, how each maps to a cache configuration, and its plot colour. One table for
harness.py, plots.py, cli.py and the studies. Each cached name is a short name for one method
of the package's registry (foca_kernels/registry.py) with fixed options (:data:`CACHE_RUNS`),
checked against the registry when this module loads, or a study run (:data:`STUDY_RUNS`: FoCa's
study readings r4 and r6, which the registry does not take by name, built as a Method).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Sequence, Tuple, Union

from ..methods import DEFAULT_FOCA_READING, FOCA_READINGS, FOCA_STUDY_READINGS, Method, make_foca
from ..registry import ALIASES, method_spec

TAYLORSEER_ORDERS = (1, 2, 3)
CACHE_RUNS: Dict[str, Tuple[str, Dict[str, object]]] = {
    "reuse": ("reuse", {}),
    **{f"taylorseer{k}": ("taylorseer", {"order": k}) for k in TAYLORSEER_ORDERS},
    **{f"foca-{r}": ("foca", {"reading": r}) for r in FOCA_READINGS},
    "foca-bdf2": ("foca", {"reading": "r0", "anchor": "bdf2"}),
    "duca": ("duca", {}),
    "rfc": ("rfc", {}),
    "fitted": ("fitted", {}),  # the weights come from run_harness's calibration
    "fitted-free": ("fitted", {}),
}
"""Every cached run of a fixed schedule: (registry method, method_options), in table order."""
STUDY_RUNS: Dict[str, Callable[[], Method]] = {f"foca-{r}": partial(make_foca, reading=r) for r in FOCA_STUDY_READINGS}
"""Study runs: FoCa's study readings (no measured reason to choose them, docs/method.md), each a
factory of a fresh Method (the registry refuses them by name); kept for the studies that compare
every reading (studies/fidelity_frontier.py)."""


def _check_runs() -> None:
    """Each run's method and options as the registry takes them (fails on import otherwise)."""
    for name, (method, options) in CACHE_RUNS.items():
        try:
            method_spec(method).parse(options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"demo method {name!r}: {e}") from None


_check_runs()


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
METHOD_NAMES = BASELINES + tuple(CACHE_RUNS) + tuple(STUDY_RUNS) + ADAPTIVE
"""Every name :func:`canonical_method` returns (the one list of accepted names), in table order."""
METHOD_ALIASES = {**{a: m for a, m in ALIASES.items() if m in CACHE_RUNS},
                  "foca": f"foca-{DEFAULT_FOCA_READING}", "foca-secant": "foca-r0"}
"""Other accepted names and the method each stands for (the registry's aliases; ``foca``: the
package's default reading)."""
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
    ``taylorseerK`` (K = 1..3), ``foca-<reading>`` (the study runs ``foca-r4`` and ``foca-r6``
    too), ``foca-bdf2`` (r0 with the bdf2 anchor), ``duca``, ``rfc``, the RCS runs), or an
    alias of :data:`METHOD_ALIASES` (``foca`` alone is FoCa's default reading, ``foca-secant``
    is ``foca-r0``, ``fora`` is ``reuse``)."""
    n = str(name).strip().lower().replace("_", "-")
    n = METHOD_ALIASES.get(n, n)
    if n in METHOD_NAMES:
        return n
    raise ValueError(f"unknown harness method {name!r}; expected one of {method_choices()}")


def method_choices() -> str:
    """Every accepted method name, the aliases with what they stand for (for messages and help)."""
    aliases = ", ".join(f"{a} = {m}" for a, m in METHOD_ALIASES.items())
    study = ", ".join(STUDY_RUNS)
    return (f"{', '.join(METHOD_NAMES)} (aliases: {aliases}; {study}: study readings of FoCa, with no measured "
            "reason to choose them, docs/method.md)")


def ordered_methods(names: Sequence[str]) -> Tuple[str, ...]:
    """``names`` as canonical names, each once, in table order (:data:`METHOD_NAMES`)."""
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    return tuple(sorted({canonical_method(m) for m in names}, key=order.__getitem__))


def cache_method(name: str) -> Tuple[Union[str, Method], Dict[str, object]]:
    """(method, method_options) of a cached harness method, for :class:`CacheConfig`: a registry
    name and its options, or for a study run a fresh Method and no options."""
    n = canonical_method(name)
    if n in ADAPTIVE:
        return cache_method(n[:-len("-rcs")])
    if n in STUDY_RUNS:
        return STUDY_RUNS[n](), {}
    if n not in CACHE_RUNS:
        raise ValueError(f"{name!r} is not a caching method")
    method, options = CACHE_RUNS[n]
    return method, dict(options)


def replayable(name: str) -> bool:
    """Whether a cached run can be replayed on recorded module outputs alone: a method on a
    fixed schedule that needs neither the hooks (duca's token refresh) nor the module inputs (rfc)."""
    n = canonical_method(name)
    if n in BASELINES or n in ADAPTIVE:
        return False
    if n in STUDY_RUNS:
        return True  # FoCa readings: state-level, on the module outputs alone
    spec = method_spec(cache_method(n)[0])
    return not (spec.hook_level or spec.needs_input)


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
    "CACHE_RUNS",
    "STUDY_RUNS",
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
    "replayable",
    "COLORS",
    "TAYLORSEER_ORDERS",
]
