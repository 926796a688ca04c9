"""Hooks on tiny random-weight diffusers transformers (DiT, PixArt, FLUX, SD3, Wan), driven
the way their pipelines drive them."""

from __future__ import annotations

import pytest
import torch

import foca_kernels
import foca_kernels.api
import foca_kernels.step
from foca_kernels.group import StateGroup
from foca_kernels.ops import torch_group, triton_group
from foca_kernels.hooks import (
    CacheConfig,
    FocaCacheWarning,
    cache_info,
    cache_states,
    disable_cache,
    enable_cache,
    reset_cache,
)
from foca_kernels.hooks import pending as pending_mod
from foca_kernels.hooks.wrap import is_foca_wrapper

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)

FAMILIES = ["dit", "pixart", "flux", "sd3", "wan"]
STEPS = 8  # interval 3, warmup 2: F F s s F s s F


pytestmark = pytest.mark.usefixtures("one_torch_thread")


model_for = T.model_cache()


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # DDIM + guidance amplify matmul rounding to ~3e-5


# ---- every step computed -----------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("cfg", ["none", "batched", "separate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_computed_is_bit_identical(family, cfg, granularity, monkeypatch):
    case, m = T.CASES[family], model_for(family)
    ref = T.sample(case, m, steps=4, batch=2, cfg=cfg)
    enable_cache(m, interval=1, granularity=granularity)
    assert torch.equal(T.sample(case, m, steps=4, batch=2, cfg=cfg), ref)
    disable_cache(m)
    # Same with the states fed on every step (a mask that never skips still updates them): each
    # stream once per step, in the call's grouped update (or on its own).
    calls = {"update_": 0}
    orig, orig_group = foca_kernels.api.update_, pending_mod.update_group_shared_

    def counted(*a, **k):
        calls["update_"] += 1
        return orig(*a, **k)

    def counted_group(states, *a, **k):
        calls["update_"] += len(states)
        return orig_group(states, *a, **k)

    monkeypatch.setattr(foca_kernels.api, "update_", counted)
    monkeypatch.setattr(pending_mod, "update_group_shared_", counted_group)
    enable_cache(m, mask=lambda step, n: True, granularity=granularity)
    assert torch.equal(T.sample(case, m, steps=4, batch=2, cfg=cfg), ref)
    info = cache_info(m)
    assert info.calls_forecast == 0 and info.streams > 0
    assert calls["update_"] == 4 * info.streams
    disable_cache(m)


# ---- disable ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_forward_objects_and_outputs(family):
    case, m = T.CASES[family], model_for(family)
    probe = m.transformer_blocks[0] if hasattr(m, "transformer_blocks") else m.blocks[0]
    own_forward = probe.forward  # an instance attribute set by someone else before us
    probe.forward = own_forward
    before = {n: mod.__dict__.get("forward", "absent") for n, mod in m.named_modules()}
    extra = {k: m.__dict__.get(k, "absent") for k in ("cache_context", "_reset_stateful_cache")}
    ref = T.sample(case, m, steps=STEPS, cfg="separate")

    enable_cache(m, interval=3, granularity="block")
    cached = T.sample(case, m, steps=STEPS, cfg="separate")
    assert cache_info(m).calls_forecast > 0
    assert not torch.equal(cached, ref)
    assert disable_cache(m) is True
    assert disable_cache(m) is False  # a second disable is a no-op

    after = {n: mod.__dict__.get("forward", "absent") for n, mod in m.named_modules()}
    assert all(after[n] is before[n] for n in before)
    assert probe.__dict__["forward"] is own_forward
    assert {k: m.__dict__.get(k, "absent") for k in extra} == extra
    assert "_foca_cache" not in m.__dict__
    assert m.forward.__func__ is type(m).forward
    assert torch.equal(T.sample(case, m, steps=STEPS, cfg="separate"), ref)
    del probe.forward


def test_enable_twice_is_an_error_and_never_double_wraps():
    case, m = T.CASES["flux"], model_for("flux")
    enable_cache(m, interval=3)
    wrappers = {n: mod.__dict__["forward"] for n, mod in m.named_modules()
                if is_foca_wrapper(mod.__dict__.get("forward"))}
    n_sites = cache_info(m).modules
    assert len(wrappers) == n_sites + 1  # the cached modules and the model itself
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_cache(m, interval=5)
    with pytest.raises(RuntimeError, match="already cached"):  # a cached module of an enabled model
        enable_cache(m.transformer_blocks[0], targets=[r"attn"])
    now = {n: mod.__dict__["forward"] for n, mod in m.named_modules() if is_foca_wrapper(mod.__dict__.get("forward"))}
    assert now == wrappers and all(now[n] is wrappers[n] for n in now)
    assert not is_foca_wrapper(m.forward.__wrapped__)
    T.sample(case, m, steps=STEPS)  # still works, schedule of the first enable
    assert cache_info(m).schedule.startswith("Schedule(interval=3")
    disable_cache(m)
    assert not any(is_foca_wrapper(mod.__dict__.get("forward")) for _, mod in m.named_modules())


