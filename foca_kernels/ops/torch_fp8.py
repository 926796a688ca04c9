"""The fp8 state's steps with PyTorch ops (foca_kernels/fp8.py; rules: reference/fp8.py).

Full step: the increment from the stored anchor to the feature rounded to the anchor's dtype,
formed in float32; per row a power-of-two scale from the largest finite |increment| (built from
its float32 exponent bits, so every backend gets the same scale); the scaled row rounded to e4m3
to nearest even (torch's cast; the scaled values stay below 256, so nothing saturates), a
non-finite element stored as nan. Skipped step: ``a0 A + sum_i (b_i s_i) q_i`` in float32,
rounded once to the output's dtype; zero coefficients are not terms.
"""

from __future__ import annotations

import torch

from . import cpu_codegen

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)  # checked by foca_kernels/fp8.py before any state exists

EXP_BIAS_SHIFT = 7  # biased exponent of s = max(E(amax) - 7, 1): s = 2^(e - 8) with amax < 2^e


def row_scales(d: torch.Tensor):
    """(scale, 1/scale) of each row of ``d`` ([rows, C] float32), both exact powers of two."""
    fin = torch.isfinite(d)
    amax = torch.where(fin, d.abs(), torch.zeros((), dtype=d.dtype, device=d.device)).amax(dim=1)
    k = ((amax.view(torch.int32) >> 23) - EXP_BIAS_SHIFT).clamp_(min=1)
    return (k << 23).view(torch.float32), ((254 - k) << 23).view(torch.float32)


def quantize_rows(d: torch.Tensor):
    """(e4m3 codes, float32 scales) of an increment ``d`` ([rows, C] float32)."""
    s, inv = row_scales(d)
    v = d * inv[:, None]
    v = torch.where(torch.isfinite(d), v, torch.full((), float("nan"), device=d.device))
    return v.to(FP8_DTYPE), s


def full_torch(st, feature: torch.Tensor) -> None:
    """``feature``: flat, contiguous, the state's io dtype. On CPU the compiled loop
    (cpu_codegen.py, lincomb.c) runs it when it can, with the same bits."""
    n, rows, c = st.numel, st.n_rows, st.row_len
    r = (st.n_full - 1) % (st.method.n_slots - 1)
    if st.anchor.device.type == "cpu":
        has = st.n_full >= 1
        if cpu_codegen.fp8_full_cpu(feature, rows, c, st.anchor, st.incs[r, :n] if has else None,
                                    st.scales[r, :rows] if has else None):
            return
    new = feature.to(st.anchor_dtype)
    if st.n_full >= 1:
        d = new.float() - st.anchor.float()
        codes, s = quantize_rows(d.view(rows, c))
        st.incs[r, :n].copy_(codes.view(-1))
        st.scales[r, :rows].copy_(s)
    st.anchor.copy_(new)


def skip_torch(st, out: torch.Tensor, a0: float, terms) -> None:
    """``out``: flat, contiguous, the state's io dtype. On CPU the compiled loop when it can
    (same rules; fp32 sums in the same order)."""
    n, rows, c = st.numel, st.n_rows, st.row_len
    if st.anchor.device.type == "cpu" and cpu_codegen.fp8_skip_cpu(
            st.anchor, rows, c, a0, [st.incs[r, :n] for r, _ in terms], [st.scales[r, :rows] for r, _ in terms],
            [b for _, b in terms], out):
        return
    if a0 != 0.0:
        acc = st.anchor.float().mul_(a0).view(rows, c)
    else:
        acc = torch.zeros(rows, c, dtype=torch.float32, device=out.device)
    for r, b in terms:
        w = st.scales[r, :rows] * b  # exact unless it leaves float32's normal range
        acc.add_(st.incs[r, :n].view(rows, c).float() * w[:, None])
    out.copy_(acc.view(-1))
