"""Hooks on plain nn.Modules (no diffusers): targets by name, schedules, time sources, contexts,
lifetime corner cases, torch.compile, and the package importing without diffusers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import foca_kernels
from foca_kernels.hooks import (
    CacheConfig,
    FocaCacheWarning,
    Schedule,
    cache_context,
    cache_info,
    cache_states,
    disable_cache,
    enable_cache,
    reset_cache,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, temb):
        x = x + self.attn(self.norm(x) * (1 + temb))
        return x + self.mlp(self.norm(x))


class Toy(nn.Module):
    """A small DiT-like stack: timestep embedding, blocks with attn/mlp, output head."""

    def __init__(self, d=16, n=2):
        super().__init__()
        self.temb = nn.Linear(1, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, d)

    def forward(self, x, timestep):
        temb = torch.sin(self.temb(timestep.reshape(-1, 1, 1).float() / 1000))
        for layer in self.layers:
            x = layer(x, temb)
        return self.head(x)


def toy():
    torch.manual_seed(0)
    return Toy().eval()


TIMESTEPS = torch.tensor([999.0, 950.0, 850.0, 700.0, 560.0, 400.0, 300.0, 150.0, 60.0, 10.0])  # uneven


@torch.no_grad()
def sample(model, timesteps=TIMESTEPS, seed=0, batch=2, call=None):
    x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(seed))
    for t in timesteps:
        y = model(x, timestep=t.expand(batch)) if call is None else call(model, x, t)
        x = x - 0.05 * y
    return x


# ---- a plain module ---------------------------------------------------------------------
def test_plain_module_by_name_pattern_and_generic_defaults():
    m = toy()
    ref = sample(m)
    enable_cache(m, targets=[r"layers\.\d+\.(attn|mlp)"], interval=3)
    names = sorted(s.name for s in m._foca_cache.sites)
    assert names == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
    a = sample(m)
    assert cache_info(m).calls_forecast > 0 and not torch.equal(a, ref)
    disable_cache(m)
    enable_cache(m, interval=3)  # generic defaults find the same modules
    assert sorted(s.name for s in m._foca_cache.sites) == names
    assert torch.equal(sample(m), a)
    disable_cache(m)
    enable_cache(m, interval=3, granularity="block")
    assert [s.name for s in m._foca_cache.sites] == ["layers.0", "layers.1"]
    assert all(s.mode == "residual" for s in m._foca_cache.sites)
    sample(m)
    disable_cache(m)
    assert torch.equal(sample(m), ref)


def test_block_residual_is_readded_to_the_input_on_skipped_steps():
    m = toy()
    seen = {}

    def spy(model, x, t):
        seen.setdefault("inputs", []).append(x.clone())
        return model(x, timestep=t.expand(x.shape[0]))

    enable_cache(m, targets=[(r"layers\.0", "residual")], method="reuse", interval=2, warmup=1)
    block = m.layers[0]
    outs = []
    orig = block.forward

    def record(x, temb):
        y = orig(x, temb)
        outs.append((x.clone(), y.clone()))
        return y

    block.forward = record  # sits on top of the cache's wrapper: sees forecasts too
    sample(m, timesteps=TIMESTEPS[:3], call=spy)
    block.forward = orig  # the cache's wrapper again, so that disable can remove it
    (x0, y0), (x1, y1), (x2, y2) = outs  # F s F  (warmup 1, interval 2)
    assert torch.allclose(y1, x1 + (y0 - x0), atol=1e-6)  # reuse of the residual, re-added
    assert cache_info(m).calls_forecast == 1
    disable_cache(m)


class Line(nn.Module):
    """out = a + b * timestep: a straight-line trajectory in the timestep."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(3, 8, generator=g))
        self.b = nn.Parameter(torch.randn(3, 8, generator=g))

    def forward(self, timestep):
        return self.a + self.b * timestep.reshape(-1, 1) / 1000


class LineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].ffn = Line()

    def forward(self, x, timestep):
        return x + self.blocks[0].ffn(timestep)


@pytest.mark.parametrize("method", ["foca", "taylorseer"])
def test_time_from_timesteps_is_exact_on_straight_lines_with_uneven_steps(method):
    m = LineModel()
    x = torch.zeros(3, 8)
    truth = [m(x, t.reshape(1)) for t in TIMESTEPS]
    opts = {"order": 1} if method == "taylorseer" else {}
    got = {}
    for time in ("timesteps", "step"):
        enable_cache(m, interval=4, warmup=2, time=time, method=method, method_options=opts)
        with torch.no_grad():
            got[time] = [m(x, t.reshape(1)) for t in TIMESTEPS]
        assert cache_info(m).calls_forecast == 6
        disable_cache(m)
    err = {k: max((a - b).abs().max().item() for a, b in zip(v, truth)) for k, v in got.items()}
    assert err["timesteps"] < 1e-5
    assert err["step"] > 1e-2  # h in steps is wrong when the timesteps are uneven


