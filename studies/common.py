"""What the study models' training scripts share: train a classifier and a DiT on a data set
exactly as the shipped demo models are trained (``foca_kernels.demo.train``: rectified flow,
10% of labels dropped to the null class, AdamW, EMA), write them into a model directory
(``foca_kernels.demo.specs``: ``<name>_dit.*``, ``<name>_classifier.*``, the held-out split
``<name>_test.safetensors``) and evaluate the written files (50-step samples of every class,
the classifier's accuracy on them, classifier-feature FID, sample grids).

The directory is then runnable by the fidelity harness:
``foca-kernels demo --model NAME --model-dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from foca_kernels.demo import specs  # noqa: E402

Split = Tuple[torch.Tensor, torch.Tensor]


def _log(msg: str) -> None:
    print(msg, flush=True)


def train_study_model(spec: specs.DemoSpec, load: Callable[[str], Split], *, out: Path, threads: int, seed: int,
                      steps: int, classifier_epochs: int = 40, eval_per_class: int = 20, data: str = "",
                      log: Callable[[str], None] = _log) -> dict:
    """Train, save and evaluate ``spec``'s classifier and DiT on ``load("train")`` /
    ``load("test")``; returns the evaluation (also written into ``<name>_dit.json``)."""
    from foca_kernels.demo.classifier import save_classifier, train_classifier
    from foca_kernels.demo.digits import save_grid
    from foca_kernels.demo.metrics import classifier_accuracy
    from foca_kernels.demo.model import count_parameters, dit_files, save_dit
    from foca_kernels.demo.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS
    from foca_kernels.demo.train import evaluate, train_dit

    torch.set_num_threads(threads)
    specs.register(spec)
    out = Path(out)
    t_all = time.perf_counter()
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    log(f"{spec.name}: {len(train_x)} train / {len(test_x)} held-out images {tuple(train_x.shape[1:])}, "
        f"{spec.tokens} tokens; torch threads {threads}")
    specs.save_split(out, spec.name, "test", test_x, test_y)

    t0 = time.perf_counter()
    clf = train_classifier(train_x, train_y, epochs=classifier_epochs, seed=seed, log=log,
                           image_size=spec.classifier_size)
    clf_acc = classifier_accuracy(clf, test_x, test_y)
    clf_seconds = time.perf_counter() - t0
    save_classifier(clf, dict(test_accuracy=round(clf_acc, 4), epochs=classifier_epochs, seed=seed,
                              train_seconds=round(clf_seconds, 1), train_images=len(train_x),
                              test_images=len(test_x)), out, name=spec.name)
    log(f"classifier: held-out accuracy {clf_acc:.4f} ({clf_seconds:.0f} s)")

    ema, info = train_dit(train_x, train_y, test_x, test_y, steps=steps, batch_size=spec.train_batch_size,
                          lr=spec.train_lr, warmup=100, ema_decay=0.999, label_drop=0.1, seed=seed,
                          config=spec.dit_config)
    meta = dict(
        model=spec.name, config=spec.dit_config, notes=spec.notes, data=data, tokens=spec.tokens,
        prediction="flow_velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise", timestep="1000 * sigma",
        null_class=specs.NULL_CLASS, num_classes=specs.NUM_CLASSES, image_range=[-1, 1],
        sampler=dict(scheduler="FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)",
                     num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE),
        parameters=count_parameters(ema),
        training=dict(steps=steps, batch_size=spec.train_batch_size, lr=spec.train_lr, warmup=100,
                      schedule="linear warm-up, cosine to 5%", optimizer="AdamW(0.9, 0.99), wd 0, clip 1.0",
                      ema_decay=0.999, label_drop=0.1, seed=seed, threads=threads,
                      noise_levels="logit-normal(0, 1)", **info),
    )
    save_dit(ema, meta, out, name=spec.name)
    log(f"dit: {meta['parameters']:,} parameters, trained in {info['train_seconds']:.0f} s; final train loss "
        f"{info['final_train_loss']:.4f}, EMA held-out loss {info['ema_val_loss']:.4f}")

    res = evaluate(out, test_x, train_x, per_class=eval_per_class, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                   num_steps=DEFAULT_NUM_STEPS, seed=seed, grid=out / "samples.png", name=spec.name)
    per = 10
    order = torch.cat([torch.nonzero(test_y == c).flatten()[:per] for c in range(specs.NUM_CLASSES)])
    save_grid(test_x[order], out / "held_out.png", nrow=per, upscale=max(2, 48 // test_x.shape[-1]))
    meta_path = out / dit_files(spec.name)[1]
    doc = json.loads(meta_path.read_text("utf-8"))
    doc["evaluation"] = dict(samples_per_class=eval_per_class, seed=seed, num_steps=DEFAULT_NUM_STEPS,
                             guidance_scale=DEFAULT_GUIDANCE_SCALE, threads=threads, **res)
    doc["classifier_test_accuracy"] = round(clf_acc, 4)
    doc["total_seconds"] = round(time.perf_counter() - t_all, 1)
    meta_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    log(f"done in {doc['total_seconds']:.0f} s; files in {out}: samples.png (row = class), held_out.png")
    return doc


def train_main(argv, description: str, spec: specs.DemoSpec, load: Callable[[str], Split], data: str) -> int:
    """The training scripts' command line: ``--out DIR [--steps --threads --seed
    --classifier-epochs --eval-per-class]``, checked, then :func:`train_study_model`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True, help="model directory to write (keep it outside the repository)")
    ap.add_argument("--steps", type=int, default=None, help=f"DiT optimisation steps (default {spec.train_steps:,})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier-epochs", type=int, default=40)
    ap.add_argument("--eval-per-class", type=int, default=20)
    args = ap.parse_args(argv)
    for name in ("steps", "threads", "classifier_epochs", "eval_per_class"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    train_study_model(spec, load, out=args.out, threads=args.threads, seed=args.seed,
                      steps=args.steps or spec.train_steps, classifier_epochs=args.classifier_epochs,
                      eval_per_class=args.eval_per_class, data=data)
    return 0
