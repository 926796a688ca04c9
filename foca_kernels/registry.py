"""Every method the package runs, by name: one entry per public name that parses its options
once, into a normalised form, and builds its :class:`~foca_kernels.Method` from that form.

    spec = method_spec("foca")           # "fora" is an alias of "reuse"
    parsed = spec.parse({"anchor": "bdf2"})   # {"reading": "r0", "anchor": "bdf2"}: validated
    method = spec.build(parsed)          # a fresh Method, as often as needed

``make_method(name, **options)`` is the two in one. State-level methods (foca, taylorseer,
reuse, fitted, rfc) run on a cache state alone (:func:`foca_kernels.allocate`). A hook-level
method (duca) also decides, per module call, which tokens a module computes: it needs the
hooks (``enable_cache(model, method="duca")``). Its entry still parses its options (the hooks
read the parsed form) and builds the state method of its cached streams, but
:func:`make_method` refuses it. ``needs_input``: the method's state keeps the module's input
too (rfc: :class:`foca_kernels.rfc.RFCState`); the hooks record the input for it.

"foca" takes the public readings (:data:`FOCA_READINGS`: calibrated, the default, r7, r3, r0),
each with a measured reason to choose it (docs/method.md, "Which reading to choose"). The study
readings r4 and r6 have none: refused by name, they are built as a Method
(``foca_kernels.methods.make_foca(reading="r6")``), which every call that takes a method accepts.

The demo's method names (foca_kernels/demo/method_table.py) and the studies map onto these
names and are checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .duca.method import duca_method
from .duca.options import DucaOptions
from .methods import DEFAULT_FOCA_READING, FOCA_READINGS, FOCA_STUDY_READINGS, Method, Reuse, TaylorSeer, make_foca
from .methods.fitted import Fitted
from .rfc.method import RFC, RFC_FOCA_READING, RFE_OPTIONS
from .validation import check_method_options


@dataclass(frozen=True)
class MethodSpec:
    """One method name: how its options are parsed and its state method built."""

    name: str
    parse_options: Callable[[Dict[str, Any]], Any]  # options -> normalised form (refuses bad ones)
    build_method: Callable[[Any], Method]  # normalised form -> a fresh Method
    hook_level: bool = False  # needs the hooks (token selection): make_method refuses it
    needs_input: bool = False  # the state keeps the module's input too (the hooks record it)
    aliases: Tuple[str, ...] = ()

    def parse(self, options: Optional[Mapping[str, Any]] = None) -> Any:
        """``options`` checked and normalised (raises TypeError / ValueError naming the problem)."""
        options = dict(options or {})
        return self.parse_options(check_method_options(options))

    def build(self, parsed: Any) -> Method:
        """A fresh Method from :meth:`parse`'s result; for a hook-level method, the state
        method of each cached stream (the hooks add the rest)."""
        return self.build_method(parsed)


def _no_options(name: str):
    def parse(options):
        if options:
            raise TypeError(f"{name} takes no options, got {sorted(options)}")
        return {}

    return parse


def _parse_foca(options):
    o = dict(options)
    if "anchor" in o and "reading" not in o:
        o["reading"] = "r0"  # the anchor choice belongs to reading r0
    if o.get("reading") is None:
        o["reading"] = DEFAULT_FOCA_READING
    reading = o["reading"]
    if reading in FOCA_STUDY_READINGS:
        raise ValueError(
            f"FoCa reading {reading!r} is a study reading: r4 and r6 have no measured reason to choose them "
            f"(docs/method.md, 'Which reading to choose'); the public readings are {FOCA_READINGS} (default "
            f"{DEFAULT_FOCA_READING!r}). For a study, build it as a Method, "
            f"foca_kernels.methods.make_foca(reading={reading!r}), and pass that instead of the name")
    if reading not in FOCA_READINGS:
        raise ValueError(f"FoCa reading must be one of {FOCA_READINGS}, got {reading!r}")
    make_foca(**o)  # refuses an option the reading does not take
    return o


def _parse_taylorseer(options):
    unknown = sorted(set(options) - {"order"})
    if unknown:
        raise TypeError(f"taylorseer takes only order=, got {unknown}")
    return {"order": TaylorSeer(**options).order}


def _parse_fitted(options):
    if set(options) - {"weights", "pattern"}:
        raise TypeError(f"fitted takes only weights= and pattern=, got {sorted(options)}")
    Fitted(**options)  # checks the weights and the pattern
    return dict(options)


def _parse_rfc(options):
    o = dict(options)
    rfe = {k: o.pop(k) for k in RFE_OPTIONS if k in o}
    base = o.pop("base", "foca")
    if isinstance(base, Method):
        if o:
            raise TypeError(f"rfc: options {sorted(o)} given together with a base Method instance")
        parsed = {"base": base, **rfe}
    else:
        spec = method_spec(base)
        if spec.name == "rfc":
            raise ValueError("rfc cannot wrap itself")
        if spec.hook_level:
            raise ValueError(f"rfc cannot wrap {spec.name!r}: it needs the hooks; rfc's base is a temporal method in "
                             "closed form (foca r3/r7, taylorseer, reuse)")
        if spec.name == "foca" and "reading" not in o and "anchor" not in o:
            o["reading"] = RFC_FOCA_READING
        parsed = {"base": (spec.name, spec.parse(o)), **rfe}
    _build_rfc(parsed)  # RFC checks its options and that the base is in closed form
    return parsed


def _build_rfc(parsed):
    base = parsed["base"]
    if not isinstance(base, Method):
        base = method_spec(base[0]).build(base[1])
    return RFC(base, **{k: v for k, v in parsed.items() if k != "base"})


def _parse_duca(options):
    return DucaOptions.from_dict(options)


_SPECS = (
    MethodSpec("foca", _parse_foca, lambda o: make_foca(**o)),
    MethodSpec("taylorseer", _parse_taylorseer, lambda o: TaylorSeer(**o)),
    MethodSpec("reuse", _no_options("reuse"), lambda o: Reuse(), aliases=("fora",)),
    MethodSpec("rfc", _parse_rfc, _build_rfc, needs_input=True),
    MethodSpec("fitted", _parse_fitted, lambda o: Fitted(**o)),
    MethodSpec("duca", _parse_duca, duca_method, hook_level=True),
)
REGISTRY: Dict[str, MethodSpec] = {s.name: s for s in _SPECS}
METHOD_NAMES = tuple(REGISTRY)
"""Every public method name (aliases aside), in the order the docs list them."""
ALIASES = {a: s.name for s in _SPECS for a in s.aliases}


def method_spec(name) -> MethodSpec:
    """The registry entry of a method name or alias (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"a method is a name (one of {METHOD_NAMES}) or a Method, got {type(name).__name__}")
    n = name.strip().lower()
    spec = REGISTRY.get(ALIASES.get(n, n))
    if spec is None:
        aliases = ", ".join(f"{a} = {m}" for a, m in ALIASES.items())
        raise ValueError(f"unknown method {name!r}; expected one of {METHOD_NAMES} (aliases: {aliases})")
    return spec


def make_method(method="foca", **options) -> Method:
    """Build a method from its name and options, or pass a :class:`Method` through.

    ``make_method("foca", reading="r3")``, ``make_method("foca", reading="r0", anchor="bdf2")``,
    ``make_method("taylorseer", order=2)``, ``make_method("reuse")`` ("fora" is an alias),
    ``make_method("rfc", base="taylorseer", order=2, norm="token")``,
    ``make_method("fitted", weights=...)``. "duca" needs the hooks and is refused here.
    """
    if isinstance(method, Method):
        if options:
            raise TypeError("options given together with a Method instance")
        return method
    spec = method_spec(method)
    if spec.hook_level:
        raise ValueError(f"method {spec.name!r} selects the tokens a module computes, which needs the hooks: "
                         f"use enable_cache(model, method={spec.name!r}) (or CacheConfig(method={spec.name!r}))")
    return spec.build(spec.parse(options))


__all__ = ["ALIASES", "FOCA_READINGS", "METHOD_NAMES", "MethodSpec", "REGISTRY", "make_method", "method_spec"]
