"""A study DiT on another data source (not shipped): crops of ten grayscale images bundled inside
scikit-image (nothing is downloaded).

- data: ``skimage.data``'s ``brick``, ``grass``, ``gravel``, ``camera``, ``coins``, ``moon``,
  ``page``, ``text``, ``cell`` and ``chelsea`` (the cat photograph, its RGB averaged to gray),
  172x448 to 660x550 pixels, shipped in the scikit-image wheel; class c = source image c. 64x64 crops at seeded random
  positions, area-averaged to 32x32, pixels scaled to [-1, 1] (``x / 127.5 - 1``). The left
  80% of each image's columns gives the 600 training crops per class, the right 20% the 100
  held-out crops (so no held-out crop shares a pixel with a training crop): 6,000 / 1,000.
- model: diffusers ``DiTTransformer2DModel`` at 32x32 with **patch size 4** (64 tokens of 16
  pixels each), width 96 (4 heads of 24), **8 blocks** (16 cached modules), 10 classes + the null
  class; 1.64 M parameters. It differs from the shipped models in data, patch size and depth.
- training: as the shipped models (``foca_kernels.demo.train.train_dit``: rectified flow,
  logit-normal noise levels, 10% of labels dropped for CFG, AdamW with warm-up and cosine
  decay, EMA 0.999), 2,000 steps of batch 64, seed 0; the classifier (the demo CNN on inputs
  area-resized to 16x16) 40 epochs.

    python studies/train_textures.py --out /work/models/textures --threads 1
    foca-kernels demo --model textures --model-dir /work/models/textures

Measured (1 torch thread on the 2-core machine, the other core busy with another engineer's
fidelity grid; all figures also in the written ``textures_dit.json``): whole command 26 min
25 s (classifier 6 min, DiT 19 min 12 s for 2,000 steps at 1.7 it/s, evaluation ~1 min). Final
training loss (velocity MSE, last 100 steps) 0.146; the EMA model's held-out loss 0.135. The
classifier scores 86.4% on the held-out crops (the right fifth of each image is not always like
the rest: ``camera``'s is mostly sky and grass, ``chelsea``'s background). Samples (200, 50
Euler steps, CFG 1.5, seeds 0..199): **93.0%** classified as the requested source (per class
75-100%, lowest for chelsea, camera, coins), classifier-FID to the held-out crops 17.7 against
17.5 for the training crops. Looked at (``samples.png``, row = class): every row has its
source's statistics (brick's light mortar lines, though only the vertical ones; grass's fine
and gravel's coarser grain; camera's flat sky against dark blobs; coins' bright discs on black;
moon's flat grey; page's rows of dark marks on white; text's strokes on grey; cell's dark
field; the cat's fur), blocky at the 4x4 patch edges and without legible letters: a 1.6 M
parameter model trained for 20 minutes, with the trajectories of a trained DiT.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import specs, train_main  # noqa: E402

NAME = "textures"
SOURCES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "cell", "chelsea")
CROP, SIDE = 64, 32
TRAIN_PER_CLASS, TEST_PER_CLASS = 600, 100
HELD_OUT_COLUMNS = 0.2  # the right fifth of every image is held out


def spec() -> specs.DemoSpec:
    return specs.DemoSpec(
        name=NAME, image_size=SIDE, classifier_size=16, loader=None,
        dit_config=dict(specs._DIT_COMMON, num_attention_heads=4, attention_head_dim=24, sample_size=SIDE,
                        patch_size=4, num_layers=8),
        train_steps=2000, train_batch_size=64,
        notes="study only: 32x32 crops of ten scikit-image images, patch 4 (64 tokens), width 96, 8 blocks")


def load_textures(split: str = "train", seed: int = 0):
    """Images ``(N, 1, 32, 32)`` in [-1, 1] and labels ``(N,)``; split "train" (6,000) or
    "test" (1,000). Both splits are drawn in one fixed order, so either is the same whichever
    is asked first."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    import skimage.data

    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for c, src in enumerate(SOURCES):
        img = np.asarray(getattr(skimage.data, src)())
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            raise RuntimeError(f"skimage.data.{src}() is not a uint8 gray or RGB image: {img.shape} {img.dtype}")
        gray = torch.as_tensor(img, dtype=torch.float32)
        gray = (gray.mean(-1) if gray.dim() == 3 else gray) / 127.5 - 1.0
        h, w = gray.shape
        edge = int(round(w * (1 - HELD_OUT_COLUMNS)))
        for part, n, lo, hi in (("train", TRAIN_PER_CLASS, 0, edge - CROP), ("test", TEST_PER_CLASS, edge, w - CROP)):
            rows = rng.integers(0, h - CROP + 1, n)
            cols = rng.integers(lo, hi + 1, n)
            crops = torch.stack([gray[r:r + CROP, q:q + CROP] for r, q in zip(rows, cols)])
            out[part][0].append(F.avg_pool2d(crops[:, None], CROP // SIDE))
            out[part][1].append(torch.full((n,), c, dtype=torch.int64))
    xs, ys = out[split]
    return torch.cat(xs).contiguous(), torch.cat(ys)


def main(argv=None) -> int:
    return train_main(argv, __doc__.split("\n\n")[0], spec(), load_textures,
                      f"scikit-image {', '.join(SOURCES)}: {CROP}x{CROP} crops area-averaged to {SIDE}x{SIDE}; "
                      f"{TRAIN_PER_CLASS} train crops per class from the left {1 - HELD_OUT_COLUMNS:.0%} of "
                      f"columns, {TEST_PER_CLASS} held-out from the right {HELD_OUT_COLUMNS:.0%}")


if __name__ == "__main__":
    sys.exit(main())
