"""DuCa through ``enable_cache(model, method="duca")`` on tiny random diffusers models (DiT,
PixArt, FLUX, SD3) and the shipped digits DiT: interval 1 is the uncached model bit for bit,
disable restores everything, a conservative step runs the feed-forward on the fresh tokens
only (counted), aggressive steps run neither, and CFG halves / calls refresh the same tokens."""

from __future__ import annotations

import pytest
import torch

import foca_kernels.hooks.duca as hd
from foca_kernels.duca import pattern
from foca_kernels.hooks import Schedule, cache_info, cache_states, disable_cache, duca_info, enable_cache

import hooks_tiny as T  # noqa: E402  (skips the module when diffusers is missing)

FAMILIES = ["dit", "pixart", "flux", "sd3"]
STEPS = 8
N_TOKENS = {"dit": 16, "pixart": 16, "flux": 16, "sd3": 16}  # image tokens of the tiny models
CONST = {"ratio_schedule": "constant", "fresh_ratio": 0.25}  # 4 of 16 tokens per conservative step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


model_for = T.model_cache()


def ff_modules(m):
    """The partially recomputed modules of each family (double-stream ff only for FLUX)."""
    return {n: mod for n, mod in m.named_modules() if n.endswith(".ff") and n.startswith("transformer_blocks.")}


