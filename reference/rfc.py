"""RFE (relational feature estimation, RFC arXiv 2602.19506), one equation per line.

Two temporal forecasters of the same kind run side by side over the same steps: one on the
module's output, one on its input. At a skipped step with input ``x``:

    y_hat = temporal forecast of the output            (the base method)
    x_hat = temporal forecast of the input             (same method, same steps)
    s     = |x - u0| / |x_hat - u0|                    ("ratio")
          or (|y0 - y1| / |u0 - u1|) |x - u0| / |y_hat - y0|   ("gain")
    s     = min(s, clip)
    out   = y0 + s (y_hat - y0)

``y0, u0`` are the output and input at the latest full compute (``y1, u1`` the one before);
norms are L2 per token (last dimension) or per sample (all but the first dimension).
"""

from __future__ import annotations

import torch

from .trajectories import make_ref

RFC_FOCA_READING = "r7"  # RFE's default FoCa base (must match foca_kernels.rfc.RFC_FOCA_READING)


def norm(t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "token":
        return t.norm(dim=-1, keepdim=True)
    if t.dim() == 1:
        return t.norm().reshape(1)
    return t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


class RFCRef:
    def __init__(self, base: str = "foca", norm: str = "sample", estimate: str = "ratio", clip: float = 1.0,
                 **base_options):
        if base == "foca" and "reading" not in base_options and "anchor" not in base_options:
            base_options = dict(base_options, reading=RFC_FOCA_READING)
        self.out = make_ref(base, **dict(base_options))
        self.inp = make_ref(base, **dict(base_options))
        self.norm, self.estimate, self.clip = norm, estimate, clip
        self.y, self.u = [], []  # computed outputs / inputs, newest first

    @property
    def min_full(self):
        return max(self.out.min_full, 2 if self.estimate == "gain" else 1)

    def full(self, y, x, h: float = 1.0) -> None:
        self.out.full(y, h)
        self.inp.full(x, h)
        self.y = [y.clone()] + self.y[:1]
        self.u = [x.clone()] + self.u[:1]

    def forecast(self, x, h: float = 1.0):
        y_hat = self.out.forecast(h)
        x_hat = self.inp.forecast(h)
        y0, u0 = self.y[0], self.u[0]
        if self.estimate == "ratio":
            s = norm(x - u0, self.norm) / norm(x_hat - u0, self.norm).clamp_min(1e-30)
        else:
            y1, u1 = self.y[1], self.u[1]
            g = norm(y0 - y1, self.norm) / norm(u0 - u1, self.norm).clamp_min(1e-30)
            s = g * norm(x - u0, self.norm) / norm(y_hat - y0, self.norm).clamp_min(1e-30)
        s = s.clamp(max=self.clip)
        return y0 + s * (y_hat - y0)
