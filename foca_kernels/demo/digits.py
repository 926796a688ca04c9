"""The data: scikit-learn's handwritten digits (1,797 labelled 8x8 images, shipped inside
scikit-learn, so nothing is downloaded), scaled to [-1, 1], with a fixed train/test split.

The split is stratified and made with numpy's PCG64 generator, so it does not depend on the
scikit-learn version: 20% of every class, rounded per class (359 images), is held out as the
test set, the rest (1,438 images) is the training set of both the DiT and the classifier.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 8
"""Side of the native images (and of the shipped model's samples)."""
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLITS = ("train", "test", "all")


def to_model_range(pixels) -> torch.Tensor:
    """Raw digit pixel values 0..16 -> [-1, 1] (float32)."""
    return torch.as_tensor(np.asarray(pixels), dtype=torch.float32) / 8.0 - 1.0


def split_indices(labels: np.ndarray, *, seed: int = SPLIT_SEED,
                  test_fraction: float = TEST_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train indices, test indices), each sorted."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", *, size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, size, size)`` float32 in [-1, 1] and labels ``(N,)`` int64.

    ``split`` is "train" (1,438 images), "test" (359) or "all" (1,797). ``size`` other than 8
    upsamples bilinearly (the shipped model works at the native 8x8).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    images = to_model_range(bunch.images).unsqueeze(1)  # (1797, 1, 8, 8)
    if split != "all":
        train_idx, test_idx = split_indices(labels)
        idx = train_idx if split == "train" else test_idx
        images, labels = images[torch.as_tensor(idx)], labels[idx]
    if size != IMAGE_SIZE:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp_(-1.0, 1.0)
    return images.contiguous(), torch.as_tensor(labels)


def class_labels(per_class: int, classes: Sequence[int] = tuple(range(NUM_CLASSES))) -> torch.Tensor:
    """``[c0]*per_class + [c1]*per_class + ...`` as int64 (handy for balanced sample batches)."""
    return torch.as_tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images ``(N, 1, H, W)`` -> uint8 ``(N, H, W)`` (white ink on black, as in the data)."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).reshape(x.shape[0], x.shape[-2], x.shape[-1]).numpy()


def image_grid(images: torch.Tensor, nrow: int = 10, *, upscale: int = 4, pad: Optional[int] = None,
               pad_value: int = 128) -> np.ndarray:
    """Tile ``(N, 1, H, W)`` [-1, 1] images into one uint8 array, ``nrow`` images per row,
    each upscaled by ``upscale`` (nearest neighbour, so pixels stay visible), separated by
    ``pad`` grey pixels (default ``upscale // 2``, at least 1)."""
    pad = max(1, upscale // 2) if pad is None else pad
    tiles = to_uint8(images)
    if upscale > 1:
        tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w = tiles.shape
    ncol = min(nrow, n) if n else 1
    nrows = -(-n // ncol) if n else 1
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = tiles[i]
    return grid


def save_grid(images: torch.Tensor, path, nrow: int = 10, *, upscale: int = 4,
              rows: Optional[Sequence[torch.Tensor]] = None) -> str:
    """Write a PNG sample grid (needs pillow). ``rows``: several image sets stacked vertically
    (e.g. full compute above a cached run), each tiled with ``nrow`` per row."""
    from PIL import Image

    parts = [image_grid(images, nrow, upscale=upscale)]
    for extra in rows or ():
        parts.append(np.full((upscale * 2, parts[0].shape[1]), 255, dtype=np.uint8))
        g = image_grid(extra, nrow, upscale=upscale)
        if g.shape[1] != parts[0].shape[1]:
            raise ValueError("every row set must tile to the same width (same nrow and image size)")
        parts.append(g)
    Image.fromarray(np.concatenate(parts, axis=0)).save(str(path))
    return str(path)
