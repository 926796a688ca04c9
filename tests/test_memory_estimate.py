"""estimate_cache_memory against what the hooks allocate: the same bytes, stream by stream, on
tiny diffusers transformers of five families (DiT, PixArt, FLUX, SD3, Wan), for several
methods, state dtypes and granularities; and enable_cache's check against the free memory."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import foca_kernels as fk
from foca_kernels.hooks import FocaCacheWarning, cache_info, disable_cache, enable_cache, is_cache_enabled
from foca_kernels.hooks import memory
from foca_kernels.hooks.apply import _controller
from foca_kernels.state import slot_stride

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 8  # interval 3, warmup 2: F F s s F s s F -- every method has forecast by step 6

CONFIGS = {
    "taylorseer": dict(),
    "foca-calibrated-bf16": dict(method="foca", state_dtype=torch.bfloat16),
    "foca-r7-no-buffers": dict(method="foca", reading="r7", reuse_output_buffers=False),
    "taylorseer3-compute-blocks": dict(order=3, compute_blocks=1),
    "reuse-block": dict(method="reuse", granularity="block"),
    "rfc-block-output": dict(method="rfc", granularity="block", block_cache="output"),
    "rfc": dict(method="rfc"),
    "duca": dict(method="duca"),
    "taylorseer-fp8": dict(state_dtype=torch.float8_e4m3fn),  # 16-bit anchor + e4m3 increments + row scales
    "foca-r7-fp8-block": dict(method="foca", reading="r7", state_dtype=torch.float8_e4m3fn, granularity="block"),
}


def _latents(family: str, batch: int = 1, odd: bool = False) -> torch.Tensor:
    """The family's latents; ``odd``: a token count that is no multiple of the slot alignment
    (FLUX 9 image tokens, Wan 9), so a state's bytes are not n_slots * numel * itemsize."""
    case = T.CASES[family]
    shape = case.latent_shape
    if odd:
        shape = {"flux": (9, 4), "wan": (4, 1, 6, 6)}[family]
    return torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(1))


def _inputs(family: str, latents: torch.Tensor) -> dict:
    """Example inputs of one model call, as T.sample makes it (cond, no CFG)."""
    case = T.CASES[family]
    cond, _ = case.conds(latents.shape[0])
    extra = case.extra(latents) if case.extra else {}
    t = torch.full((latents.shape[0],), 500.0) * case.timestep_scale
    return dict(hidden_states=latents, timestep=t, return_dict=False, **cond, **extra)


def _measured(model) -> dict:
    """(context, module, call, output) -> (state bytes, buffer bytes) of every allocated stream."""
    out = {}
    for cname, ctx in _controller(model).contexts.items():
        for (site, call), group in ctx.groups.items():
            for k, s in enumerate(group.streams):
                if s.state is not None:
                    out[(cname, site, call, k)] = (s.state_bytes, s.buffer_bytes)
    return out


def _estimated(est, contexts) -> dict:
    return {(c, s.module, s.call, s.output): (s.state_bytes, s.buffer_bytes) for c in contexts for s in est.streams}


def _run(family: str, options: dict, *, odd: bool = False, cfg: str = "none", **estimate_kw):
    """(estimate, measured per stream, cache_info) of one cached generation."""
    case = T.CASES[family]
    model = case.make()
    latents = _latents(family, odd=odd)
    inputs = _inputs(family, latents)
    contexts = 2 if cfg == "separate" else 1
    if estimate_kw:
        est = fk.estimate_cache_memory(model, **options, contexts=contexts, **estimate_kw)
    else:
        est = fk.estimate_cache_memory(model, inputs=inputs, contexts=contexts, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FocaCacheWarning)  # e.g. residuals that fall back to outputs
        enable_cache(model, inputs=inputs, contexts=contexts, num_inference_steps=STEPS, **options)
        T.sample(case, model, steps=STEPS, latents=latents, cfg=cfg)
    info, measured = cache_info(model), _measured(model)
    assert info.calls_forecast > 0  # the buffers exist only once something was forecast
    disable_cache(model)
    return est, measured, info


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", ["dit", "pixart", "flux", "sd3", "wan"])
def test_estimate_equals_allocation(family, config):
    est, measured, info = _run(family, CONFIGS[config])
    assert measured, "nothing was cached"
    assert _estimated(est, ["default"]) == measured  # stream by stream
    assert est.state_bytes == info.state_bytes == info.state_bytes_estimate
    assert est.buffer_bytes == info.buffer_bytes == info.buffer_bytes_estimate
    assert est.n_streams == info.streams
    if CONFIGS[config].get("reuse_output_buffers") is False:
        assert est.buffer_bytes == 0
    else:
        assert est.buffer_bytes > 0


