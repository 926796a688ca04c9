"""Hooks that turn fused feature caching on for a diffusers transformer/pipeline or any
``nn.Module``, and off again.

    from foca_kernels.hooks import CacheConfig, enable_cache, disable_cache, cache_info
    enable_cache(pipe, CacheConfig(interval=5, method="foca"))   # or enable_cache(pipe, interval=5)
    image = pipe(...).images[0]
    print(cache_info(pipe).state_bytes); disable_cache(pipe)

diffusers is never imported here: models are recognised by class name and pipelines by
their ``components``. See docs/hooks.md for the design.
"""

from .apply import (
    CacheInfo,
    cache_context,
    cache_info,
    cache_states,
    cached,
    disable_cache,
    duca_info,
    enable_cache,
    generation,
    is_cache_enabled,
    new_generation,
    reset_cache,
)
from .calibration import Calibration, calibrate, load_calibration
from .config import CacheConfig, FocaCacheWarning
from .controller import device_like
from .memory import MemoryEstimate, StreamMemory, estimate_cache_memory
from .families import FAMILIES, Rule, family_of
from .schedule import Schedule

__all__ = [
    "FAMILIES", "CacheConfig", "CacheInfo", "Calibration", "FocaCacheWarning", "Rule", "Schedule", "cache_context",
    "calibrate", "load_calibration", "cache_info", "cache_states", "cached", "device_like", "disable_cache",
    "duca_info", "enable_cache", "estimate_cache_memory",
    "family_of", "MemoryEstimate", "StreamMemory",
    "generation", "is_cache_enabled", "new_generation", "reset_cache",
]
