"""Default targets found from a model's structure, for classes without a hand-written table.

A *block list* is an ``nn.ModuleList`` whose items contain an attention module, taken at the
shallowest depth where one exists (so the main stacks, not a text encoder's refiner inside
an embedder). In each block, the attention and feed-forward modules are found by class name
(diffusers' ``Attention`` / ``AttentionModuleMixin`` / ``FeedForward`` and the families' own
``...Attention``, ``...FeedForward``, ``...MLP``, ``...SwiGLU`` classes) or by attribute name
(``attn``, ``attention``, ``ff``, ``mlp``, ``img_mlp``, ...), without descending into a match.
A block with attention but no feed-forward module computes its MLP inline (FLUX-style single
blocks): the whole block is cached (its residual). No diffusers import is needed.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch.nn as nn

ATTENTION_CLASS = re.compile(r"\w*Attention|AttentionModuleMixin")
FEED_FORWARD_CLASS = re.compile(r"\w*(FeedForward|MLP|Mlp|SwiGLU|GLUMB\w*)")
ATTENTION_ATTR = re.compile(r"(self_|cross_)?(attn\d?|attention)")
FEED_FORWARD_ATTR = re.compile(r"((img|txt)_)?(ff|ffn|mlp|feed_forward)(_context)?")


def kind(attr: str, module: nn.Module) -> Optional[str]:
    """"attention", "feed-forward" or None for the child ``attr`` of a block."""
    names = [c.__name__ for c in type(module).__mro__]
    if any(ATTENTION_CLASS.fullmatch(n) for n in names) or ATTENTION_ATTR.fullmatch(attr):
        return "attention"
    if any(FEED_FORWARD_CLASS.fullmatch(n) for n in names) or FEED_FORWARD_ATTR.fullmatch(attr):
        return "feed-forward"
    return None


def parts(block: nn.Module, prefix: str) -> List[Tuple[str, str]]:
    """(name, kind) of the attention / feed-forward modules of a block, outermost only."""
    found: List[Tuple[str, str]] = []

    def walk(mod: nn.Module, path: str) -> None:
        for attr, child in mod.named_children():
            k = kind(attr, child)
            if k is not None:
                found.append((path + attr, k))
            else:
                walk(child, path + attr + ".")

    walk(block, prefix + ".")
    return found


def block_lists(model: nn.Module) -> List[Tuple[str, nn.ModuleList]]:
    """The shallowest ModuleLists whose items contain an attention module."""
    best: List[Tuple[str, nn.ModuleList]] = []
    depth = None
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, nn.ModuleList):
            continue
        d = name.count(".")
        if depth is not None and d > depth:
            continue
        if not any(any(k == "attention" for _, k in parts(b, "")) for b in mod):
            continue
        if depth is None or d < depth:
            best, depth = [], d
        best.append((name, mod))
    return best


def structural_targets(model: nn.Module) -> Tuple[List[str], List[str]]:
    """(module names to cache at "module" granularity, whole blocks to cache as residuals)."""
    modules: List[str] = []
    whole: List[str] = []
    for lname, lst in block_lists(model):
        for i, block in enumerate(lst):
            bname = f"{lname}.{i}"
            found = parts(block, bname)
            if not any(k == "attention" for _, k in found):
                continue
            if any(k == "feed-forward" for _, k in found):
                modules += [n for n, _ in found]
            else:
                whole.append(bname)
    return modules, whole


def blocks(model: nn.Module) -> List[str]:
    """Names of every block of the block lists (for "block" granularity)."""
    return [f"{lname}.{i}" for lname, lst in block_lists(model) for i in range(len(lst))]