@pytest.mark.parametrize("config", ["taylorseer", "foca-calibrated-bf16", "rfc", "reuse-block", "taylorseer-fp8"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_estimate_counts_slot_padding_and_contexts(family, config):
    """Token counts whose tensors are no multiple of the slot alignment, and CFG as two calls
    (two contexts, each with its own streams)."""
    est, measured, info = _run(family, CONFIGS[config], odd=True, cfg="separate")
    assert est.contexts == 2 and set(c for c, *_ in measured) == {"cond", "uncond"}
    assert _estimated(est, ["cond", "uncond"]) == measured
    assert est.state_bytes == info.state_bytes == info.state_bytes_estimate
    assert est.buffer_bytes == info.buffer_bytes
    padded = [s for s in est.streams if slot_stride(torch.Size(s.shape).numel()) != torch.Size(s.shape).numel()]
    assert padded  # the case this test exists for: the slots' alignment is in the bytes


@pytest.mark.parametrize("config", ["taylorseer", "foca-calibrated-bf16", "rfc", "reuse-block"])
@pytest.mark.parametrize("family, tokens", [("dit", 16), ("pixart", 16), ("wan", 32)])
def test_tokens_estimate_equals_allocation(family, tokens, config):
    est, measured, info = _run(family, CONFIGS[config], tokens=tokens)
    assert est.state_bytes == info.state_bytes and est.buffer_bytes == info.buffer_bytes
    assert sorted(v for v in _estimated(est, ["default"]).values()) == sorted(measured.values())


def test_tokens_refused_where_they_do_not_give_the_shapes():
    for family in ("flux", "sd3"):
        with pytest.raises(ValueError, match="pass inputs="):
            fk.estimate_cache_memory(T.CASES[family].make(), tokens=16)
    with pytest.raises(ValueError, match="default targets only"):
        fk.estimate_cache_memory(T.CASES["dit"].make(), tokens=16, targets=[r"transformer_blocks\.\d+\.attn1"])
    with pytest.raises(ValueError, match="tokens must be"):
        fk.estimate_cache_memory(T.CASES["dit"].make(), tokens=0)
    with pytest.raises(TypeError, match="exactly one of"):
        fk.estimate_cache_memory(T.CASES["dit"].make())
    with pytest.raises(ValueError, match="contexts"):
        fk.estimate_cache_memory(T.CASES["dit"].make(), tokens=16, contexts=0)


def test_meta_inputs_and_eager_call_give_the_same_estimate():
    """A shape-only call: meta tensors stand for the inputs; an ordinary call agrees."""
    model = T.CASES["flux"].make()
    inputs = _inputs("flux", _latents("flux", batch=2))
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ref = fk.estimate_cache_memory(model, inputs=inputs, method="rfc")
    assert fk.estimate_cache_memory(model, inputs=meta, method="rfc").streams == ref.streams
    assert fk.estimate_cache_memory(model, inputs=inputs, method="rfc", run="eager").streams == ref.streams
    assert {s.device for s in ref.streams} == {"cpu"}
    with pytest.raises(ValueError, match="run must be"):
        fk.estimate_cache_memory(model, inputs=inputs, run="real")


def test_estimate_leaves_an_enabled_cache_alone():
    case, model = T.CASES["dit"], T.CASES["dit"].make()
    enable_cache(model, num_inference_steps=STEPS)
    T.sample(case, model, steps=STEPS)
    before = cache_info(model)
    est = fk.estimate_cache_memory(model, inputs=_inputs("dit", _latents("dit")))
    assert cache_info(model) == before and _controller(model).active
    assert est.state_bytes == before.state_bytes
    disable_cache(model)


def test_estimate_of_a_schedule_that_never_skips_is_zero():
    model = T.CASES["dit"].make()
    inputs = _inputs("dit", _latents("dit"))
    assert fk.estimate_cache_memory(model, inputs=inputs, interval=1).total_bytes == 0
    enable_cache(model, interval=1, num_inference_steps=STEPS)
    T.sample(T.CASES["dit"], model, steps=STEPS)
    assert cache_info(model).state_bytes == 0
    disable_cache(model)


def test_repr_and_table():
    model = T.CASES["dit"].make()
    est = fk.estimate_cache_memory(model, inputs=_inputs("dit", _latents("dit")), contexts=2)
    assert re.search(r"MemoryEstimate\(taylorseer\(order=2\).*8 streams", repr(est))
    lines = est.table().splitlines()
    assert len(lines) == 1 + len(est.streams) + 1
    assert "transformer_blocks.0.attn1" in lines[1] and "x2" in lines[-1]


# ---- enable_cache's check ---------------------------------------------------------------------
def _fp32_flux():
    model = T.CASES["flux"].make()
    inputs = _inputs("flux", _latents("flux"))
    return model, inputs, fk.estimate_cache_memory(model, inputs=inputs)


def _memory_warnings(record):
    return [str(w.message) for w in record
            if issubclass(w.category, FocaCacheWarning) and "would hold" in str(w.message)]


def test_enable_warns_past_free_memory_and_names_what_fits(monkeypatch):
    model, inputs, est = _fp32_flux()
    asked = []
    monkeypatch.setattr(memory, "free_memory", lambda dev: asked.append(dev) or est.total_bytes - 1)
    with pytest.warns(FocaCacheWarning) as record:
        enable_cache(model, inputs=inputs)
    msg, = _memory_warnings(record)
    assert asked == ["cpu"] and is_cache_enabled(model)
    assert f"{est.total_bytes} bytes on cpu where {est.total_bytes - 1} are free" in msg
    # every option named fits, and those not named do not
    bf16 = fk.estimate_cache_memory(model, inputs=inputs, state_dtype=torch.bfloat16).total_bytes
    block = fk.estimate_cache_memory(model, inputs=inputs, granularity="block").total_bytes
    assert bf16 < est.total_bytes and f"state_dtype=torch.bfloat16 ({memory._size(bf16)})" in msg
    assert ("granularity='block'" in msg) == (block < est.total_bytes)
    k = int(re.search(r"compute_blocks=\((\d+), 0\)", msg).group(1))
    assert fk.estimate_cache_memory(model, inputs=inputs, compute_blocks=k).total_bytes < est.total_bytes
    assert k == 1 or fk.estimate_cache_memory(model, inputs=inputs, compute_blocks=k - 1).total_bytes >= est.total_bytes
    fp8 = fk.estimate_cache_memory(model, inputs=inputs, state_dtype=torch.float8_e4m3fn).total_bytes
    assert fp8 < bf16 and f"state_dtype=torch.float8_e4m3fn ({memory._size(fp8)})" in msg
    info = cache_info(model)
    assert info.state_bytes_estimate == est.state_bytes and info.buffer_bytes_estimate == est.buffer_bytes
    disable_cache(model)


def test_fp8_is_named_only_where_the_method_accepts_it(monkeypatch):
    model, inputs, _ = _fp32_flux()
    est = fk.estimate_cache_memory(model, inputs=inputs, method="foca")  # calibrated: no fp8 state
    monkeypatch.setattr(memory, "free_memory", lambda dev: est.total_bytes - 1)
    with pytest.raises(MemoryError) as e:
        enable_cache(model, inputs=inputs, method="foca", strict=True)
    assert "state_dtype=torch.bfloat16" in str(e.value) and "float8" not in str(e.value)


def test_enable_names_the_smallest_compute_blocks_that_fits(monkeypatch):
    model, inputs, est = _fp32_flux()
    need = fk.estimate_cache_memory(model, inputs=inputs, compute_blocks=1).total_bytes
    # free memory below every dtype/granularity option but enough for compute_blocks=1 in fp32
    monkeypatch.setattr(memory, "free_memory", lambda dev: need)
    bf16 = fk.estimate_cache_memory(model, inputs=inputs, state_dtype=torch.bfloat16).total_bytes
    block = fk.estimate_cache_memory(model, inputs=inputs, granularity="block").total_bytes
    assert need < min(bf16, block)  # (what the test relies on)
    with pytest.raises(MemoryError) as e:
        enable_cache(model, inputs=inputs, strict=True)
    msg = str(e.value)
    assert "compute_blocks=(1, 0)" in msg and "state_dtype" not in msg.split("Options that fit")[1]
    assert "granularity='block'" not in msg


def test_strict_raises_and_enables_nothing(monkeypatch):
    model, inputs, est = _fp32_flux()
    monkeypatch.setattr(memory, "free_memory", lambda dev: 0)
    with pytest.raises(MemoryError, match="No cheaper state_dtype"):
        enable_cache(model, inputs=inputs, strict=True)
    assert not is_cache_enabled(model) and model.__dict__.get("forward") is None


def test_no_warning_when_it_fits(monkeypatch):
    model, inputs, est = _fp32_flux()
    monkeypatch.setattr(memory, "free_memory", lambda dev: est.total_bytes)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enable_cache(model, inputs=inputs, strict=True)
    assert not _memory_warnings(record) and is_cache_enabled(model)
    disable_cache(model)


def test_unknown_free_memory_checks_nothing(monkeypatch):
    model, inputs, est = _fp32_flux()
    monkeypatch.setattr(memory, "free_memory", lambda dev: None)
    enable_cache(model, inputs=inputs, strict=True)
    assert cache_info(model).state_bytes_estimate == est.state_bytes
    disable_cache(model)


def test_strict_needs_something_to_estimate_from():
    model = T.CASES["dit"].make()
    with pytest.raises(TypeError, match="strict=True"):
        enable_cache(model, strict=True)
    assert not is_cache_enabled(model)
    enable_cache(model)
    assert cache_info(model).state_bytes_estimate is None
    disable_cache(model)


def test_free_memory_on_cpu_is_the_available_ram():
    free = memory.free_memory("cpu")
    assert free is None or free > 0
    assert memory.free_memory("meta") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_estimate_on_cuda_equals_allocation_and_reads_free_memory():
    case = T.CASES["flux"]
    model = case.make().to("cuda")
    latents = _latents("flux", odd=True).to("cuda")
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in _inputs("flux", latents).items()}
    est = fk.estimate_cache_memory(model, inputs=inputs, state_dtype=torch.bfloat16)
    assert {s.device for s in est.streams} == {"cuda:0"}
    assert memory.free_memory("cuda:0") == torch.cuda.mem_get_info(0)[0] or memory.free_memory("cuda:0") > 0
    enable_cache(model, inputs=inputs, state_dtype=torch.bfloat16, num_inference_steps=STEPS)
    extra = case.extra
    with torch.no_grad():
        sched = case.scheduler()
        sched.set_timesteps(STEPS)
        x = latents
        cond = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in case.conds(1)[0].items()}
        ids = {k: v.to("cuda") for k, v in extra(x).items()}
        for t in sched.timesteps:
            eps = model(hidden_states=x, timestep=(t * case.timestep_scale).expand(1).to("cuda"), return_dict=False,
                        **cond, **ids)[0]
            x = sched.step(eps, t, x).prev_sample
    info = cache_info(model)
    assert info.calls_forecast > 0
    assert _estimated(est, ["default"]) == _measured(model)
    assert info.state_bytes == est.state_bytes == info.state_bytes_estimate
    disable_cache(model)
