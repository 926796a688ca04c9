"""RFC (relational feature caching, arXiv 2602.19506): the method-level half of RFE.

Relational feature estimation forecasts a module's output with a temporal method in closed
form (FoCa r7 by default, TaylorSeer or reuse as options) and rescales the forecast's change
from the last computed output by how far the module's *input* moved (docs/method.md, "RFC").
The input is known at a skipped step, so the rescaling needs reductions over tensors: that
part lives in ``rfc/state.py`` (:class:`~foca_kernels.rfc.RFCState`), never here.

At the level of transitions RFC *is* its base method: the output history and the input
history are two closed-form histories over the same step times, so every full step and
every skipped step applies the base method's coefficients to both. This class only carries
the base method and RFE's options.
"""

from __future__ import annotations

from ..methods.base import Method, StepContext, Transition
from ..methods.history import RawHistory
from ..methods.reuse import Reuse

RFE_NORMS = ("token", "sample")
RFE_ESTIMATES = ("ratio", "gain")
DEFAULT_RFE_NORM = "sample"
DEFAULT_RFE_ESTIMATE = "ratio"
DEFAULT_RFE_CLIP = 1.0
RFE_OPTIONS = ("norm", "estimate", "clip", "sharded")  # RFC's own options; the others go to its base
RFC_FOCA_READING = "r7"  # RFE's default base, by RFE over r3 vs r7 on three trained DiTs (docs/fidelity.md, "RFC")


class RFC(Method):
    """RFE over a closed-form temporal method ``base``.

    ``norm``: "token" (one scale per token: norms over the last dimension) or "sample" (one
    scale per batch row: norms over all dimensions but the first).
    ``estimate``: "ratio" (scale = |X - U0| / |X^ - U0|: the input's actual change over the
    change the base method forecasts for the input) or "gain" (scale = g |X - U0| / |Y^ - Y0|
    with g = |Y0 - Y1| / |U0 - U1|, the output/input change ratio of the last two computes).
    ``sharded``: the tokens of each sample are split across the ranks of the default process
    group (sequence parallelism): per-sample norms are all-reduced so every rank scales by the
    unsharded run's factor (per-token norms are shard-local and need nothing).
    ``clip``: upper bound of the scale (default 1: the input can only shrink the temporal
    forecast's change, which measured best on both shipped models; also bounds a vanishing
    denominator).
    """

    name = "rfc"

    def __init__(self, base: Method, norm: str = DEFAULT_RFE_NORM, estimate: str = DEFAULT_RFE_ESTIMATE,
                 clip: float = DEFAULT_RFE_CLIP, sharded: bool = False):
        if not isinstance(base, (RawHistory, Reuse)):
            raise ValueError(
                f"rfc needs a temporal method in closed form (foca r3/r6/r7, taylorseer, reuse) as its base, got "
                f"{base.describe()}: its input history must be forecast with the same coefficients as its output"
            )
        if norm not in RFE_NORMS:
            raise ValueError(f"rfc norm must be one of {RFE_NORMS}, got {norm!r}")
        if estimate not in RFE_ESTIMATES:
            raise ValueError(f"rfc estimate must be one of {RFE_ESTIMATES}, got {estimate!r}")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 or clip != clip:
            raise ValueError(f"rfc clip must be a positive number, got {clip!r}")
        if estimate == "gain" and base.n_slots < 2:
            raise ValueError("rfc estimate='gain' needs the last two computed values: use a base with two or more "
                             "(foca, taylorseer)")
        self.base = base
        self.norm = norm
        self.estimate = estimate
        self.clip = float(clip)
        if not isinstance(sharded, bool):
            raise TypeError(f"rfc sharded must be a bool, got {type(sharded).__name__}")
        self.sharded = sharded
        self.roles = base.roles
        self.n_slots = base.n_slots
        self.min_full = max(base.min_full, 2 if estimate == "gain" else 1)
        self.latest = base.roles[0]  # the role holding the most recent computed value (X0, or reuse's D0)
        self.previous = base.roles[1] if len(base.roles) > 1 else None

    def full(self, ctx: StepContext) -> Transition:
        return self.base.full(ctx)

    def skip(self, ctx: StepContext) -> Transition:
        return self.base.skip(ctx)

    def describe(self) -> str:
        return f"rfc(base={self.base.describe()}, norm={self.norm}, estimate={self.estimate}, clip={self.clip:g})"
