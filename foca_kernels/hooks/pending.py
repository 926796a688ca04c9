"""Full-step updates of one model call, run together.

On a full step each cached module's output is recorded here instead of being written into its
state at once; at the end of the model call (or earlier, when the recorded features hold more
than ``CacheConfig.max_pending_bytes``) every recorded update runs as ONE
``foca_kernels.update_group_`` call (its trusted form ``update_group_shared_``: the hooks
guarantee the per-pair checks), which updates all states that share a history in a fixed
number of launches. Until then the recorded outputs are kept alive.

A recorded output the model changes in place after its module returned would be cached with
the change. Each recorded output of the model's own (output mode: the module's return value)
keeps its version counter; at the flush a changed counter means the value seen by the cache is
not the module's output any more: that module's history is reset (it is computed until it has
enough history again), the fact is warned once, and the module updates its state at once from
then on (``StreamGroup.immediate``). A residual is the stream's own tensor, which only the
cache writes. Inference tensors have no version counter, so their updates run at once too.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from ..full_group import update_group_shared_


class PendingUpdates:
    """The full-step updates recorded in one model call, not yet run."""

    __slots__ = ("entries", "taus", "nbytes")

    def __init__(self):
        self.entries: List[tuple] = []  # (group, stream, feature, h, version or None)
        self.taus: Dict[object, object] = {}  # group -> its last_tau before this call (restored if dropped)
        self.nbytes = 0  # bytes of recorded features kept alive only by this record

    def record(self, group, prev_tau, stream, feature: torch.Tensor, h: float, owned: bool) -> None:
        """``owned``: ``feature`` is a tensor of the cache's (a residual), which nothing else writes."""
        self.entries.append((group, stream, feature, h, None if owned else feature._version))
        self.taus.setdefault(group, prev_tau)
        if feature is not stream.buffer:  # a persistent scratch costs nothing extra
            self.nbytes += feature.numel() * feature.element_size()

    def flush(self, backend) -> None:
        """Run every recorded update (one update_group_shared_ call). Refused (an error from
        it, which writes nothing then): every recorded module steps back to its
        time before this call, as if it had not been computed, and the error propagates."""
        entries, taus = self.entries, self.taus
        self.entries, self.taus, self.nbytes = [], {}, 0
        if not entries:
            return
        changed = {g for g, _, f, _, v in entries if v is not None and f._version != v}
        for g in changed:
            g.site.warn_once(
                "inplace",
                "its output (or a view of the same tensor) was modified in place after the module returned; "
                "its cache was reset, and it is updated at once from now on",
            )
            g.reset()
            g.immediate = True
        keep = [e for e in entries if e[0] not in changed]
        if not keep:
            return
        try:
            update_group_shared_([s.state for _, s, _, _, _ in keep], [f for _, _, f, _, _ in keep],
                                 [h for _, _, _, h, _ in keep], backend=backend)
        except BaseException:
            for g, tau in taus.items():
                if g not in changed:
                    g.last_tau = tau
            raise

    def drop(self) -> None:
        """Forget the recorded updates (the model call failed): each recorded module steps back
        to its time before this call; its state was never touched."""
        for g, tau in self.taus.items():
            g.last_tau = tau
        self.entries, self.taus, self.nbytes = [], {}, 0
