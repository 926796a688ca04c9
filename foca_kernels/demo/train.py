"""Reproduce the shipped demo weights in one command:

    python -m foca_kernels.demo.train --out foca_kernels/demo/assets                # the 8x8 digits model
    python -m foca_kernels.demo.train --model mnist --threads 1 --out foca_kernels/demo/assets   # 28x28 MNIST

1. the digits classifier (CNN, 40 epochs, seconds on 2 CPU cores);
2. the digits DiT: rectified flow (velocity target ``noise - x0``, logit-normal noise levels),
   10% of labels dropped to the null class for classifier-free guidance, AdamW with warm-up
   and cosine decay, an EMA of the weights (the EMA is what ships, stored in float16);
3. an evaluation of the saved files: 50-step samples of every class, the classifier's accuracy
   on them, the classifier-feature FID against the held-out digits, and a sample grid PNG.

Everything is seeded; the same machine and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .classifier import load_digits_classifier, save_classifier, train_classifier
from .digits import NUM_CLASSES, class_labels, save_grid
from .metrics import classifier_accuracy, classifier_fid, per_class_accuracy
from .model import (NULL_CLASS, build_digits_dit, count_parameters, dit_files, load_demo_dit, save_dit,
                    set_label_dropout_)
from .sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS, sample
from .specs import MODEL_NAMES, get_spec


def _log(msg: str) -> None:
    print(msg, flush=True)


def _fmt_time(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s"


def flow_batch(x0: torch.Tensor, g: torch.Generator):
    """Noisy inputs, model timesteps and velocity targets for a batch of clean images."""
    b = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=g))  # logit-normal(0, 1) noise levels
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(b, 1, 1, 1)
    xt = (1.0 - s) * x0 + s * noise
    return xt, sigma * 1000.0, noise - x0


@torch.no_grad()
def validation_loss(model, images, labels, seed: int = 1234, repeats: int = 4) -> float:
    """Velocity MSE on held-out images with fixed noise (comparable across runs)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    was = model.training
    model.eval()
    for _ in range(repeats):
        xt, t, target = flow_batch(images, g)
        total += float(F.mse_loss(model(xt, timestep=t, class_labels=labels).sample, target))
    model.train(was)
    return total / repeats