# ---- forecasts really replace the modules ----------------------------------------------
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_skipped_steps_do_not_run_cached_modules_and_use_the_fused_ops(family, monkeypatch):
    case, m = T.CASES[family], model_for(family)
    counts = {"update_": 0, "forecast_": 0, "lincomb_": 0, "module": 0, "group": 0, "launch": 0, "full": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] += 1
            return fn(*a, **k)

        return wrapped

    for name in ("update_", "forecast_"):
        monkeypatch.setattr(foca_kernels.api, name, counting(name, getattr(foca_kernels.api, name)))
    # the custom op, its eager entry point, a closed form's full-step copy
    for name in ("lincomb_", "run_lincomb_checked", "copy_row"):
        monkeypatch.setattr(foca_kernels.step, name, counting("lincomb_", getattr(foca_kernels.step, name)))
    # A skipped step: one grouped forecast of every stream, one launch (the states are packed
    # into one allocation and share one history), whatever the number of cached modules.
    monkeypatch.setattr(StateGroup, "forecast_", counting("group", StateGroup.forecast_))
    monkeypatch.setattr(torch_group, "group_torch", counting("launch", torch_group.group_torch))
    monkeypatch.setattr(triton_group, "group_triton", counting("launch", triton_group.group_triton))
    # A full step: every stream's update in one grouped call at the end of the model call.
    monkeypatch.setattr(pending_mod, "update_group_shared_", counting("full", pending_mod.update_group_shared_))
    target = m.transformer_blocks[0].ff
    counting_forward = target.forward = counting("module", target.forward)

    enable_cache(m, interval=3, warmup=2)  # 8 steps: F F s s F s s F
    T.sample(case, m, steps=STEPS)
    info = cache_info(m)
    assert counts["module"] == 4  # ran on the 4 full steps only
    assert info.steps_full == 4 and info.steps_skipped == 4
    assert info.calls_forecast == 4 * info.modules and info.calls_forced == 0
    assert info.streams > 1
    assert counts["group"] == 4 and counts["launch"] == 4 and counts["forecast_"] == 0
    assert counts["full"] == 4 and counts["update_"] == counts["lincomb_"] == 0  # no per-stream update
    disable_cache(m)

    # With the number of steps known, the last full step feeds nothing (no forecast follows).
    counts.update({k: 0 for k in counts})
    enable_cache(m, interval=3, warmup=2, num_inference_steps=STEPS)
    T.sample(case, m, steps=STEPS)
    assert counts["module"] == 4 and counts["full"] == 3
    disable_cache(m)
    assert target.__dict__["forward"] is counting_forward
    del target.forward


@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_reported_are_the_states_nbytes(family):
    case, m = T.CASES[family], model_for(family)
    enable_cache(m, interval=3, state_dtype=torch.bfloat16)
    T.sample(case, m, steps=STEPS, batch=2, cfg="separate")
    info = cache_info(m)
    states = cache_states(m)
    assert len(states) == info.streams > 0
    assert info.state_bytes == sum(st.nbytes for st in states)
    assert info.state_bytes == sum(foca_kernels.state_nbytes(st) for st in states)
    assert all(st.dtype == torch.bfloat16 and st.io_dtype == torch.float32 for st in states)
    assert info.buffer_bytes > 0 and info.total_bytes == info.state_bytes + info.buffer_bytes
    assert set(info.contexts) == {"cond", "uncond"}
    assert sum(c["state_bytes"] for c in info.contexts.values()) == info.state_bytes
    reset_cache(m, free_memory=True)
    assert cache_info(m).state_bytes == 0
    disable_cache(m)


# ---- lifetime ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_consecutive_generations_equal_fresh_runs(family):
    case, m = T.CASES[family], model_for(family)
    cfg = CacheConfig(interval=3)
    enable_cache(m, cfg)
    a1 = T.sample(case, m, steps=STEPS, cfg="separate", latents=case.latents(1, seed=1))
    b1 = T.sample(case, m, steps=STEPS, cfg="separate", latents=case.latents(1, seed=2))
    c1 = T.sample(case, m, steps=STEPS, cfg="separate", latents=case.latents(1, seed=1))
    disable_cache(m)
    fresh = []
    for seed in (1, 2):
        enable_cache(m, cfg)
        fresh.append(T.sample(case, m, steps=STEPS, cfg="separate", latents=case.latents(1, seed=seed)))
        disable_cache(m)
    assert torch.equal(a1, fresh[0]) and torch.equal(b1, fresh[1]) and torch.equal(c1, a1)


