"""The grouped update with PyTorch ops (devices Triton does not serve): many cache states that
share a history, one coefficient matrix.

Many small members go through ``torch._foreach_*`` ops, a handful of dispatcher calls for the
whole group instead of a handful per state (on CPU the per-call host cost, not memory, bounds a
skipped step of a model with many small cached modules). Large members go through the
single-state path, whose cache-sized chunks keep every input and accumulator in L2.

Same arithmetic as the kernel: each distinct row is formed in fp32 before anything is
stored (a written slot may be one that is read), and rounded once to its destination dtype;
a row that is one input times 1.0 is a plain copy when its destinations are not inputs.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .torch_lincomb import CPU_CHUNK, lincomb_torch

# From this many small members on, foreach ops (a few dispatcher calls in all) beat one
# single-state update each (on CPU a compiled loop call, ~16 us; measured in bench_host).
FOREACH_MIN = 8


def group_torch(members: Sequence, reads, writes, has_out: bool, coef, pattern) -> None:
    """``members``: objects with ``slot_views`` (one flat view per slot), ``flat`` (the output, flat, or
    None), ``numel``, ``slots``; all of one state dtype, one output dtype, one device."""
    small = [m for m in members if m.numel <= CPU_CHUNK]
    if len(small) < FOREACH_MIN:  # e.g. packed states merged into one member
        small = []
    for m in members:
        if m.numel > CPU_CHUNK or not small:
            lincomb_torch(m.slots, None, m.flat if has_out else None, m.numel, reads, writes, coef)
    if small:
        _foreach_update(small, reads, writes, has_out, pattern)


def _foreach_update(members, reads, writes, has_out: bool, pattern) -> None:
    xs: List[list] = [[m.slot_views[r] for m in members] for r in reads]
    dests: List[list] = [[m.slot_views[w] for m in members] for w in writes]
    if has_out:
        dests.append([m.flat for m in members])
    read_set = set(reads)
    dest_slots = list(writes) + ([None] if has_out else [])
    rows_of = [(pattern.dest_row >> (4 * j)) & 15 for j in range(len(dests))]

    values: dict = {}  # distinct row -> list of tensors holding it (fp32 accumulators or inputs)
    direct: list = []  # (dest list, source list) plain copies
    for r, row in enumerate(pattern.rows):
        terms = [(i, c) for i, c in enumerate(row) if c != 0.0]
        my_dests = [j for j, rr in enumerate(rows_of) if rr == r]
        if (pattern.copy >> r) & 1 and not any(dest_slots[j] in read_set for j in my_dests):
            direct.extend((dests[j], xs[terms[0][0]]) for j in my_dests)
            continue
        acc = [torch.empty(m.numel, dtype=torch.float32, device=m.slots.device) for m in members]
        if not terms:
            torch._foreach_zero_(acc)
        else:
            i0, c0 = terms[0]
            torch._foreach_copy_(acc, xs[i0])  # exact widening to fp32
            if c0 != 1.0:
                torch._foreach_mul_(acc, c0)
            for i, c in terms[1:]:
                torch._foreach_add_(acc, xs[i], alpha=c)
        values[r] = acc
    for dst, src in direct:  # before the stores below, which may overwrite a source slot
        torch._foreach_copy_(dst, src)
    for j, dst in enumerate(dests):
        acc = values.get(rows_of[j])
        if acc is not None:
            torch._foreach_copy_(dst, acc)
