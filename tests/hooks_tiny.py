"""Tiny random-weight diffusers transformers for the hook tests, and sampling loops that call
them the way their pipelines do (scheduler, timestep format, CFG batched in one call or as
two calls in "cond"/"uncond" cache contexts). Nothing is downloaded."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

DIM, HEADS, HEAD_DIM, TXT = 16, 2, 8, 16


def _seeded(fn):
    def make():
        torch.manual_seed(0)
        return fn().eval()

    return make


@_seeded
def dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, norm_num_groups=1, num_embeds_ada_norm=1000,
    )


@_seeded
def pixart():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=DIM, sample_size=8, patch_size=2, caption_channels=TXT, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_num_groups=1,
    )


@_seeded
def flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TXT, pooled_projection_dim=TXT, axes_dims_rope=(2, 2, 4),
    )


@_seeded
def sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TXT, caption_projection_dim=DIM, pooled_projection_dim=TXT,
        out_channels=4, pos_embed_max_size=8,
    )


@_seeded
def wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        text_dim=TXT, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )


@dataclass
class Case:
    """How a family's pipeline feeds its transformer."""

    name: str
    make: Callable
    latent_shape: tuple  # per sample
    conditioning: Callable  # (batch, generator) -> (cond kwargs, uncond kwargs)
    flow: bool  # flow-matching scheduler (timestep = t, or t / 1000 for FLUX) vs DDIM
    timestep_scale: float = 1.0
    extra: Optional[Callable] = None  # (latents) -> extra kwargs (e.g. FLUX position ids)

    def scheduler(self):
        if self.flow:
            return diffusers.FlowMatchEulerDiscreteScheduler()
        return diffusers.DDIMScheduler()

    def latents(self, batch: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch,) + self.latent_shape, generator=g)

    def conds(self, batch: int, seed: int = 2):
        return self.conditioning(batch, torch.Generator().manual_seed(seed))


def _txt(batch, g, seq=4):
    return torch.randn(batch, seq, TXT, generator=g)


def _dit_cond(batch, g):
    return {"class_labels": torch.arange(1, batch + 1)}, {"class_labels": torch.full((batch,), 1000)}


def _pixart_cond(batch, g):
    add = {"resolution": None, "aspect_ratio": None}
    return (
        {"encoder_hidden_states": _txt(batch, g), "added_cond_kwargs": add},
        {"encoder_hidden_states": _txt(batch, g), "added_cond_kwargs": add},
    )


def _pooled_cond(key):
    def make(batch, g):
        return tuple(
            {"encoder_hidden_states": _txt(batch, g), key: torch.randn(batch, TXT, generator=g)} for _ in range(2)
        )

    return make


def _flux_extra(latents):
    n = latents.shape[1]
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(n) // 4
    img_ids[:, 2] = torch.arange(n) % 4
    return {"img_ids": img_ids, "txt_ids": torch.zeros(4, 3)}


CASES: Dict[str, Case] = {
    "dit": Case("dit", dit, (4, 8, 8), _dit_cond, flow=False),
    "pixart": Case("pixart", pixart, (4, 8, 8), _pixart_cond, flow=False),
    "flux": Case("flux", flux, (16, 4), _pooled_cond("pooled_projections"), flow=True, timestep_scale=1e-3,
                 extra=_flux_extra),
    "sd3": Case("sd3", sd3, (4, 8, 8), _pooled_cond("pooled_projections"), flow=True),
    "wan": Case("wan", wan, (4, 2, 8, 8), lambda b, g: ({"encoder_hidden_states": _txt(b, g)},
                                                        {"encoder_hidden_states": _txt(b, g)}), flow=True),
}


def _cat(a, b):
    out = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([v, b[k]])
        else:
            out[k] = v
    return out


def _model_out(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _foca_context(model, name):
    from foca_kernels.hooks import cache_context, is_cache_enabled

    return cache_context(model, name) if is_cache_enabled(model) else contextlib.nullcontext()


@torch.no_grad()
def sample(case: Case, model, *, steps: int = 8, batch: int = 1, cfg: str = "none", guidance: float = 3.0,
           latents: Optional[torch.Tensor] = None, conds=None, scheduler=None):
    """Denoise ``latents`` like the family's pipeline: cfg "none", "batched" (one call on the
    doubled batch, e.g. DiT/PixArt/SD3 pipelines) or "separate" (two calls in cache contexts
    "cond"/"uncond", e.g. FLUX true-CFG/Wan pipelines)."""
    sched = scheduler or case.scheduler()
    sched.set_timesteps(steps)
    x = case.latents(batch) if latents is None else latents.clone()
    cond, uncond = conds if conds is not None else case.conds(x.shape[0])
    ctx = getattr(model, "cache_context", None)
    for t in sched.timesteps:
        def call(inp, kw):
            ts = (t * case.timestep_scale).expand(inp.shape[0])
            extra = case.extra(inp) if case.extra else {}
            return _model_out(model(hidden_states=inp, timestep=ts, return_dict=False, **kw, **extra))

        if cfg == "none":
            eps = call(x, cond)
        elif cfg == "batched":
            both = call(torch.cat([x, x]), _cat(cond, uncond))
            c, u = both.chunk(2)
            eps = u + guidance * (c - u)
        elif cfg == "separate":
            named = ctx if ctx is not None else lambda name: _foca_context(model, name)
            with named("cond"):
                c = call(x, cond)
            with named("uncond"):
                u = call(x, uncond)
            eps = u + guidance * (c - u)
        else:
            raise ValueError(cfg)
        x = sched.step(eps, t, x).prev_sample
    return x


def flux_pipeline():
    """A FluxPipeline around the tiny FLUX transformer (no text encoders, no VAE: call it with
    ``**pipe._test_embeds`` and ``output_type="latent"``), with true CFG's "cond"/"uncond"
    cache contexts and non-uniform sigmas."""
    pytest.importorskip("transformers", reason="diffusers' FluxPipeline needs transformers (extra 'diffusers')")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),  # non-uniform sigmas
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=flux(),
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    pipe._test_embeds = dict(
        prompt_embeds=torch.randn(1, 4, TXT, generator=g), pooled_prompt_embeds=torch.randn(1, TXT, generator=g),
        negative_prompt_embeds=torch.randn(1, 4, TXT, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, TXT, generator=g),
    )
    return pipe


def model_cache():
    """A ``model_for(name)`` that builds one tiny model per family and hands it back without
    a cache on every call (one cache per test module, as each module asks for its own)."""
    from foca_kernels.hooks import disable_cache

    models: Dict[str, object] = {}

    def model_for(name: str):
        if name not in models:
            models[name] = CASES[name].make()
        m = models[name]
        disable_cache(m)
        return m

    return model_for
