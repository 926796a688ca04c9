"""The registry of methods (foca_kernels/registry.py): every public name is taken by
CacheConfig and, unless it needs the hooks, by make_method; options are parsed once; the demo's
and the studies' method names all resolve through it."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import torch

import foca_kernels as fk
from foca_kernels.demo import method_table as mt
from foca_kernels.duca.options import DucaOptions
from foca_kernels.hooks import CacheConfig
from foca_kernels.hooks.controller import HOOK_RUNTIMES
from foca_kernels.hooks.rfe import is_relational
from foca_kernels.methods import DEFAULT_FOCA_READING, FOCA_STUDY_READINGS, Method, Reuse
from foca_kernels.registry import ALIASES, FOCA_READINGS, METHOD_NAMES, REGISTRY, make_method, method_spec
from foca_kernels.rfc import RFC, RFC_FOCA_READING

ROOT = Path(__file__).resolve().parent.parent
STATE_LEVEL = [n for n in METHOD_NAMES if not REGISTRY[n].hook_level]
HOOK_LEVEL = [n for n in METHOD_NAMES if REGISTRY[n].hook_level]


def test_the_public_names():
    assert set(METHOD_NAMES) == {"foca", "taylorseer", "reuse", "rfc", "fitted", "duca"}
    assert HOOK_LEVEL == ["duca"] and ALIASES == {"fora": "reuse"}
    assert [n for n in METHOD_NAMES if REGISTRY[n].needs_input] == ["rfc"]


@pytest.mark.parametrize("name", METHOD_NAMES + tuple(ALIASES))
def test_every_name_is_taken_by_cache_config(name):
    cfg = CacheConfig(method=name)
    spec = method_spec(name)
    assert cfg.method_spec is spec and isinstance(cfg.make_method(), Method)
    assert is_relational(cfg) is spec.needs_input
    upper = CacheConfig(method=name.upper())  # names are case-insensitive, as before
    assert upper.method_spec is spec


@pytest.mark.parametrize("name", STATE_LEVEL + list(ALIASES))
def test_every_state_level_name_is_taken_by_make_method(name):
    m = make_method(name)
    assert m.describe() == CacheConfig(method=name).make_method().describe()
    example = torch.zeros(2, 4, 3)
    inp = torch.zeros(2, 4, 5) if method_spec(name).needs_input else None
    assert fk.allocate(example, name, input=inp).method.describe() == m.describe()


def test_make_method_refuses_a_hook_level_method_by_naming_the_hooks():
    for name in HOOK_LEVEL:
        with pytest.raises(ValueError, match=rf"needs the hooks: use enable_cache\(model, method='{name}'\)"):
            make_method(name)
        with pytest.raises(ValueError, match="needs the hooks"):
            fk.allocate(torch.zeros(3), name)
        assert name in HOOK_RUNTIMES  # the hooks run every hook-level method of the registry


def test_unknown_names_are_refused_with_the_list():
    for bad in ("magic", "foca-r7", "taylorseer2"):
        with pytest.raises(ValueError, match=rf"unknown method '{bad}'; expected one of .*'foca'.*'duca'"):
            make_method(bad)
        with pytest.raises(ValueError, match=rf"unknown method '{bad}'"):
            CacheConfig(method=bad)
    with pytest.raises(TypeError, match="a method is a name"):
        CacheConfig(method=3)


def test_parsing_normalises_the_options():
    assert method_spec("foca").parse({}) == {"reading": DEFAULT_FOCA_READING}
    assert method_spec("foca").parse({"anchor": "bdf2"}) == {"reading": "r0", "anchor": "bdf2"}
    assert method_spec("taylorseer").parse({}) == {"order": 2}
    assert method_spec("fora").parse({}) == {}
    rfc = method_spec("rfc").parse({"norm": "token"})
    assert rfc == {"base": ("foca", {"reading": RFC_FOCA_READING}), "norm": "token"}
    assert method_spec("rfc").parse({"base": "taylorseer", "order": 3})["base"] == ("taylorseer", {"order": 3})
    assert method_spec("duca").parse({"fresh_ratio": 0.5}) == DucaOptions(fresh_ratio=0.5)
    built = method_spec("rfc").build(rfc)
    assert isinstance(built, RFC) and built.norm == "token" and built.base.reading == RFC_FOCA_READING


@pytest.mark.parametrize("method, options, error, match", [
    ("taylorseer", {"order": True}, TypeError, "order must be an int"),
    ("taylorseer", {"reading": "r7"}, TypeError, "taylorseer takes only order="),
    ("reuse", {"order": 2}, TypeError, "reuse takes no options"),
    ("foca", {"reading": "r9"}, ValueError, "FoCa reading must be one of"),
    ("rfc", {"base": "rfc"}, ValueError, "rfc cannot wrap itself"),
    ("rfc", {"base": "duca"}, ValueError, "rfc cannot wrap 'duca': it needs the hooks"),
    ("rfc", {"base": "foca", "reading": "calibrated"}, ValueError, "closed form"),
    ("fitted", {"order": 2}, TypeError, "fitted takes only weights= and pattern="),
    ("duca", {"fresh_ratio": 2.0}, ValueError, "fresh_ratio must be in"),
    ("duca", {"order": 2}, TypeError, "unknown duca option"),
])
def test_bad_options_are_refused_on_creation(method, options, error, match):
    with pytest.raises(error, match=match):
        CacheConfig(method=method, method_options=options)


def test_a_reassigned_method_is_parsed_again():
    cfg = CacheConfig(method="taylorseer", method_options={"order": 1})
    assert cfg.make_method().order == 1
    cfg.method_options = {"order": 3}
    assert cfg.make_method().order == 3
    cfg.method, cfg.method_options = "duca", {"fresh_ratio": 0.25}
    assert cfg.parsed_options == DucaOptions(fresh_ratio=0.25) and cfg.method_spec.hook_level
    cfg.method, cfg.method_options = Reuse(), {}
    assert cfg.method_spec is None and cfg.make_method() is cfg.method
    assert dataclasses.replace(cfg, method="rfc").method_spec.needs_input


def test_duca_options_are_parsed_once_per_enable_cache(monkeypatch):
    T = pytest.importorskip("hooks_tiny")
    calls = []
    original = DucaOptions.from_dict.__func__

    def counting(cls, options):
        calls.append(dict(options))
        return original(cls, options)

    monkeypatch.setattr(DucaOptions, "from_dict", classmethod(counting))
    case, m = T.CASES["dit"], T.dit()
    fk.enable_cache(m, method="duca", interval=3, method_options={"ratio_schedule": "constant", "fresh_ratio": 0.25})
    try:
        T.sample(case, m, steps=6)
        assert fk.cache_info(m).calls_forecast > 0
    finally:
        fk.disable_cache(m)
    assert calls == [{"ratio_schedule": "constant", "fresh_ratio": 0.25}]


def test_foca_takes_exactly_the_public_readings():
    """The readings "foca" takes by name are the public ones, each with a measured reason to
    choose it (docs/method.md); r4 and r6 are study readings, refused by name."""
    assert set(FOCA_READINGS) == {"calibrated", "r7", "r3", "r0"} and DEFAULT_FOCA_READING in FOCA_READINGS
    assert set(FOCA_STUDY_READINGS) == {"r4", "r6"} and not set(FOCA_READINGS) & set(FOCA_STUDY_READINGS)
    spec = method_spec("foca")
    for r in FOCA_READINGS:
        assert spec.parse({"reading": r})["reading"] == r
        assert spec.build(spec.parse({"reading": r})).reading == r
    for r in FOCA_STUDY_READINGS:
        with pytest.raises(ValueError, match=f"FoCa reading '{r}' is a study reading"):
            spec.parse({"reading": r})
    with pytest.raises(ValueError, match=r"FoCa reading must be one of \('r0', 'r3', 'r7', 'calibrated'\)"):
        spec.parse({"reading": "r9"})
    # the demo's FoCa names: one per public reading by name (and r0's bdf2 anchor); the study
    # readings as study runs, each a fresh Method
    foca_runs = {n: o["reading"] for n, (m, o) in mt.CACHE_RUNS.items() if m == "foca" and "anchor" not in o}
    assert foca_runs == {f"foca-{r}": r for r in FOCA_READINGS}
    assert set(mt.STUDY_RUNS) == {f"foca-{r}" for r in FOCA_STUDY_READINGS}
    for name in mt.STUDY_RUNS:
        method, options = mt.cache_method(name)
        assert isinstance(method, Method) and options == {} and f"foca-{method.reading}" == name
        assert mt.cache_method(name)[0] is not method and mt.replayable(name)
        assert name in mt.method_choices()


def test_every_demo_name_resolves_through_the_registry():
    covered = set()
    for name in mt.METHOD_NAMES:
        if name in mt.BASELINES or name in mt.STUDY_RUNS:  # study runs: test_foca_takes_exactly_the_public_readings
            continue
        method, options = mt.cache_method(name)
        cfg = CacheConfig(method=method, method_options=options)
        covered.add(cfg.method_spec.name)
        spec = cfg.method_spec
        assert mt.replayable(name) is (name not in mt.ADAPTIVE and not spec.hook_level and not spec.needs_input)
    assert covered == set(METHOD_NAMES)  # every public method can be run from the demo
    for alias, name in mt.METHOD_ALIASES.items():
        assert mt.canonical_method(alias) == name
    assert mt.METHOD_ALIASES["fora"] == ALIASES["fora"]


def test_the_demo_table_refuses_a_name_the_registry_does_not_take(monkeypatch):
    monkeypatch.setitem(mt.CACHE_RUNS, "foca-r9", ("foca", {"reading": "r9"}))
    with pytest.raises(ValueError, match="demo method 'foca-r9': FoCa reading must be one of"):
        mt._check_runs()


@pytest.mark.parametrize("study, table", [
    ("duca_study", "VARIANTS"), ("rfc_readings", "VARIANTS"), ("select_proto", "CANDIDATES"),
])
def test_the_studies_method_tables_resolve_through_the_registry(study, table, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "studies"))
    mod = importlib.import_module(study)
    try:
        rows = getattr(mod, table)
        entries = rows.values() if isinstance(rows, dict) else [r[1:] for r in rows]
        for method, options in entries:
            method_spec(method).parse(options)
    finally:
        sys.modules.pop(study, None)