@pytest.mark.parametrize("route", ["timestep", "num_steps", "reset", "step_count_differs"])
def test_new_generation_detection_routes(route):
    case, m = T.CASES["dit"], model_for("dit")
    opts = {
        "timestep": {},
        "num_steps": {"num_inference_steps": STEPS, "detect_new_generation": False},
        "reset": {"detect_new_generation": False},
        "step_count_differs": {},
    }[route]
    enable_cache(m, interval=3, **opts)
    first_steps = 11 if route == "step_count_differs" else STEPS
    T.sample(case, m, steps=first_steps, latents=case.latents(1, seed=5))
    if route == "reset":
        reset_cache(m)
    second = T.sample(case, m, steps=STEPS)
    disable_cache(m)
    enable_cache(m, interval=3, **opts)
    assert torch.equal(second, T.sample(case, m, steps=STEPS))
    assert cache_info(m).generations == 1
    disable_cache(m)


# ---- CFG and batches -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_separate_calls_equal_batched(family):
    case, m = T.CASES[family], model_for(family)
    ref_sep = T.sample(case, m, steps=STEPS, cfg="separate")
    ref_bat = T.sample(case, m, steps=STEPS, cfg="batched")
    assert close(ref_sep, ref_bat)  # the uncached model agrees to rounding
    enable_cache(m, interval=3)
    sep = T.sample(case, m, steps=STEPS, cfg="separate")
    contexts = set(cache_info(m).contexts)
    bat = T.sample(case, m, steps=STEPS, cfg="batched")
    info = cache_info(m)
    disable_cache(m)
    assert contexts == {"cond", "uncond"} and "default" in info.contexts
    assert info.calls_forecast > 0
    assert close(sep, bat)
    assert not close(sep, ref_sep)  # forecasts did change the result


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_samples_keep_their_own_state(family):
    case, m = T.CASES[family], model_for(family)
    batch = 3
    x = case.latents(batch, seed=7)
    cond, uncond = case.conds(batch, seed=8)

    def row(d, i):
        return {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    enable_cache(m, interval=3)
    together = T.sample(case, m, steps=STEPS, cfg="batched", latents=x, conds=(cond, uncond))
    alone = [
        T.sample(case, m, steps=STEPS, cfg="batched", latents=x[i : i + 1], conds=(row(cond, i), row(uncond, i)))
        for i in range(batch)
    ]
    disable_cache(m)
    for i in range(batch):
        assert close(together[i : i + 1], alone[i]), i


# ---- shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "dit"])
def test_shape_change_mid_generation_resets_with_a_warning(family):
    case, m = T.CASES[family], model_for(family)
    enable_cache(m, interval=2, warmup=2)
    sched = case.scheduler()
    sched.set_timesteps(STEPS)
    x2, x1 = case.latents(2), case.latents(1)
    cond2, _ = case.conds(2)
    cond1, _ = case.conds(1)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x, cond = (x2, cond2) if i < 4 else (x1, cond1)
            extra = case.extra(x) if case.extra else {}
            kw = dict(hidden_states=x, timestep=(t * case.timestep_scale).expand(x.shape[0]), return_dict=False)
            if i == 4:
                with pytest.warns(FocaCacheWarning, match="changed"):
                    outs.append(m(**kw, **cond, **extra)[0])
            else:
                outs.append(m(**kw, **cond, **extra)[0])
    info = cache_info(m)
    assert info.shape_resets == info.modules  # every cached module saw it (one warning)
    assert info.calls_forced > 0  # computed until it had history again ...
    assert info.calls_forecast > 0
    assert all(st.shape[0] == 1 for st in cache_states(m))  # ... re-allocated for the new shape
    assert all(torch.isfinite(o).all() for o in outs)
    disable_cache(m)


# ---- methods -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options",
    [("foca", {"anchor": "secant"}), ("foca", {"anchor": "bdf2"}), ("taylorseer", {"order": 1}),
     ("taylorseer", {"order": 3}), ("reuse", {})],
)
def test_methods_run_and_hold_their_slot_counts(method, options):
    case, m = T.CASES["pixart"], model_for("pixart")
    enable_cache(m, interval=3, method=method, method_options=options)
    out = T.sample(case, m, steps=STEPS)
    info = cache_info(m)
    slots = foca_kernels.make_method(method, **options).n_slots
    assert all(st.slots.shape[0] == slots for st in cache_states(m))
    assert info.calls_forecast > 0 and torch.isfinite(out).all()
    disable_cache(m)


# ---- targets -----------------------------------------------------------------------------
EXPECTED_TARGETS = {
    ("dit", "module"): ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"],
    ("pixart", "module"): ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"],
    ("flux", "module"): ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                         "single_transformer_blocks.0", "single_transformer_blocks.1"],
    ("flux", "block"): ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"],
    ("sd3", "module"): ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"],
    ("wan", "module"): ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ffn"],
    ("wan", "block"): ["blocks.0", "blocks.1"],
}


@pytest.mark.parametrize("family,granularity", sorted(EXPECTED_TARGETS))
def test_family_default_targets(family, granularity):
    from foca_kernels.hooks.targets import select_sites

    m = model_for(family)
    names = [s.name for s in select_sites(m, CacheConfig(granularity=granularity))]
    for expected in EXPECTED_TARGETS[(family, granularity)]:
        assert expected in names
    if granularity == "block":
        assert names == EXPECTED_TARGETS[(family, granularity)]
