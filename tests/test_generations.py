"""Two generations are never joined, on any device, by default.

Every test runs under ``device_like()``: each tensor counts as a GPU tensor, so a timestep can
be read only with a (counted) host-device sync, as on CUDA. A generation run on a cache that
has seen other generations must equal the same generation run on a fresh cache, bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)
import foca_kernels as fk
from foca_kernels.hooks import CacheConfig, FocaCacheWarning, cache_info, device_like, disable_cache, enable_cache

STEPS = 12
model_for = T.model_cache()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CASE = T.CASES["dit"]


@torch.no_grad()
def run(m, *, steps=STEPS, start=0, stop=None, seed=1, scheduler=None, wrap=None):
    """One generation with a bare model in a manual loop, as a user writes it (no pipeline,
    nothing told to the cache): timesteps ``[start:stop]`` of a ``steps``-step schedule."""
    sched = scheduler or CASE.scheduler()
    sched.set_timesteps(steps)
    x = CASE.latents(1, seed=seed)
    cond, _ = CASE.conds(1)
    for t in sched.timesteps[start:stop]:
        eps = T._model_out(m(hidden_states=x, timestep=t.expand(1), return_dict=False, **cond))
        x = sched.step(eps, t, x).prev_sample
    return x


def fresh(m, config=None, **kw):
    """The same generation on a newly enabled cache."""
    enable_cache(m, config or CacheConfig(interval=3))
    try:
        with device_like(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FocaCacheWarning)  # the sync warning: tested above
            return run(m, **kw)
    finally:
        disable_cache(m)


@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse"])
def test_bare_model_identical_generations_are_not_joined(method):
    m = model_for("dit")
    ref = fresh(m, CacheConfig(interval=3, method=method))
    enable_cache(m, interval=3, method=method)
    with device_like(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [run(m) for _ in range(3)]
    info = cache_info(m)
    disable_cache(m)
    assert all(torch.equal(o, ref) for o in outs)
    assert info.generations == 3
    # nothing on the host told them apart: one counted sync per model call, warned once
    assert info.host_syncs == 3 * STEPS
    assert info.boundary.startswith("timesteps (one host-device sync")
    msgs = [str(x.message) for x in w if issubclass(x.category, FocaCacheWarning)]
    assert len(msgs) == 1 and "new_generation" in msgs[0] and "generation(model)" in msgs[0]


@pytest.mark.parametrize("how", ["context", "call"])
def test_explicit_boundaries_cost_no_sync(how):
    m = model_for("dit")
    ref = fresh(m)
    short = fresh(m, steps=7)
    enable_cache(m, interval=3)
    outs = []
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("error", FocaCacheWarning)  # nothing to warn about
        for steps in (STEPS, 7, STEPS):
            if how == "context":
                with fk.generation(m):
                    outs.append(run(m, steps=steps))
            else:
                fk.new_generation(m)
                outs.append(run(m, steps=steps))
    info = cache_info(m)
    disable_cache(m)
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], short) and torch.equal(outs[2], ref)
    assert info.host_syncs == 0 and info.generations == 3
    assert info.boundary.startswith("explicit")


def test_explicit_step_count_splits_generations_without_sync():
    m = model_for("dit")
    ref = fresh(m)
    enable_cache(m, interval=3)
    with device_like():
        fk.new_generation(m, num_steps=STEPS)
        a, b = run(m), run(m)  # the second is found by counting
    info = cache_info(m)
    disable_cache(m)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert info.generations == 2 and info.host_syncs == 0


def test_shorter_second_generation():
    m = model_for("dit")
    ref_short = fresh(m, steps=7)
    enable_cache(m, interval=3)
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FocaCacheWarning)
        run(m)
        short = run(m, steps=7)
    assert cache_info(m).generations == 2
    disable_cache(m)
    assert torch.equal(short, ref_short)


def test_generation_abandoned_midway():
    m = model_for("dit")
    ref = fresh(m)
    enable_cache(m, interval=3)
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FocaCacheWarning)
        run(m, stop=5, seed=3)  # abandoned after 5 of 12 steps (in the middle of a window)
        again = run(m)
    disable_cache(m)
    assert torch.equal(again, ref)


@pytest.mark.parametrize("before", ["complete", "abandoned"])
def test_img2img_start_in_mid_schedule(before):
    """A generation that starts at step 5 of the schedule, after a complete one (the timesteps
    turn back) or after one abandoned after 3 steps (they jump ahead by three steps' spacing
    where a continuation would go one)."""
    m = model_for("dit")
    ref = fresh(m, start=5)
    enable_cache(m, interval=3)
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FocaCacheWarning)
        run(m, stop=None if before == "complete" else 3, seed=4)
        got = run(m, start=5)
    assert cache_info(m).generations == 2
    disable_cache(m)
    assert torch.equal(got, ref)


def test_sync_false_never_reads_and_says_so():
    m = model_for("dit")
    enable_cache(m, interval=3, sync=False)
    with device_like(), pytest.warns(FocaCacheWarning, match="would be joined"):
        run(m)
        run(m)
    info = cache_info(m)
    disable_cache(m)
    assert info.host_syncs == 0 and info.generations == 1 and info.boundary == "none"


def test_new_generation_refuses_bad_steps_and_needs_a_cache():
    m = model_for("dit")
    with pytest.raises(RuntimeError, match="not enabled"):
        fk.new_generation(m)
    enable_cache(m, interval=3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            fk.new_generation(m, num_steps=bad)
    disable_cache(m)


# ---- through a pipeline: its own calls mark the generations ----------------------------------
@pytest.fixture(scope="module")
def flux_pipe():
    return T.flux_pipeline()


def flux(pipe, steps, seed=0, stop_at=None):
    def stop(p, i, t, kw):
        if stop_at is not None and i == stop_at:
            raise KeyboardInterrupt  # the user stops a generation mid-way
        return kw

    return pipe(
        **pipe._test_embeds, true_cfg_scale=3.0, height=64, width=64, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=stop,
    ).images


def test_pipeline_generations_without_sync(flux_pipe):
    enable_cache(flux_pipe, interval=3)
    with device_like():
        ref, ref_short = flux(flux_pipe, STEPS), flux(flux_pipe, 7)
    disable_cache(flux_pipe)
    enable_cache(flux_pipe, interval=3)
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("error", FocaCacheWarning)
        a = flux(flux_pipe, STEPS)
        with pytest.raises(KeyboardInterrupt):
            flux(flux_pipe, STEPS, seed=5, stop_at=4)  # abandoned: no end-of-call reset
        b = flux(flux_pipe, 7)
        c = flux(flux_pipe, STEPS)
    info = cache_info(flux_pipe)
    disable_cache(flux_pipe)
    assert torch.equal(a, ref) and torch.equal(b, ref_short) and torch.equal(c, ref)
    assert info.host_syncs == 0 and info.boundary == "pipeline"
    assert info.contexts["cond"]["generations"] == 4


def test_pipeline_scheduler_restart_is_a_new_generation(flux_pipe):
    """The transformer of a cached pipeline driven by hand with the pipeline's scheduler: a
    new set_timesteps starts a new generation even where no pipeline call is seen."""
    pipe = flux_pipe
    m = pipe.transformer
    case = T.CASES["flux"]
    enable_cache(pipe, interval=3)
    with device_like():
        first = T.sample(case, m, steps=STEPS, scheduler=pipe.scheduler)
        T.sample(case, m, steps=5, scheduler=pipe.scheduler, latents=case.latents(1, seed=7))
        again = T.sample(case, m, steps=STEPS, scheduler=pipe.scheduler)
    info = cache_info(pipe)
    disable_cache(pipe)
    assert info.generations == 3 and info.host_syncs == 0
    assert torch.equal(first, again)


def test_pipeline_call_alone_marks_a_generation(flux_pipe):
    """The pipeline's progress bar (opened by every diffusers pipeline before its loop) resets
    the cache: here the transformer runs with a scheduler of its own, so neither the pipeline's
    scheduler nor a step count can tell the abandoned generation from the next one."""
    pipe, case = flux_pipe, T.CASES["flux"]
    ref = T.sample(case, pipe.transformer, steps=STEPS)  # uncached
    pipe.scheduler.set_timesteps(40)  # its step count (40) must not split the generations below
    enable_cache(pipe, interval=3)
    with device_like():
        T.sample(case, pipe.transformer, steps=5, latents=case.latents(1, seed=7))
        pipe.progress_bar(total=STEPS).close()
        got = T.sample(case, pipe.transformer, steps=STEPS)
        joined = T.sample(case, pipe.transformer, steps=STEPS)  # no pipeline call before it
    info = cache_info(pipe)
    disable_cache(pipe)
    enable_cache(pipe, interval=3)
    with device_like():
        expected = T.sample(case, pipe.transformer, steps=STEPS)
    disable_cache(pipe)
    assert not torch.equal(expected, ref)  # the cache is at work
    assert torch.equal(got, expected)
    assert info.host_syncs == 0
    assert not torch.equal(joined, expected)  # the control: without the call they are joined
