"""Which modules of a model are cached: family defaults or user regexes over module names."""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .config import CacheConfig, FocaCacheWarning
from .families import Residual, Rule, default_rules


@dataclass(eq=False)
class Site:
    """One cached module: where it is, and how its outputs map onto cached streams."""

    name: str
    module: nn.Module
    mode: str  # "output" | "residual"
    residual: Residual = "auto"  # for "residual": names of the inputs, per output element
    params: Dict[str, int] = field(default_factory=dict)  # argument name -> positional index
    warned: set = field(default_factory=set)  # warnings already given for this site

    def bind_signature(self, fn) -> None:
        """Remember positional indices of ``fn``'s arguments (to find inputs by name)."""
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        i = 0
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self.params[p.name] = i
                i += 1

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"foca cache, module {self.name!r}: {message}", FocaCacheWarning, stacklevel=4)


def _rules(model: nn.Module, config: CacheConfig) -> List[Rule]:
    if config.targets is None:
        return list(default_rules(model, config.granularity))
    plain = "output" if config.granularity == "module" else "block"
    return [Rule(t[0], t[1]) if isinstance(t, tuple) else Rule(t, plain) for t in config.targets]


def select_sites(model: nn.Module, config: CacheConfig) -> List[Site]:
    """Modules of ``model`` to cache, outermost first; a match inside another match is dropped."""
    rules = [(re.compile(r.pattern), r) for r in _rules(model, config)]
    sites: List[Site] = []
    nested: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        rule = next((r for rx, r in rules if rx.fullmatch(name)), None)
        if rule is None:
            continue
        if any(name.startswith(s.name + ".") for s in sites):
            nested.append(name)
            continue
        mode = config.block_cache if rule.mode == "block" else rule.mode
        sites.append(Site(name, module, mode, rule.residual if mode == "residual" else None))
    if nested:
        warnings.warn(
            f"foca cache: {len(nested)} matched module(s) lie inside other cached modules and are not cached "
            f"separately (e.g. {nested[0]!r})",
            FocaCacheWarning,
            stacklevel=3,
        )
    if not sites:
        what = "targets" if config.targets is not None else f"default {config.granularity}-level targets"
        raise ValueError(
            f"no module of {type(model).__name__} matches the {what}; pass CacheConfig(targets=[regex, ...]) "
            "with regexes over the names in model.named_modules()"
        )
    first, last = config.compute_blocks
    if first or last:
        sites = _drop_computed_blocks(model, sites, first, last)
    return sites


def block_position(model: nn.Module, name: str) -> Optional[Tuple[str, int, int]]:
    """(block list, index, length) of the block that module ``name`` lies in or is: the
    outermost ``nn.ModuleList`` / ``nn.Sequential`` on its path (``transformer_blocks.3.attn1``
    -> ``("transformer_blocks", 3, len)``); None when no such container is on its path."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        try:
            container = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i]), int(part), len(container)
    return None


def _drop_computed_blocks(model: nn.Module, sites: List[Site], first: int, last: int) -> List[Site]:
    """``sites`` without those inside the first ``first`` / last ``last`` blocks of each block list
    (``CacheConfig.compute_blocks``): those blocks are computed at every step."""
    kept: List[Site] = []
    placed = False
    for s in sites:
        pos = block_position(model, s.name)
        if pos is None:
            kept.append(s)
            continue
        placed = True
        _, index, length = pos
        if index < first or index >= length - last:
            continue
        kept.append(s)
    if not placed:
        raise ValueError(
            f"compute_blocks={(first, last)}: no cached module of {type(model).__name__} lies in a block list "
            f"(an nn.ModuleList or nn.Sequential of blocks), e.g. {sites[0].name!r}; leave compute_blocks at 0"
        )
    if not kept:
        raise ValueError(
            f"compute_blocks={(first, last)} computes every block of {type(model).__name__} that holds a cached "
            "module: nothing is left to cache"
        )
    return kept
