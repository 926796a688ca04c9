"""foca-kernels: fused feature-caching forecasts (FoCa, TaylorSeer, reuse) for DiT inference.

    state = foca_kernels.allocate(example, method="foca")
    foca_kernels.update_(state, feature, h)     # a fully computed step
    foca_kernels.forecast_(state, out, h)       # a skipped step: out <- forecast
    group = foca_kernels.StateGroup(states, outs)  # many states: validated once,
    group.forecast_(h)                            # then one launch per skipped step
    foca_kernels.update_group_(states, features, h)  # many states' full step, O(1) launches

    foca_kernels.enable_cache(pipe, interval=5)  # hooks on a diffusers pipeline / any nn.Module
"""

from .api import allocate, forecast, forecast_, state_nbytes, update_
from .group import StateGroup, forecast_group_, pack_states_
from .full_group import update_group_
from .backend import BACKENDS, get_backend, set_backend
from .hooks import (
    CacheConfig, MemoryEstimate, cache_info, cached, calibrate, disable_cache, enable_cache, estimate_cache_memory,
    generation, load_calibration, new_generation, reset_cache,
)
from .methods import FoCa, Method, Reuse, TaylorSeer
from .registry import make_method
from .state import CacheState

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "CacheConfig", "CacheState", "FoCa", "StateGroup", "forecast_group_", "pack_states_", "Method", "Reuse",
    "TaylorSeer", "allocate", "MemoryEstimate", "cache_info", "cached", "calibrate", "disable_cache", "enable_cache",
    "estimate_cache_memory", "forecast", "forecast_", "generation", "get_backend", "load_calibration", "make_method",
    "new_generation", "reset_cache", "set_backend", "state_nbytes", "update_", "update_group_",
]
