"""Default targets per model family, keyed by class name (no diffusers import needed); any
other class gets targets found from its structure (see ``structure.py``).

A rule is (regex, mode, residual inputs): ``mode`` "output" caches the module's output(s),
"block" follows the config's ``block_cache`` ("residual" or "output"). Residual inputs name,
for each element of the module's output, the argument it is the residual of (None: no
input, cache that element as is); "auto" matches by name ``hidden_states`` / shape.

Module granularity follows the paper: the attention and feed-forward modules inside each
block. FLUX-style single-stream blocks compute attention and MLP inline, so there the whole
block is the unit (its residual), which is also how the paper treats them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import re

import torch.nn as nn

from .structure import blocks, structural_targets

Residual = Union[str, Tuple[Optional[str], ...], None]  # "auto", names per output, or None


@dataclass(frozen=True)
class Rule:
    pattern: str
    mode: str = "output"  # "output" | "block" (config.block_cache decides) | "residual"
    residual: Residual = "auto"


@dataclass(frozen=True)
class Family:
    name: str
    module: Tuple[Rule, ...]
    block: Tuple[Rule, ...]


_IMG_TXT = ("encoder_hidden_states", "hidden_states")  # FLUX / SD3 blocks return (txt, img)
_TXT_IMG = ("hidden_states", "encoder_hidden_states")  # CogVideoX / HunyuanVideo return (img, txt)

_BASIC = Family(  # BasicTransformerBlock stacks: DiT, PixArt-alpha/sigma
    "basic-transformer",
    module=(Rule(r"transformer_blocks\.\d+\.(attn1|attn2|ff)"),),
    block=(Rule(r"transformer_blocks\.\d+", "block", ("hidden_states",)),),
)
_FLUX = Family(
    "flux",
    module=(
        Rule(r"transformer_blocks\.\d+\.(attn|ff|ff_context)"),
        Rule(r"single_transformer_blocks\.\d+", "residual", _IMG_TXT),
    ),
    block=(
        Rule(r"transformer_blocks\.\d+", "block", _IMG_TXT),
        Rule(r"single_transformer_blocks\.\d+", "block", _IMG_TXT),
    ),
)
_SD3 = Family(
    "sd3",
    module=(Rule(r"transformer_blocks\.\d+\.(attn|attn2|ff|ff_context)"),),
    block=(Rule(r"transformer_blocks\.\d+", "block", _IMG_TXT),),
)
_WAN = Family(
    "wan",
    module=(Rule(r"blocks\.\d+\.(attn1|attn2|ffn)"),),
    block=(Rule(r"blocks\.\d+", "block", ("hidden_states",)),),
)
_COGVIDEOX = Family(
    "cogvideox",
    module=(Rule(r"transformer_blocks\.\d+\.(attn1|ff)"),),
    block=(Rule(r"transformer_blocks\.\d+", "block", _TXT_IMG),),
)
_HUNYUAN_VIDEO = Family(
    "hunyuan-video",
    module=(
        Rule(r"transformer_blocks\.\d+\.(attn|ff|ff_context)"),
        Rule(r"single_transformer_blocks\.\d+", "residual", _TXT_IMG),
    ),
    block=(
        Rule(r"transformer_blocks\.\d+", "block", _TXT_IMG),
        Rule(r"single_transformer_blocks\.\d+", "block", _TXT_IMG),
    ),
)
_GENERIC = Family(  # fallback when the structure shows no block list (e.g. blocks in nn.Sequential)
    "generic",
    module=(
        Rule(r"(?:.*\.)?(transformer_blocks|blocks|layers)\.\d+\.(attn\d?|self_attn|cross_attn|ff|ff_context|ffn|mlp)"),
        Rule(r"(?:.*\.)?single_transformer_blocks\.\d+", "residual", "auto"),
    ),
    block=(Rule(r"(?:.*\.)?(transformer_blocks|single_transformer_blocks|blocks|layers)\.\d+", "block", "auto"),),
)

FAMILIES: Dict[str, Family] = {
    "DiTTransformer2DModel": _BASIC,
    "PixArtTransformer2DModel": _BASIC,
    "FluxTransformer2DModel": _FLUX,
    "SD3Transformer2DModel": _SD3,
    "WanTransformer3DModel": _WAN,
    "CogVideoXTransformer3DModel": _COGVIDEOX,
    "HunyuanVideoTransformer3DModel": _HUNYUAN_VIDEO,
}


def family_of(model: nn.Module) -> Family:
    """The family whose defaults apply to ``model`` (by class name, then base class names)."""
    for cls in type(model).__mro__:
        fam = FAMILIES.get(cls.__name__)
        if fam is not None:
            return fam
    return _GENERIC


def _any_of(names) -> str:
    return "|".join(re.escape(n) for n in names)


def structural_rules(model: nn.Module, granularity: str) -> Tuple[Rule, ...]:
    """Rules naming exactly the modules ``structure.py`` finds (empty if it finds none)."""
    if granularity == "block":
        names = blocks(model)
        return (Rule(_any_of(names), "block", "auto"),) if names else ()
    modules, whole = structural_targets(model)
    rules = []
    if modules:
        rules.append(Rule(_any_of(modules)))
    if whole:
        rules.append(Rule(_any_of(whole), "residual", "auto"))
    return tuple(rules)


def default_rules(model: nn.Module, granularity: str) -> Tuple[Rule, ...]:
    fam = family_of(model)
    if fam is _GENERIC:
        rules = structural_rules(model, granularity)
        if rules:
            return rules
    return fam.module if granularity == "module" else fam.block
