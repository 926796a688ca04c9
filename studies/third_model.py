"""A third trained DiT, for studies only (not shipped): natural-image patches.

The two shipped demo DiTs disagree on which FoCa curvature weight is best (docs/fidelity.md);
a weight chosen on them is fitted to them. This script trains a third class-conditional DiT on
a different kind of data, to test the choice out of sample:

- data: 16x16 grayscale patches of scikit-learn's two bundled photographs (``china.jpg``,
  ``flower.jpg``; nothing is downloaded), 32x32 crops area-averaged to 16x16, scaled to [-1, 1];
  10 classes = 2 photographs x 5 vertical stripes; 500 seeded crops per class, 400 / 100
  train / held-out;
- model: diffusers ``DiTTransformer2DModel``, patch 2 (64 tokens), width 96 (4 heads of 24),
  6 layers, trained exactly as the shipped ones (``foca_kernels.demo.train.train_dit``:
  rectified flow, CFG label drop, AdamW, EMA; 2,000 steps of batch 64).

    python studies/third_model.py --out patches-model --threads 2      # ~15 min on 2 cores
    python studies/curvature_study.py --model patches --model-dir patches-model ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from foca_kernels.demo import specs

NAME = "patches"
PER_CLASS, HELD_OUT, CROP, SIDE = 500, 100, 32, 16


def register() -> specs.DemoSpec:
    """Make ``"patches"`` a demo model name in this process (file names, loading)."""
    return specs.register(specs.DemoSpec(
        name=NAME, image_size=SIDE, classifier_size=SIDE, loader=("digits", "load_digits"),
        dit_config=dict(specs._DIT_COMMON, num_attention_heads=4, attention_head_dim=24, sample_size=SIDE,
                        patch_size=2),
        train_steps=2000, train_batch_size=64,
        notes="study only: 16x16 patches of scikit-learn's two sample photographs, 64 tokens, width 96"))


def load_patches(split: str = "train", seed: int = 0):
    """Images ``(N, 1, 16, 16)`` in [-1, 1] and labels ``(N,)``; split "train" or "test"."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for p, photo in enumerate(load_sample_images().images):
        gray = torch.as_tensor(np.array(photo), dtype=torch.float32).mean(-1) / 127.5 - 1.0  # (427, 640)
        h, w = gray.shape
        stripe = w // 5
        for s in range(5):
            r = rng.integers(0, h - CROP + 1, PER_CLASS)
            c = rng.integers(s * stripe, (s + 1) * stripe - CROP + 1, PER_CLASS)
            crops = torch.stack([gray[i:i + CROP, j:j + CROP] for i, j in zip(r, c)])
            xs.append(F.avg_pool2d(crops[:, None], CROP // SIDE))
            ys.append(torch.full((PER_CLASS,), 5 * p + s, dtype=torch.int64))
    keep = slice(0, PER_CLASS - HELD_OUT) if split == "train" else slice(PER_CLASS - HELD_OUT, PER_CLASS)
    return torch.cat([x[keep] for x in xs]).contiguous(), torch.cat([y[keep] for y in ys])


def main(argv=None) -> int:
    from foca_kernels.demo.digits import save_grid
    from foca_kernels.demo.model import count_parameters, load_demo_dit, save_dit
    from foca_kernels.demo.sampler import sample
    from foca_kernels.demo.train import train_dit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("patches-model"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = register()
    train_x, train_y = load_patches("train")
    test_x, test_y = load_patches("test")
    steps = args.steps or spec.train_steps
    print(f"{NAME}: {len(train_x)} train / {len(test_x)} held-out patches, {SIDE}x{SIDE}", flush=True)
    t0 = time.perf_counter()
    ema, info = train_dit(train_x, train_y, test_x, test_y, steps=steps, batch_size=spec.train_batch_size,
                          lr=1e-3, warmup=100, ema_decay=0.999, label_drop=0.1, seed=args.seed,
                          config=spec.dit_config)
    meta = dict(model=NAME, config=spec.dit_config, parameters=count_parameters(ema), null_class=specs.NULL_CLASS,
                training=dict(steps=steps, batch_size=spec.train_batch_size, seed=args.seed, threads=args.threads,
                              **info))
    save_dit(ema, meta, args.out, name=NAME)
    print(f"trained in {time.perf_counter() - t0:.0f} s; EMA held-out loss {info['ema_val_loss']:.4f}; "
          f"{meta['parameters']:,} parameters; weights in {args.out}", flush=True)
    model = load_demo_dit(NAME, directory=args.out)
    imgs = sample(model, torch.arange(100) % 10, seed=0)
    order = torch.cat([torch.arange(c, 100, 10) for c in range(10)])
    save_grid(imgs[order], args.out / "samples.png", nrow=10, upscale=4)
    save_grid(test_x[torch.cat([torch.arange(c * HELD_OUT, c * HELD_OUT + 10) for c in range(10)])],
              args.out / "held_out.png", nrow=10, upscale=4)
    print(f"sample grid {args.out / 'samples.png'} (row = class), held-out patches {args.out / 'held_out.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