def test_repeated_timestep_with_time_timesteps_explains_itself():
    m = LineModel()
    enable_cache(m, interval=2, time="timesteps")
    x = torch.zeros(3, 8)
    with torch.no_grad():
        m(x, torch.tensor([900.0]))
        m(x, torch.tensor([800.0]))
        with pytest.raises(ValueError, match="time='step'"):  # e.g. Heun: two calls per timestep
            m(x, torch.tensor([800.0]))
    disable_cache(m)


# ---- schedules ----------------------------------------------------------------------------
def test_schedule_patterns():
    assert CacheConfig(interval=5).pattern(12) == "FFssssFssssF"
    assert CacheConfig(interval=3, warmup=1).pattern(7) == "FssFssF"
    assert CacheConfig(interval=3, warmup=2, final=3).pattern(12) == "FFssFssFsFFF"
    assert CacheConfig(interval=1).pattern(4) == "FFFF"
    assert CacheConfig(mask=[True, True, False, True]).pattern(6) == "FFsFFF"
    assert CacheConfig(mask=lambda k, n: k % 2 == 0).pattern(5) == "FsFsF"
    s = Schedule(interval=3, warmup=2, final=1)
    assert s.skips_after(4, 8) and not s.skips_after(7, 8) and s.skips_after(7, None)
    assert not Schedule(interval=1).skips_after(0, None)


def test_explicit_mask_and_not_ready_modules_are_computed():
    m = toy()
    mask = [True, False, True, False, False, True, False, True, True, False]
    enable_cache(m, mask=mask, method="foca")
    sample(m)
    info = cache_info(m)
    assert info.steps_skipped == mask.count(False)
    # step 1 is skipped but FoCa needs two computed steps: computed instead ("forced")
    assert info.calls_forced == info.modules
    assert info.calls_forecast == (mask.count(False) - 1) * info.modules
    disable_cache(m)


def test_final_without_known_step_count_warns():
    m = toy()
    enable_cache(m, interval=2, final=2)
    with pytest.warns(FocaCacheWarning, match="final=2"):
        sample(m, timesteps=TIMESTEPS[:2])
    disable_cache(m)
    enable_cache(m, interval=2, final=2, num_inference_steps=len(TIMESTEPS))
    sample(m)
    pattern = CacheConfig(interval=2, final=2).pattern(len(TIMESTEPS))
    assert pattern == "FFsFsFsFFF"
    assert cache_info(m).contexts["default"]["steps_full"] == pattern.count("F")
    disable_cache(m)


# ---- contexts and lifetime ------------------------------------------------------------------
def test_named_contexts_and_pipeline_step_index():
    m = toy()

    def cfg_call(model, x, t):  # two calls per step, each in its own context
        with cache_context(model, "cond", step_index=int(step[0])):
            c = model(x, timestep=t.expand(x.shape[0]))
        with cache_context(model, "uncond", step_index=int(step[0])):
            u = model(x * 0.5, timestep=t.expand(x.shape[0]))
        step[0] += 1
        return u + 2.0 * (c - u)

    enable_cache(m, interval=3, detect_new_generation=False)
    step = [0]
    a = sample(m, call=cfg_call)
    step = [0]  # step_index back to 0: a new generation for both contexts
    b = sample(m, call=cfg_call)
    info = cache_info(m)
    assert set(info.contexts) == {"cond", "uncond"}
    assert all(c["generations"] == 2 for c in info.contexts.values())
    disable_cache(m)
    assert torch.equal(a, b)


def test_inference_mode_then_no_grad():
    m = toy()
    enable_cache(m, interval=3)
    with torch.inference_mode():
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
        for t in TIMESTEPS:
            x = x - 0.05 * m(x, timestep=t.expand(2))
    first = x.clone()
    second = sample(m)  # no_grad: states made under inference_mode are replaced, no crash
    disable_cache(m)
    assert torch.equal(first, second)


def test_returned_forecast_buffers_never_leave_the_model():
    m = toy()
    enable_cache(m, targets=[r"head"], interval=3)  # the model returns the cached module's output
    outs = []
    with pytest.warns(FocaCacheWarning, match="returning a copy"):
        with torch.no_grad():
            for t in TIMESTEPS:
                outs.append(m(torch.ones(2, 5, 16), timestep=t.expand(2)))
    copies = [o.clone() for o in outs]
    ptrs = {o.untyped_storage().data_ptr() for o in outs}
    assert len(ptrs) == len(outs)
    assert all(torch.equal(o, c) for o, c in zip(outs, copies))
    disable_cache(m)


def test_fresh_output_buffers_option():
    m = toy()
    enable_cache(m, interval=3, reuse_output_buffers=False)
    a = sample(m)
    assert cache_info(m).buffer_bytes == 0
    disable_cache(m)
    enable_cache(m, interval=3)
    assert torch.equal(sample(m), a)
    assert cache_info(m).buffer_bytes > 0
    disable_cache(m)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(16, 16)])
        self.t = nn.Linear(1, 16)

    def forward(self, x, timestep):
        e = self.t(timestep.reshape(-1, 1, 1) / 1000)
        for _ in range(3):  # one module, three calls per step: three streams
            x = x + torch.tanh(self.blocks[0](x + e))
        return x


