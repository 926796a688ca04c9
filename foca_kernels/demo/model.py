"""The shipped model: a small class-conditional diffusers ``DiTTransformer2DModel`` trained on
the 8x8 digits with rectified flow (it predicts the velocity ``noise - x0``).

    model = load_digits_dit()                 # eval mode, float32, CPU
    model.transformer_blocks                  # nn.ModuleList of 6 BasicTransformerBlock

Architecture (``DIT_CONFIG``): 8x8x1 input, patch size 1 (64 tokens), width 128 (4 heads of
32), 6 blocks with adaLN-Zero, 10 classes. diffusers gives every block its own
timestep + label embedder; each label table has 11 rows, and row 10 (``NULL_CLASS``) is the
"no class" embedding used for classifier-free guidance (trained by dropping 10% of labels).
The weights ship as float16 safetensors (about 4 MB) and are loaded into float32.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .specs import NULL_CLASS as NULL_CLASS  # re-exported (demo.NULL_CLASS, sampler, train): the null label's row
from .specs import SPECS, get_spec

DIT_CONFIG: Dict[str, Any] = SPECS["digits"].dit_config
"""The digits model's diffusers kwargs (``specs.SPECS[name].dit_config`` for the others)."""


def dit_files(name="digits") -> Tuple[str, str]:
    """(weights, json) asset names of a demo model."""
    prefix = get_spec(name).prefix
    return f"{prefix}_dit.safetensors", f"{prefix}_dit.json"


DIT_WEIGHTS, DIT_META = dit_files("digits")
ASSET_PACKAGE = "foca_kernels.demo"


def assets_dir() -> Path:
    """The source folder of the shipped assets (where ``train`` writes them)."""
    return Path(__file__).resolve().parent / "assets"


def _asset(name: str, directory=None):
    if directory is not None:
        return Path(directory) / name
    return resources.files(ASSET_PACKAGE).joinpath("assets", name)


def read_asset_json(name: str, directory=None) -> Dict[str, Any]:
    """A shipped json file from ``foca_kernels/demo/assets`` (via importlib.resources), or
    from ``directory`` when given."""
    return json.loads(_asset(name, directory).read_text("utf-8"))


def load_asset_tensors(name: str, directory=None) -> Dict[str, torch.Tensor]:
    """A shipped safetensors file (see ``read_asset_json``) as a state dict on CPU."""
    from safetensors.torch import load as st_load

    return st_load(_asset(name, directory).read_bytes())


def init_dit_weights_(model: nn.Module) -> nn.Module:
    """The original DiT initialisation (facebookresearch/DiT ``initialize_weights``): xavier
    linears, N(0, 0.02) embedders, and adaLN-Zero (modulations and the output layer start at 0)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build_digits_dit(config: Optional[Dict[str, Any]] = None, *, init: bool = True):
    """A fresh (untrained) digits DiT; ``init`` applies the DiT initialisation."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**(config or DIT_CONFIG))
    if init:
        init_dit_weights_(model)
    return model


def set_label_dropout_(model: nn.Module, p: float) -> None:
    """Set the label-dropout probability of every block's embedder. diffusers drops labels
    independently in each block while training; the training script sets 0 here and drops
    labels itself, once per sample for all blocks (as the original DiT does)."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = p


def load_dit_meta(directory=None, name="digits") -> Dict[str, Any]:
    """The shipped model's json: ``config`` (diffusers kwargs), ``prediction``, ``sampler``
    defaults, ``null_class``, and what training measured."""
    return read_asset_json(dit_files(name)[1], directory)


def load_digits_dit(device=None, dtype: torch.dtype = torch.float32, *, directory=None):
    """The shipped trained digits DiT (see :func:`load_demo_dit`)."""
    return load_demo_dit("digits", device, dtype, directory=directory)


def load_demo_dit(name="digits", device=None, dtype: torch.dtype = torch.float32, *, directory=None):
    """A shipped trained demo DiT (``"digits"`` or ``"mnist"``), in eval mode
    (``DiTTransformer2DModel``), float32 on CPU by default. ``directory`` loads a model
    written elsewhere by the training script."""
    meta = load_dit_meta(directory, name)
    model = build_digits_dit(meta["config"], init=False)
    state = load_asset_tensors(dit_files(name)[0], directory)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    if device is not None:
        model.to(device)
    if dtype != torch.float32:
        model.to(dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def save_dit(model: nn.Module, meta: Dict[str, Any], directory=None,
             storage_dtype: torch.dtype = torch.float16, name="digits") -> Tuple[Path, Path]:
    """Write the weights (``storage_dtype``) and the json next to each other."""
    from safetensors.torch import save_file

    directory = Path(directory) if directory is not None else assets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", storage_dtype).contiguous() for k, v in model.state_dict().items()}
    weights, meta_path = (directory / f for f in dit_files(name))
    save_file(state, str(weights), metadata={"format": "pt"})
    meta = dict(meta, storage_dtype=str(storage_dtype).replace("torch.", ""))
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return weights, meta_path


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