@pytest.mark.parametrize("cfg", ["batched", "separate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_interval_1_is_bit_identical(family, cfg):
    case, m = T.CASES[family], model_for(family)
    ref = T.sample(case, m, steps=3, batch=2, cfg=cfg)
    enable_cache(m, method="duca", interval=1)
    assert torch.equal(T.sample(case, m, steps=3, batch=2, cfg=cfg), ref)
    disable_cache(m)
    enable_cache(m, method="duca", mask=lambda step, n: True)  # states fed and v-norms recorded every step
    assert torch.equal(T.sample(case, m, steps=3, batch=2, cfg=cfg), ref)
    assert cache_info(m).calls_forecast == 0 and cache_info(m).streams > 0
    disable_cache(m)


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_forward_objects_and_outputs(family):
    case, m = T.CASES[family], model_for(family)
    before = {n: mod.__dict__.get("forward", "absent") for n, mod in m.named_modules()}
    ref = T.sample(case, m, steps=STEPS, cfg="separate")
    enable_cache(m, method="duca", interval=3, method_options=CONST)
    wrapped_v = [n for n, mod in m.named_modules() if n.endswith("to_v") and "forward" in mod.__dict__]
    assert wrapped_v, "v-norm score: the value projections next to the partial modules are wrapped"
    cached = T.sample(case, m, steps=STEPS, cfg="separate")
    assert torch.isfinite(cached).all() and not torch.equal(cached, ref)
    assert disable_cache(m) is True
    after = {n: mod.__dict__.get("forward", "absent") for n, mod in m.named_modules()}
    assert all(after[n] is before[n] for n in before)
    assert torch.equal(T.sample(case, m, steps=STEPS, cfg="separate"), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_conservative_step_feeds_only_the_fresh_tokens(family):
    """Rows entering each partial module's first layer per step: all tokens on full steps,
    floor(ratio * N) per sample on conservative steps, none on aggressive steps; attention
    runs on full steps only."""
    case, m = T.CASES[family], model_for(family)
    batch, n = 2, N_TOKENS[family]
    ffs = ff_modules(m)
    assert ffs
    rows, attn_calls, hooks = [], [], []
    for mod in ffs.values():
        hooks.append(mod.net[0].register_forward_pre_hook(lambda _m, a: rows[-1].append(a[0].shape[:-1])))
    attn_name = ".attn1" if hasattr(m.transformer_blocks[0], "attn1") else ".attn"
    attn = m.get_submodule(next(iter(ffs)).rsplit(".", 1)[0] + attn_name)
    # counted inside the attention: a module's own hooks fire even when the cache answers for it
    hooks.append(attn.to_q.register_forward_pre_hook(lambda *_: attn_calls.__setitem__(-1, attn_calls[-1] + 1)))

    def mark_step(*_):
        rows.append([])
        attn_calls.append(0)

    hooks.append(m.register_forward_pre_hook(mark_step))
    try:
        enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS)
        T.sample(case, m, steps=STEPS, batch=batch, cfg="none")
        info = duca_info(m)
        disable_cache(m)
    finally:
        for h in hooks:
            h.remove()
    phases = pattern(Schedule(4, 2), STEPS)
    assert phases == "FFcacFac", phases  # distance to the next full step (or the end): 3, 2, 1 | 2, 1
    k = n // 4
    for s, ph in enumerate(phases):
        want = {"F": (batch, n), "c": (batch, k), "a": None}[ph]
        got = set(rows[s])
        assert got == ({torch.Size(want)} if want else set()), f"step {s} ({ph}): rows seen {got}"
        assert len(rows[s]) == (len(ffs) if want else 0)
        assert attn_calls[s] == (1 if ph == "F" else 0), f"step {s} ({ph}): attention ran {attn_calls[s]} times"
    assert info["tokens_computed"] == phases.count("c") * len(ffs) * batch * k
    assert info["tokens_total"] == phases.count("c") * len(ffs) * batch * n


def _capture_indices(monkeypatch):
    seen = []
    orig = hd.refresh_tokens_

    def spy(cache, out, fresh, index, **kw):
        seen.append(index.clone())
        return orig(cache, out, fresh, index, **kw)

    monkeypatch.setattr(hd, "refresh_tokens_", spy)
    return seen


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_batched_cfg_halves_refresh_the_same_tokens(family, monkeypatch):
    case, m = T.CASES[family], model_for(family)
    seen = _capture_indices(monkeypatch)
    enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS)
    T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    assert seen
    for idx in seen:  # batch 4 = 2 samples x (cond, uncond)
        assert idx.shape == (4, 4)
        assert torch.equal(idx[:2], idx[2:]), "CFG halves got different tokens"
    assert any(not torch.equal(idx[0], idx[1]) for idx in seen), "samples of a batch are selected independently"


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_separate_cfg_calls_refresh_the_same_tokens(family, monkeypatch):
    case, m = T.CASES[family], model_for(family)
    seen = _capture_indices(monkeypatch)
    enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS)
    T.sample(case, m, steps=STEPS, batch=1, cfg="separate")
    disable_cache(m)
    n_ff = len(ff_modules(m))
    assert len(seen) == 2 * n_ff * pattern(Schedule(4, 2), STEPS).count("c")
    per_step = [seen[i:i + 2 * n_ff] for i in range(0, len(seen), 2 * n_ff)]
    for calls in per_step:  # cond's n_ff selections, then uncond's
        for a, b in zip(calls[:n_ff], calls[n_ff:]):
            assert torch.equal(a, b), "cond and uncond calls got different tokens"


def test_without_cfg_detection_halves_are_scored_apart(monkeypatch):
    """cfg_batched=False: each row of the doubled batch is scored by itself (v-norm differs
    between cond and uncond), so the tie above is the detection's doing."""
    case, m = T.CASES["dit"], model_for("dit")
    seen = _capture_indices(monkeypatch)
    enable_cache(m, method="duca", interval=4, method_options={**CONST, "cfg_batched": False},
                 num_inference_steps=STEPS)
    T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    assert any(not torch.equal(idx[:2], idx[2:]) for idx in seen)