def test_a_module_called_several_times_per_step_gets_a_stream_per_call():
    m = Shared().eval()
    ref = sample(m)
    enable_cache(m, targets=[r"blocks\.0"], interval=1)
    assert torch.equal(sample(m), ref)
    disable_cache(m)
    enable_cache(m, targets=[r"blocks\.0"], interval=3)
    sample(m)
    info = cache_info(m)
    assert info.streams == 3 and info.calls_forecast == 3 * info.steps_skipped
    disable_cache(m)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, x, timestep):
        return x + self.layers[0](x)


def test_uncacheable_outputs_are_computed_with_a_warning():
    m = DictOut()
    inner = m.layers[0]
    orig = inner.forward
    inner.forward = lambda x: {"y": orig(x)}  # noqa: E731
    m.forward = lambda x, timestep: x + m.layers[0](x)["y"]  # noqa: E731
    enable_cache(m, targets=[r"layers\.0"], interval=2)
    with pytest.warns(FocaCacheWarning, match="not cached"):
        sample(m)
    assert cache_info(m).calls_forecast == 0
    disable_cache(m)


def test_target_errors_and_nested_targets():
    m = toy()
    with pytest.raises(ValueError, match="no module"):
        enable_cache(m, targets=[r"nothing\.here"])
    with pytest.warns(FocaCacheWarning, match="inside other cached modules"):
        enable_cache(m, targets=[r"layers\.\d+", r"layers\.\d+\.attn"])
    assert [s.name for s in m._foca_cache.sites] == ["layers.0", "layers.1"]
    disable_cache(m)
    with pytest.raises(RuntimeError, match="not enabled"):
        reset_cache(m)


@pytest.mark.parametrize(
    "bad",
    [dict(interval=0), dict(warmup=0), dict(final=-1), dict(method="nope"),
     dict(method="foca", method_options={"order": 2}), dict(time="sigma"), dict(granularity="layer"),
     dict(state_dtype=torch.float64), dict(targets=[("x", "both")]), dict(block_cache="input"), dict(targets=[])],
)
def test_config_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        CacheConfig(**bad)


def test_config_plus_overrides():
    m = toy()
    enable_cache(m, CacheConfig(interval=3), method="reuse", state_dtype=torch.bfloat16)
    sample(m)
    assert cache_info(m).method == "reuse"
    assert all(st.dtype == torch.bfloat16 for st in cache_states(m))
    disable_cache(m)


# ---- torch.compile ------------------------------------------------------------------------
def test_torch_compile_keeps_the_state_machine_eager():
    pytest.importorskip("torch._dynamo")
    import torch._dynamo

    m = toy()
    enable_cache(m, interval=3)
    eager = sample(m)
    reset_cache(m)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager")
    assert torch.equal(sample(compiled), eager)
    assert torch.equal(sample(compiled), eager)  # second generation: same, no recompile storm
    info = cache_info(compiled)
    assert info.steps_skipped == 3 * CacheConfig(interval=3).pattern(len(TIMESTEPS)).count("s")
    assert info.calls_forecast == info.steps_skipped * info.modules
    disable_cache(m)
    torch._dynamo.reset()


# ---- no diffusers needed --------------------------------------------------------------------
def test_works_without_diffusers():
    code = textwrap.dedent(
        """
        import sys
        import foca_kernels, foca_kernels.hooks
        assert "diffusers" not in sys.modules, "importing foca_kernels(.hooks) imported diffusers"
        sys.modules["diffusers"] = None  # any import of diffusers now fails
        import torch, torch.nn as nn
        from foca_kernels.hooks import enable_cache, disable_cache, cache_info
        m = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        m.blocks = nn.ModuleList([nn.Linear(8, 8)])
        class M(nn.Module):
            def __init__(self):
                super().__init__(); self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            def forward(self, x, timestep):
                for b in self.blocks:
                    x = x + b(x) * timestep
                return x
        m = M()
        enable_cache(m, targets=[r"blocks\\.\\d+"], interval=2)
        with torch.no_grad():
            for t in (1.0, 0.8, 0.6, 0.4):
                m(torch.ones(2, 8), timestep=t)
        assert cache_info(m).calls_forecast == 2, cache_info(m)
        disable_cache(m)
        print("ok")
        """
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_exports():
    import foca_kernels.hooks as H

    for name in H.__all__:
        assert hasattr(H, name)
    assert foca_kernels.hooks is H


def test_both_fused_backends_agree():
    m = toy()
    out = {}
    for backend in ("torch", "triton"):
        if backend == "triton" and foca_kernels.get_backend("cpu") != "triton":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        enable_cache(m, interval=3, backend=backend)
        out[backend] = sample(m)
        disable_cache(m)
    assert torch.allclose(out["torch"], out["triton"], rtol=1e-5, atol=1e-6)
