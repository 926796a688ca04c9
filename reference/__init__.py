"""Plain PyTorch reference implementations: the single readable definition of every rule.

No performance tricks, no slot bookkeeping: each class keeps named tensors and applies the
equations one by one, in whatever dtype it is given (float64 for oracles). Imports nothing
from foca_kernels. Tests and benchmarks compare the fused kernels against these.
"""

from .foca import FoCaRef, FoCaRestartRef
from .fitted import FittedRef
from .foca_calibrated import FoCaCalibratedRef
from .reuse import ReuseRef
from .rfc import RFCRef
from .taylorseer import TaylorSeerRef
from .trajectories import interval_schedule, make_ref, run_schedule

__all__ = ["FittedRef", "FoCaCalibratedRef", "FoCaRef", "FoCaRestartRef", "RFCRef", "ReuseRef", "TaylorSeerRef",
           "interval_schedule", "make_ref", "run_schedule"]
