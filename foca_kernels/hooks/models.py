"""The models a cache is enabled on: a module itself, or a diffusers pipeline's
transformer/unet components; and the controller each one carries while cached."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

ATTR = "_foca_cache"  # the controller, on the model it was enabled on


def unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "_orig_mod", m)  # torch.compile's OptimizedModule


def models_of(obj) -> Tuple[List[Tuple[str, nn.Module]], Optional[object]]:
    """(name, model) pairs to cache and the pipeline they belong to (None for a model)."""
    if isinstance(obj, nn.Module):
        return [("model", unwrap(obj))], None
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        found = [
            (k, unwrap(v))
            for k, v in comps.items()
            if isinstance(v, nn.Module) and (k.startswith("transformer") or k.startswith("unet") or k == "prior")
        ]
        if not found:
            raise ValueError(f"{type(obj).__name__} has no transformer/unet component to cache")
        return found, obj
    raise TypeError(f"expected an nn.Module or a diffusers pipeline, got {type(obj).__name__}")


def controller_of(model: nn.Module):
    """The model's CacheController while its cache is enabled, else None."""
    return model.__dict__.get(ATTR)
