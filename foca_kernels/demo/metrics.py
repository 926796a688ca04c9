"""Fidelity and distribution metrics for the digits demo (torch only: no scipy).

- ``psnr(x, ref)``: per-image PSNR in dB for [-1, 1] images (peak-to-peak 2), averaged;
  identical images give ``inf`` (or ``max_db`` when given).
- ``relative_l2(x, ref)``: ``||x - ref|| / ||ref||`` per image, averaged.
- ``classifier_accuracy(clf, images, labels)``: fraction classified as the requested class.
- ``frechet_distance(feats_a, feats_b)``: the FID formula on any features;
  ``classifier_fid(clf, images, ref_images)`` applies it to the classifier's 64-d features.

The matrix square root needed by the Fréchet distance is taken from eigendecompositions of
symmetric matrices only: ``tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2)``, and the inner matrix
is symmetric positive semi-definite, so both roots come from ``torch.linalg.eigh`` (float64).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _per_image(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).reshape(x.shape[0], -1)


def _reduce(v: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(v.mean())
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def mse(x: torch.Tensor, ref: torch.Tensor, reduction: str = "mean"):
    _check_pair(x, ref)
    return _reduce((_per_image(x) - _per_image(ref)).pow(2).mean(dim=1), reduction)


def psnr(x: torch.Tensor, ref: torch.Tensor, *, data_range: float = 2.0, max_db: Optional[float] = None,
         reduction: str = "mean"):
    """PSNR in dB per image, ``10 log10(data_range^2 / MSE)``, then averaged (``reduction="mean"``)
    or returned per image (``"none"``). Identical images: ``inf``, or ``max_db`` if given."""
    err = mse(x, ref, reduction="none")
    with torch.no_grad():
        db = 10.0 * torch.log10(data_range ** 2 / err)  # err == 0 -> inf
    if max_db is not None:
        db = db.clamp(max=max_db)
    return _reduce(db, reduction)


def relative_l2(x: torch.Tensor, ref: torch.Tensor, *, eps: float = 1e-12, reduction: str = "mean"):
    """``||x - ref||_2 / ||ref||_2`` per image (flattened), averaged or per image."""
    _check_pair(x, ref)
    a, b = _per_image(x), _per_image(ref)
    return _reduce((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(eps), reduction)


def classifier_accuracy(classifier, images: torch.Tensor, labels) -> float:
    """Fraction of ``images`` that ``classifier.predict`` assigns to ``labels`` (requested classes)."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    return float((classifier.predict(images).cpu() == labels).double().mean())


def per_class_accuracy(classifier, images: torch.Tensor, labels) -> dict:
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu()
    pred = classifier.predict(images).cpu()
    return {int(c): float((pred[labels == c] == c).double().mean()) for c in labels.unique()}


def feature_stats(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, float64."""
    f = features.detach().to(torch.float64).reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    mu = f.mean(dim=0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues from
    round-off are clipped to 0)."""
    m = mat.to(torch.float64)
    m = 0.5 * (m + m.T)
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, clipped at 0."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    r1 = sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    inner = 0.5 * (inner + inner.T)
    tr_cross = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_cross
    return max(float(d), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def classifier_fid(classifier, images: torch.Tensor, ref_images: torch.Tensor) -> float:
    """Fréchet distance between ``images`` and ``ref_images`` in ``classifier.features`` space."""
    return frechet_distance(classifier.features(images), classifier.features(ref_images))


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("expected a non-empty batch of images")


__all__ = [
    "classifier_accuracy", "classifier_fid", "feature_stats", "frechet_distance",
    "frechet_distance_from_stats", "mse", "per_class_accuracy", "psnr", "relative_l2", "sqrtm_psd",
]
