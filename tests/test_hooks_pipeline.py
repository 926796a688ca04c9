"""Complete diffusers pipelines, end to end with their real schedulers: DiTPipeline with a tiny
random AutoencoderKL (CFG batched in one call) and FluxPipeline with true CFG (two calls in
the pipeline's own "cond"/"uncond" cache contexts), nothing downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)
from foca_kernels.hooks import (
    CacheConfig,
    cache_info,
    cache_states,
    cached,
    disable_cache,
    enable_cache,
    is_cache_enabled,
)

diffusers = T.diffusers
STEPS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dit_pipe():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=T.dit(), vae=vae, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_dit(pipe, labels=(1, 2), seed=0):
    return pipe(
        class_labels=list(labels), num_inference_steps=STEPS, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images


@pytest.fixture(scope="module")
def flux_pipe():
    return T.flux_pipeline()


def run_flux(pipe, seed=0, steps=STEPS):
    return pipe(
        **pipe._test_embeds, true_cfg_scale=3.0, height=64, width=64, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent",
    ).images


def test_dit_pipeline_end_to_end(dit_pipe):
    ref = run_dit(dit_pipe)
    other_ref = run_dit(dit_pipe, labels=(3, 4), seed=1)

    enable_cache(dit_pipe, interval=1)
    assert np.array_equal(run_dit(dit_pipe), ref)
    disable_cache(dit_pipe)
    enable_cache(dit_pipe, mask=lambda step, n: True)  # every step computed, states fed
    assert np.array_equal(run_dit(dit_pipe), ref)
    assert cache_info(dit_pipe).streams > 0
    disable_cache(dit_pipe)

    config = CacheConfig(interval=3, warmup=2, final=1)
    enable_cache(dit_pipe, config)
    a, b, a2 = run_dit(dit_pipe), run_dit(dit_pipe, labels=(3, 4), seed=1), run_dit(dit_pipe)
    info = cache_info(dit_pipe)
    assert info.contexts["default"]["num_steps"] == STEPS  # from the pipeline's scheduler
    assert info.generations == 3
    # F F s s F s s F: final=1 keeps step 7 computed (it is anyway); 4 skipped per run
    assert info.steps_skipped == 3 * 4 and info.steps_full == 3 * 4
    assert info.calls_forecast == 3 * 4 * info.modules
    assert not np.array_equal(a, ref)
    assert np.abs(a - ref).max() < 0.25  # images in [0, 1]: a forecast, not garbage
    disable_cache(dit_pipe)
    assert np.array_equal(a2, a)
    assert np.array_equal(run_dit(dit_pipe), ref)  # disabled: the original model again
    for labels, seed, expect in (((1, 2), 0, a), ((3, 4), 1, b)):  # each equals a fresh run
        with cached(dit_pipe, config):
            assert np.array_equal(run_dit(dit_pipe, labels, seed), expect)
    assert not is_cache_enabled(dit_pipe)
    assert np.array_equal(run_dit(dit_pipe, labels=(3, 4), seed=1), other_ref)


def test_flux_pipeline_true_cfg_contexts_and_sigmas(flux_pipe):
    ref = run_flux(flux_pipe)
    enable_cache(flux_pipe, interval=1)
    assert torch.equal(run_flux(flux_pipe), ref)
    disable_cache(flux_pipe)

    config = CacheConfig(interval=3, time="sigmas")
    enable_cache(flux_pipe, config)
    a = run_flux(flux_pipe)
    info = cache_info(flux_pipe)
    assert set(info.contexts) == {"cond", "uncond"}  # named by the pipeline
    for c in info.contexts.values():
        assert c["step"] == -1  # the pipeline's end-of-call reset reached the cache
        assert c["steps_skipped"] == 4 and c["steps_full"] == 4
    assert all(st.n_full == 0 for st in cache_states(flux_pipe))  # reset, allocations kept
    b = run_flux(flux_pipe, seed=1)
    a2 = run_flux(flux_pipe, steps=6)
    a3 = run_flux(flux_pipe)
    assert torch.equal(a3, a)
    disable_cache(flux_pipe)
    with cached(flux_pipe, config):
        assert torch.equal(run_flux(flux_pipe, seed=1), b)
    with cached(flux_pipe, config):
        assert torch.equal(run_flux(flux_pipe, steps=6), a2)
    with cached(flux_pipe, interval=3):  # h in steps instead of sigmas: a different forecast
        assert not torch.equal(run_flux(flux_pipe), a)
    assert not torch.equal(a, ref) and (a - ref).abs().max() < 0.1
    assert torch.equal(run_flux(flux_pipe), ref)
    tr = flux_pipe.transformer
    assert "forward" not in tr.__dict__ and "cache_context" not in tr.__dict__
    assert "_reset_stateful_cache" not in tr.__dict__


def test_pipeline_and_its_transformer_share_one_cache(flux_pipe):
    enable_cache(flux_pipe, interval=3)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_cache(flux_pipe.transformer, interval=3)
    assert is_cache_enabled(flux_pipe.transformer)
    assert disable_cache(flux_pipe.transformer) is True
    assert not is_cache_enabled(flux_pipe)
