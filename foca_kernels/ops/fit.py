"""The one data-dependent update: a slope refitted by least squares on the device.

``fit_(slots, numel, feature, fit)`` overwrites slot ``fit.slot`` with phi U + theta V, where
(phi, theta) minimise |r - phi u - theta q|^2 over the whole tensor (a 2x2 normal system),
clipped to the method's ranges; if u and q cannot be told apart (det <= 1e-9 uu qq, e.g. q = 0
on a straight line) phi = ru / uu and theta = 1/2 (reference/foca_calibrated.py: fit_weights).

Everything stays a tensor: the weights are never read on the host, so a full step does not
sync with the GPU. Arithmetic is fp32 with the five dot products summed in fp64 (the normal
system is solved in fp64: its determinant cancels). It runs once per stream per full step, as
plain PyTorch ops (a few passes over the stream; a fused two-pass kernel is a follow-up:
docs/notes.md).
"""

from __future__ import annotations

import torch

PARALLEL = 1e-9  # same threshold as reference/foca_calibrated.py


def _combo(slots: torch.Tensor, numel: int, feature, combo: dict) -> torch.Tensor:
    total = None
    for k, c in combo.items():
        v = (feature if isinstance(k, str) else slots[k, :numel]).float()
        total = v * c if total is None else total.add_(v, alpha=c)
    if total is None:
        return torch.zeros(numel, dtype=torch.float32, device=slots.device)
    return total


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dtype=torch.float64)


def fit_weights(r: torch.Tensor, u: torch.Tensor, q: torch.Tensor, phi_range, theta_range):
    """(phi, theta) as 0-dim float64 tensors on r's device."""
    uu, uq, qq, ru, rq = _dot(u, u), _dot(u, q), _dot(q, q), _dot(r, u), _dot(r, q)
    det = uu * qq - uq * uq
    ok = det > PARALLEL * uu * qq
    safe = torch.where(ok, det, torch.ones_like(det))
    slope_only = torch.where(uu > 0, ru / torch.where(uu > 0, uu, torch.ones_like(uu)), torch.zeros_like(uu))
    phi = torch.where(ok, (ru * qq - rq * uq) / safe, slope_only)
    theta = torch.where(ok, (rq * uu - ru * uq) / safe, torch.full_like(det, 0.5))
    return phi.clamp(*phi_range), theta.clamp(*theta_range)


@torch.no_grad()
def fit_(slots: torch.Tensor, numel: int, feature, fit) -> None:
    """Overwrite ``slots[fit.slot, :numel]`` with the fitted slope (``fit``: a state.SlotFit)."""
    r, u, q = (_combo(slots, numel, feature, c) for c in (fit.r, fit.u, fit.q))
    phi, theta = fit_weights(r, u, q, fit.phi_range, fit.theta_range)
    del r, u, q
    y = _combo(slots, numel, feature, fit.U).mul_(phi.float())
    y.add_(_combo(slots, numel, feature, fit.V).mul_(theta.float()))
    slots[fit.slot, :numel].copy_(y)