def test_flux_single_blocks_and_text_stream_are_reused(monkeypatch):
    case, m = T.CASES["flux"], model_for("flux")
    runs = {"single": 0, "ff_context": 0}
    hooks = [b.proj_mlp.register_forward_pre_hook(lambda *_: runs.__setitem__("single", runs["single"] + 1))
             for b in m.single_transformer_blocks]
    hooks += [b.ff_context.net[0].register_forward_pre_hook(
        lambda *_: runs.__setitem__("ff_context", runs["ff_context"] + 1)) for b in m.transformer_blocks]
    try:
        enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS)
        T.sample(case, m, steps=STEPS, cfg="none")
        disable_cache(m)
    finally:
        for h in hooks:
            h.remove()
    n_full = pattern(Schedule(4, 2), STEPS).count("F")
    assert runs == {"single": n_full * len(m.single_transformer_blocks),
                    "ff_context": n_full * len(m.transformer_blocks)}


def test_state_bytes_are_one_slot_per_cached_output():
    case, m = T.CASES["dit"], model_for("dit")
    enable_cache(m, method="duca", interval=3)
    T.sample(case, m, steps=STEPS, cfg="none")
    states = cache_states(m)
    assert states and all(st.slots.shape[0] == 1 for st in states)
    assert cache_info(m).method == "duca"
    disable_cache(m)


def test_digits_dit_runs_partially():
    from foca_kernels.demo.model import load_digits_dit
    from foca_kernels.demo.sampler import sample

    m = load_digits_dit()
    ref = sample(m, [3, 7], seed=0, num_steps=12)
    enable_cache(m, method="duca", interval=3, num_inference_steps=12)  # the ratio schedule needs the step count
    x = sample(m, [3, 7], seed=0, num_steps=12)
    info = duca_info(m)
    disable_cache(m)
    assert torch.isfinite(x).all() and not torch.equal(x, ref)
    assert 0 < info["tokens_computed"] < info["tokens_total"]  # conservative steps ran, partially
    assert torch.equal(sample(m, [3, 7], seed=0, num_steps=12), ref)


def test_bad_options_are_refused():
    from foca_kernels.hooks import CacheConfig

    with pytest.raises(ValueError, match=r"fresh_ratio must be in \[0, 1\]"):
        CacheConfig(method="duca", method_options={"fresh_ratio": 1.2})
    with pytest.raises(ValueError, match="attention map"):
        CacheConfig(method="duca", method_options={"score": "attention"})
    with pytest.raises(TypeError, match="unknown duca option"):
        CacheConfig(method="duca", method_options={"ratio": 0.1})


def test_plain_module_and_torch_compile():
    """Any nn.Module with a token-wise ``mlp``: DuCa under torch.compile (eager backend) gives
    the eager result, two generations in a row (the selection and refresh run eagerly)."""
    pytest.importorskip("torch._dynamo")
    import torch._dynamo

    from test_hooks_plain import TIMESTEPS, sample, toy

    m = toy()
    opts = {**CONST, "score": "random", "spatial_bonus": 0.0}  # 5 tokens: no grid
    enable_cache(m, method="duca", interval=4, method_options=opts, num_inference_steps=len(TIMESTEPS))
    eager = sample(m)
    assert duca_info(m)["tokens_computed"] > 0
    disable_cache(m)
    enable_cache(m, method="duca", interval=4, method_options=opts, num_inference_steps=len(TIMESTEPS))
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager")
    assert torch.equal(sample(compiled), eager)
    assert torch.equal(sample(compiled), eager)
    disable_cache(m)
    torch._dynamo.reset()


@pytest.mark.parametrize("opts", [{"state_dtype": torch.bfloat16}, {"reuse_output_buffers": False}],
                         ids=["bf16-state", "fresh-outputs"])
