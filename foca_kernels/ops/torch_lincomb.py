"""The same fused update written with PyTorch ops, for devices Triton does not serve.

Works through the tensors in cache-sized chunks (on CPU) with one reused fp32 accumulator
per distinct output row: every output of a chunk is formed in fp32 before any is stored, so
a slot may be overwritten in place exactly as in the Triton kernel, and each output is
rounded once to its storage dtype. Rows with identical coefficients (FoCa's new F and the
caller's out) are computed once and stored twice. Zero coefficients are skipped, as in the
kernel, so a non-finite value in an unused input cannot leak into a row.

On CPU the whole update is first offered to generated code (cpu_codegen.py: one compiled C
loop, same rules); the PyTorch ops below run when that is unavailable or switched off.
"""

from __future__ import annotations

import torch

from . import cpu_codegen

CPU_CHUNK = 1 << 16  # elements: a chunk of every input and accumulator stays in L2


def _pure_copy(slots, feature, out, n, reads, writes, coef) -> bool:
    """Every row is the one input times 1.0 (a closed form's full step, reuse's steps): one
    ``copy_`` per destination is the memory floor, with nothing to plan. Also across dtypes:
    widening is exact and narrowing rounds once, to nearest even, as the loop does."""
    if isinstance(coef, torch.Tensor) or len(reads) + (feature is not None) != 1:
        return False
    if len(coef) != len(writes) + (out is not None) or any(c != 1.0 for c in coef):
        return False
    if feature is None:
        if reads[0] in writes:
            return False  # a slot copied onto itself: the general path handles it
        src = slots[reads[0], :n]
    else:
        src = feature
    for w in writes:
        slots[w, :n].copy_(src)
    if out is not None:
        out.copy_(src)
    return True


def lincomb_torch(slots, feature, out, n, reads, writes, coef) -> None:
    if _pure_copy(slots, feature, out, n, reads, writes, coef):
        return
    if slots.device.type == "cpu" and cpu_codegen.lincomb_cpu(slots, feature, out, n, reads, writes, coef):
        return
    xs = [slots[r, :n] for r in reads]
    if feature is not None:
        xs.append(feature)
    num_in = len(xs)
    dests = [slots[w, :n] for w in writes] + ([out] if out is not None else [])
    rows = [tuple(coef[j * num_in : (j + 1) * num_in]) for j in range(len(dests))]
    targets: dict = {}
    for row, dst in zip(rows, dests):
        targets.setdefault(row, []).append(dst)

    # A row that is one input times 1.0 into tensors of that input's dtype is a plain copy
    # (widening to fp32 and rounding back is exact). Done first and directly, when none of
    # its destinations is an input of this call (else it would clobber what others read).
    read_ptrs = {x.data_ptr() for x in xs}
    for row in list(targets):
        nz = [(c, x) for c, x in zip(row, xs) if c != 0.0]
        dsts = targets[row]
        if (len(nz) == 1 and nz[0][0] == 1.0 and all(d.dtype == nz[0][1].dtype for d in dsts)
                and not any(d.data_ptr() in read_ptrs for d in dsts)):
            for dst in targets.pop(row):
                dst.copy_(nz[0][1])
    if not targets:
        return

    step = CPU_CHUNK if slots.device.type == "cpu" else n
    accs = [torch.empty(min(step, n), dtype=torch.float32, device=slots.device) for _ in targets]
    for s in range(0, n, step):
        e = min(n, s + step)
        parts = [x[s:e] for x in xs]
        for row, acc_buf in zip(targets, accs):
            acc = acc_buf[: e - s]
            first = True
            for c, x in zip(row, parts):
                if c == 0.0:
                    continue
                if first:
                    acc.copy_(x)  # exact widening to fp32, then scale in fp32
                    acc.mul_(c)
                    first = False
                else:
                    acc.add_(x, alpha=c)  # fp32 accumulate
            if first:
                acc.zero_()
        for row, acc_buf in zip(targets, accs):
            for dst in targets[row]:
                dst[s:e].copy_(acc_buf[: e - s])