def train_dit(train_x, train_y, val_x, val_y, *, steps: int, batch_size: int, lr: float, warmup: int,
              ema_decay: float, label_drop: float, seed: int, config, log_every: int = 100):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = build_digits_dit(config)
    set_label_dropout_(model, 0.0)  # we drop labels ourselves, once per sample
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * p)))

    n = train_x.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    t0 = time.perf_counter()
    window, history = [], []
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x0, y = train_x[idx], train_y[idx].clone()
        y[torch.rand(len(idx), generator=g) < label_drop] = NULL_CLASS
        xt, t, target = flow_batch(x0, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            avg = sum(window) / len(window)
            history.append((step + 1, avg))
            window = []
            eta = el / (step + 1) * (steps - step - 1)
            _log(f"dit step {step + 1}/{steps}: loss {avg:.4f}  lr {lr_at(step):.2e}  "
                 f"{(step + 1) / el:.2f} it/s  elapsed {_fmt_time(el)}  eta {_fmt_time(eta)}")
    train_time = time.perf_counter() - t0
    val = validation_loss(ema, val_x, val_y)
    return ema, dict(train_seconds=round(train_time, 1), final_train_loss=round(history[-1][1], 5),
                     ema_val_loss=round(val, 5), loss_history=[[s, round(v, 5)] for s, v in history])


def evaluate(out_dir: Path, test_x, train_x, *, per_class: int, guidance_scale: float, num_steps: int,
             seed: int, grid: Optional[Path], sweep=(), name="digits"):
    """Sample from the SAVED files (what ships), and judge the samples with the saved classifier."""
    model = load_demo_dit(name, directory=out_dir)
    clf = load_digits_classifier(directory=out_dir, name=name)
    labels = class_labels(per_class)
    res = {"by_guidance_scale": {}}
    for gs in sorted(set([guidance_scale, *sweep])):
        t0 = time.perf_counter()
        imgs = sample(model, labels, seed=seed, num_steps=num_steps, guidance_scale=gs)
        dt = time.perf_counter() - t0
        acc = classifier_accuracy(clf, imgs, labels)
        fid = classifier_fid(clf, imgs, test_x)
        res["by_guidance_scale"][str(gs)] = dict(accuracy=round(acc, 4), fid_vs_test=round(fid, 3),
                                                 seconds=round(dt, 1))
        _log(f"eval guidance {gs}: {len(labels)} samples x {num_steps} steps in {dt:.1f}s  "
             f"accuracy {acc:.3f}  classifier-FID vs test {fid:.3f}")
        if gs == guidance_scale:
            main_imgs = imgs
            res["per_class_accuracy"] = {str(k): round(v, 3) for k, v in per_class_accuracy(clf, imgs, labels).items()}
    res["fid_train_vs_test"] = round(classifier_fid(clf, train_x, test_x), 3)
    _log(f"reference: classifier-FID train digits vs test digits {res['fid_train_vs_test']:.3f}")
    if grid is not None:
        # one row per class: 10 samples of class c in row c
        order = torch.cat([torch.arange(c * per_class, c * per_class + min(10, per_class)) for c in range(NUM_CLASSES)])
        save_grid(main_imgs[order], grid, nrow=min(10, per_class), upscale=max(2, 48 // main_imgs.shape[-1]))
        _log(f"sample grid: {grid}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m foca_kernels.demo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODEL_NAMES, default="digits", help="which demo model to train")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the weights (default: ./<model>-train-out; pass foca_kernels/demo/assets "
                         "to replace the shipped files)")
    ap.add_argument("--steps", type=int, default=None, help="DiT optimisation steps (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--label-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier-epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 4)")
    ap.add_argument("--eval-per-class", type=int, default=20, help="50-step samples per class in the evaluation")
    ap.add_argument("--eval-sweep", type=float, nargs="*", default=(), help="extra guidance scales to evaluate")
    ap.add_argument("--grid", type=Path, default=None,
                    help="sample grid PNG to write (default: <model>_dit_samples.png)")
    ap.add_argument("--skip-classifier", action="store_true", help="keep the classifier already in --out")
    ap.add_argument("--skip-dit", action="store_true", help="keep the DiT already in --out (evaluate only)")
    args = ap.parse_args(argv)
    spec = get_spec(args.model)
    args.steps = spec.train_steps if args.steps is None else args.steps
    args.batch_size = spec.train_batch_size if args.batch_size is None else args.batch_size
    args.grid = Path(f"{spec.name}_dit_samples.png") if args.grid is None else args.grid
    args.out = Path(f"{spec.name}-train-out") if args.out is None else args.out

    threads = args.threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_all = time.perf_counter()
    train_x, train_y = spec.load_data("train")
    test_x, test_y = spec.load_data("test")
    side = spec.image_size
    _log(f"{spec.name}: {len(train_x)} train / {len(test_x)} test images, {side}x{side} in [-1, 1]; "
         f"torch threads {threads}")

    if not args.skip_classifier:
        t0 = time.perf_counter()
        clf = train_classifier(train_x, train_y, epochs=args.classifier_epochs, seed=args.seed, log=_log,
                               image_size=spec.classifier_size)
        acc = classifier_accuracy(clf, test_x, test_y)
        dt = time.perf_counter() - t0
        save_classifier(clf, dict(test_accuracy=round(acc, 4), epochs=args.classifier_epochs, seed=args.seed,
                                  train_seconds=round(dt, 1), train_images=len(train_x), test_images=len(test_x)),
                        args.out, name=spec.name)
        _log(f"classifier: held-out accuracy {acc:.4f} ({dt:.0f}s)")

    if not args.skip_dit:
        ema, info = train_dit(train_x, train_y, test_x, test_y, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                              label_drop=args.label_drop, seed=args.seed, config=spec.dit_config)
        meta = dict(
            model=spec.name, config=spec.dit_config,
            prediction="flow_velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise",
            timestep="1000 * sigma", null_class=NULL_CLASS, num_classes=NUM_CLASSES, image_range=[-1, 1],
            sampler=dict(scheduler="FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)",
                         num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE),
            parameters=count_parameters(ema),
            training=dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                          schedule="linear warm-up, cosine to 5%", optimizer="AdamW(0.9, 0.99), wd 0, clip 1.0",
                          ema_decay=args.ema_decay, label_drop=args.label_drop, seed=args.seed, threads=threads,
                          noise_levels="logit-normal(0, 1)", **info),
        )
        save_dit(ema, meta, args.out, name=spec.name)
        _log(f"dit: {meta['parameters']:,} parameters, trained in {_fmt_time(info['train_seconds'])}; "
             f"final train loss {info['final_train_loss']:.4f}, EMA held-out loss {info['ema_val_loss']:.4f}")

    res = evaluate(args.out, test_x, train_x, per_class=args.eval_per_class, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                   num_steps=DEFAULT_NUM_STEPS, seed=args.seed, grid=args.grid, sweep=args.eval_sweep,
                   name=spec.name)
    meta_path = args.out / dit_files(spec.name)[1]
    meta = json.loads(meta_path.read_text("utf-8"))
    meta["sampler"]["guidance_scale"] = DEFAULT_GUIDANCE_SCALE
    meta["evaluation"] = dict(samples_per_class=args.eval_per_class, seed=args.seed, num_steps=DEFAULT_NUM_STEPS,
                              guidance_scale=DEFAULT_GUIDANCE_SCALE, threads=threads, **res)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _log(f"done in {_fmt_time(time.perf_counter() - t_all)}; weights in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
