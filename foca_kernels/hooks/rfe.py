"""RFE in the hooks: which tensor is a cached module's input, and whether a config uses it.

The input of a cached call is its ``hidden_states`` argument (keyword, or the parameter of
that name), else its first tensor argument. Method "rfc" stores it with the output at full
steps and reads it at skipped steps (per-module path: RFC skipped steps do not go through
ContextState.forecast_all's grouped launch); the RCS schedule reads the first cached call's.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..rfc.method import RFC


def module_input(site, args, kwargs) -> Optional[torch.Tensor]:
    x = kwargs.get("hidden_states")
    if x is None:
        i = site.params.get("hidden_states") if getattr(site, "params", None) else None
        if i is not None and i < len(args):
            x = args[i]
    if isinstance(x, torch.Tensor):
        return x
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def is_relational(config) -> bool:
    """Whether ``config``'s method keeps module inputs (rfc; the registry's ``needs_input``)."""
    spec = config.method_spec
    return isinstance(config.method, RFC) if spec is None else spec.needs_input


def relational_input(group, method, args, kwargs) -> Optional[torch.Tensor]:
    """The input RFE needs for this call of ``group`` (None unless ``method`` is RFC)."""
    if not isinstance(method, RFC):
        return None
    x = module_input(group.site, args, kwargs)
    if x is None:
        raise RuntimeError(f"foca cache: method 'rfc' needs a tensor input of {group.site.name!r}, "
                           "and this call has none")
    return x.detach()
