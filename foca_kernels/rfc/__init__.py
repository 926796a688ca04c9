"""RFC (relational feature caching, arXiv 2602.19506), model-free parts: the method (its
transitions are its closed-form base's, method.py) and RFE on cache states (the output and
input histories in one allocation and the rescaled forecast, state.py). Through the hooks
(``enable_cache(model, method="rfc")``) the module inputs come from hooks/rfe.py, and the
adaptive schedule RCS is hooks/rcs.py; see docs/method.md, "RFC"."""

from .method import (
    DEFAULT_RFE_CLIP, DEFAULT_RFE_ESTIMATE, DEFAULT_RFE_NORM, RFC, RFC_FOCA_READING, RFE_ESTIMATES, RFE_NORMS,
    RFE_OPTIONS,
)
from .state import RFCState, check_input, forecast_rfc_, scale, update_rfc_

__all__ = [
    "DEFAULT_RFE_CLIP", "DEFAULT_RFE_ESTIMATE", "DEFAULT_RFE_NORM", "RFC", "RFC_FOCA_READING", "RFCState",
    "RFE_ESTIMATES", "RFE_NORMS", "RFE_OPTIONS", "check_input", "forecast_rfc_", "scale", "update_rfc_",
]