def test_state_dtype_and_unbuffered_outputs(opts, monkeypatch):
    """A bf16 state under an fp32 model, and outputs allocated per call: the conservative call
    still runs on the fresh tokens and the result stays close to the buffered fp32 run."""
    case, m = T.CASES["dit"], model_for("dit")
    enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS)
    base = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    seen = _capture_indices(monkeypatch)
    enable_cache(m, method="duca", interval=4, method_options=CONST, num_inference_steps=STEPS, **opts)
    got = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    if "state_dtype" in opts:
        assert all(st.dtype == torch.bfloat16 for st in cache_states(m))
        assert torch.allclose(got, base, atol=0.05) and not torch.equal(got, base)
    else:
        assert torch.equal(got, base)
    disable_cache(m)
    assert seen and all(idx.shape == (4, 4) for idx in seen)


def test_forecast_variant_refreshes_on_top_of_taylorseer():
    """forecast="taylorseer": every skipped module is forecast (2 slots per output for order 1);
    conservative steps still run the feed-forward on the fresh tokens, and their rows change the
    result against plain TaylorSeer at the same schedule."""
    case, m = T.CASES["dit"], model_for("dit")
    enable_cache(m, method="taylorseer", method_options={"order": 1}, interval=4, num_inference_steps=STEPS)
    ts = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    opts = {**CONST, "forecast": "taylorseer", "forecast_order": 1}
    enable_cache(m, method="duca", method_options=opts, interval=4, num_inference_steps=STEPS)
    got = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    info = cache_info(m)
    assert info.method == "duca+taylorseer(order=1)"
    assert all(st.slots.shape[0] == 2 for st in cache_states(m))
    assert duca_info(m)["tokens_computed"] == pattern(Schedule(4, 2), STEPS).count("c") * 2 * 4 * 4
    disable_cache(m)
    assert torch.isfinite(got).all() and not torch.equal(got, ts)
    with pytest.raises(ValueError, match="forecast must be one of"):
        enable_cache(m, method="duca", method_options={"forecast": "rfc"})
    with pytest.raises(ValueError, match="forecast_order is TaylorSeer's order"):
        enable_cache(m, method="duca", method_options={"forecast": "foca", "forecast_order": 2})


def test_forecast_foca_is_plain_foca_without_fresh_tokens():
    """forecast="foca": FoCa's default closed form (r7: 3 slots per output) forecasts every
    skipped module. With no fresh token a conservative step adds nothing, so the samples equal
    plain FoCa r7's at the same schedule; with fresh tokens they differ by the recomputed rows."""
    case, m = T.CASES["dit"], model_for("dit")
    enable_cache(m, method="foca", method_options={"reading": "r7"}, interval=4, num_inference_steps=STEPS)
    foca = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    none = {"forecast": "foca", "fresh_ratio": 0.0, "ratio_schedule": "constant"}
    enable_cache(m, method="duca", method_options=none, interval=4, num_inference_steps=STEPS)
    same = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    info = cache_info(m)
    assert info.method == "duca+foca(reading=r7)"
    assert all(st.slots.shape[0] == 3 for st in cache_states(m))
    assert duca_info(m)["tokens_computed"] == 0
    disable_cache(m)
    assert torch.equal(same, foca)
    enable_cache(m, method="duca", method_options={**CONST, "forecast": "foca"}, interval=4, num_inference_steps=STEPS)
    got = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    assert duca_info(m)["tokens_computed"] == pattern(Schedule(4, 2), STEPS).count("c") * 2 * 4 * 4
    disable_cache(m)
    assert torch.isfinite(got).all() and (got - foca).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_fresh_ratio_0_is_reuse_bit_for_bit(family):
    """No fresh token: conservative steps run nothing and return the cache, as reuse does."""
    case, m = T.CASES[family], model_for(family)
    enable_cache(m, method="reuse", interval=3)
    reuse = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    disable_cache(m)
    enable_cache(m, method="duca", interval=3, method_options={"fresh_ratio": 0.0, "ratio_schedule": "constant"})
    got = T.sample(case, m, steps=STEPS, batch=2, cfg="batched")
    assert duca_info(m)["tokens_computed"] == 0 and duca_info(m)["tokens_total"] > 0
    disable_cache(m)
    assert torch.equal(got, reuse)
