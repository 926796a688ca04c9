"""foca-kernels: fused feature-caching forecasts (FoCa, TaylorSeer, reuse) for DiT inference.

    state = foca_kernels.allocate(example, method="foca")
    foca_kernels.update_(state, feature, h)     # a fully computed step
    foca_kernels.forecast_(state, out, h)       # a skipped step: out <- forecast
"""

from .api import allocate, forecast, forecast_, state_nbytes, update_
from .backend import BACKENDS, get_backend, set_backend
from .methods import FoCa, Method, Reuse, TaylorSeer, make_method
from .state import CacheState

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "CacheState", "FoCa", "Method", "Reuse", "TaylorSeer", "allocate", "forecast",
    "forecast_", "get_backend", "make_method", "set_backend", "state_nbytes", "update_",
]
