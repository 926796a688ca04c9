"""A small CNN digits classifier, trained on the same training split as the DiT and shipped
beside it. It judges samples: ``predict`` gives the class (accuracy on the requested classes)
and ``features`` the 64-d penultimate activations (a Fréchet distance in that space stands in
for FID).

    clf = load_digits_classifier()
    clf.predict(images)        # (B,) int64
    clf.features(images)       # (B, 64) float32

Inputs are ``(B, 1, H, W)`` (or ``(B, H, W)``) images in [-1, 1]; sizes other than 8x8 are
area-resized to 8x8 first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import assets_dir, load_asset_tensors, read_asset_json
from .specs import NUM_CLASSES, get_spec

FEATURE_DIM = 64


def classifier_files(name="digits"):
    """(weights, json) asset names of a demo model's classifier."""
    prefix = get_spec(name).prefix
    return f"{prefix}_classifier.safetensors", f"{prefix}_classifier.json"


CLASSIFIER_WEIGHTS, CLASSIFIER_META = classifier_files("digits")


class DigitsClassifier(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool - conv3x3(64) - fc(64) [features] - fc(10)."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.2, image_size: int = 8):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes, dropout=dropout,
                           image_size=image_size)
        self.image_size = image_size
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (image_size // 2) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) or (B, H, W) images, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.adaptive_avg_pool2d(x, self.image_size)
        return x

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 10)``."""
        return self.fc2(self.drop(self._features(x)))

    def _param(self):
        return next(self.parameters())

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(B, 64)`` (eval mode, no grad; returned on CPU, float32)."""
        p = self._param()
        was = self.training
        self.eval()
        try:
            return self._features(x.to(p.device, p.dtype)).float().cpu()
        finally:
            self.train(was)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        p = self._param()
        was = self.training
        self.eval()
        try:
            return self(x.to(p.device, p.dtype)).float().cpu()
        finally:
            self.train(was)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``(B,)`` int64."""
        return self.logits(x).argmax(dim=1)


def load_classifier_meta(directory=None, name="digits") -> Dict[str, Any]:
    return read_asset_json(classifier_files(name)[1], directory)


def load_digits_classifier(device=None, *, directory=None, name="digits") -> DigitsClassifier:
    """The shipped trained classifier of demo model ``name``, in eval mode (``directory``:
    see ``load_demo_dit``)."""
    meta = load_classifier_meta(directory, name)
    clf = DigitsClassifier(**meta["config"])
    clf.load_state_dict(load_asset_tensors(classifier_files(name)[0], directory), strict=True)
    return clf.to(device or "cpu").eval().requires_grad_(False)


def save_classifier(clf: DigitsClassifier, meta: Dict[str, Any], directory=None, name="digits"):
    from safetensors.torch import save_file

    directory = Path(directory) if directory is not None else assets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in clf.state_dict().items()}
    weights, meta_path = (directory / f for f in classifier_files(name))
    save_file(state, str(weights), metadata={"format": "pt"})
    meta_path.write_text(json.dumps(dict(meta, config=clf.config), indent=2) + "\n", encoding="utf-8")
    return weights, meta_path


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 40, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, log: Optional[callable] = None,
                     image_size: int = 8) -> DigitsClassifier:
    """Train a fresh classifier (Adam, cosine LR, light augmentation: +-1 pixel shifts and
    Gaussian noise, so that it judges slightly imperfect samples by their shape)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitsClassifier(image_size=image_size)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    n = images.shape[0]
    steps_per_epoch = -(-n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        clf.train()
        perm = torch.randperm(n, generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            x, y = images[idx], labels[idx]
            x = _augment(clf._prepare(x), g)
            logits = clf(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.4f}")
    return clf.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, size = x.shape[0], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = torch.randint(0, 3, (b, 2), generator=g)
    keep = torch.rand(b, generator=g) < 0.5
    shifts[keep] = 1  # half the batch unshifted
    out = torch.stack([padded[i, :, sy:sy + size, sx:sx + size]
                       for i, (sy, sx) in enumerate(shifts.tolist())])
    out = out + 0.1 * torch.randn(out.shape, generator=g)
    return out.clamp(-1.0, 1.0)
