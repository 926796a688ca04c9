"""The same fused update written with PyTorch ops, for devices Triton does not serve.

All outputs are formed in fp32 before any is stored, so a slot may be overwritten in place
exactly as in the Triton kernel; each output is then rounded once to its storage dtype.
"""

from __future__ import annotations


def lincomb_torch(slots, feature, out, n, reads, writes, coef) -> None:
    xs = [slots[r, :n] for r in reads]
    if feature is not None:
        xs.append(feature)
    num_in = len(xs)
    dests = [slots[w, :n] for w in writes] + ([out] if out is not None else [])
    ys = []
    for j in range(len(dests)):
        acc = None
        for c, x in zip(coef[j * num_in : (j + 1) * num_in], xs):
            if c == 0.0:
                continue
            if acc is None:
                acc = x.float() * c  # fresh fp32 tensor even when x is fp32
            else:
                acc.add_(x, alpha=c)
        ys.append(acc if acc is not None else xs[0].new_zeros(xs[0].shape, dtype=xs[0].dtype).float())
    for dst, y in zip(dests, ys):
        dst.copy_(y)
