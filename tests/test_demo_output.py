"""What the demo harness reports: a colour per method, the one-time compile outside the timed
runs, and settings that would measure nothing refused."""

from __future__ import annotations

import pytest
import torch

from foca_kernels.demo import harness
from foca_kernels.demo.harness import METHOD_NAMES, HarnessConfig


def test_every_method_has_its_own_plot_colour():
    from foca_kernels.demo.plots import _color

    colours = {m: _color(m) for m in METHOD_NAMES}
    assert None not in colours.values(), [m for m, c in colours.items() if c is None]
    assert len(set(colours.values())) == len(METHOD_NAMES), colours  # injective: no two methods alike
    # the aliases draw in their method's colour
    for alias, m in harness.METHOD_ALIASES.items():
        assert _color(harness.canonical_method(alias)) == colours[m]


def test_error_plot_draws_each_method_in_its_colour(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from foca_kernels.demo import plots

    methods = ("taylorseer2", "foca-calibrated", "rfc", "foca-r7", "taylorseer3")
    runs = [SimpleNamespace(method=m, interval=3, schedule="FFsFsFsF", traj_err=[0.0, 0.0] + [0.1 * (i + 1)] * 6,
                            fcst_err=[float("nan")] * 2 + [0.2 * (i + 1)] * 6) for i, m in enumerate(methods)]
    res = SimpleNamespace(config=SimpleNamespace(methods=("full",) + methods, num_steps=8), runs=runs,
                          get=lambda m, n: next(r for r in runs if r.method == m))
    drawn = []
    real = plots._figure

    def figure(*a, **k):
        fig = real(*a, **k)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(plots, "_figure", figure)
    plots.error_plot(res, [3], tmp_path / "e.png")
    lines = [ln for ax in drawn[0].axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    by_method = {}
    for ln in lines:
        by_method.setdefault(ln.get_label().split(" ")[0], set()).add(ln.get_color())
    assert set(by_method) == set(methods)
    assert all(len(c) == 1 for c in by_method.values())
    assert len({next(iter(c)) for c in by_method.values()}) == len(methods)


def _tiny_model():
    pytest.importorskip("diffusers")
    from foca_kernels.demo.model import build_digits_dit

    torch.manual_seed(0)
    return build_digits_dit(init=False).eval().requires_grad_(False)


def test_the_c_loop_is_compiled_before_the_timed_runs(monkeypatch):
    """The first cached run must not be charged the one-time C compile: by the time any timed
    run enters the cache, the compiled loop has been loaded (and its time is reported)."""
    from foca_kernels.ops import cpu_codegen

    if not cpu_codegen.status().startswith(("in use", "not loaded")) or not cpu_codegen._compilers():
        pytest.skip(f"no compiled CPU path here: {cpu_codegen.status()}")
    model = _tiny_model()
    monkeypatch.setattr(cpu_codegen, "_tried", False)  # as in a fresh process
    monkeypatch.setattr(cpu_codegen, "_lib", None)
    monkeypatch.setattr(cpu_codegen, "compile_seconds", None)
    loaded_at_entry = []
    real = harness.cached

    def cached(model, config):
        loaded_at_entry.append(cpu_codegen._tried)
        return real(model, config)

    monkeypatch.setattr(harness, "cached", cached)
    res = harness.run_harness(HarnessConfig(samples=2, num_steps=6, intervals=(2,), methods=["reuse", "taylorseer2"],
                                            backend="torch", progress=False, probe_elements=64, probe_samples=1),
                              model=model, classifier=None)
    assert loaded_at_entry and all(loaded_at_entry), loaded_at_entry
    assert res.machine["fused_ops"].startswith("C loop, compiled with"), res.machine["fused_ops"]
    assert res.machine["compile_seconds"] > 0


@pytest.mark.parametrize("fields,match", [
    (dict(num_steps=10, warmup=10), r"warmup \(10\) \+ final \(0\) must be fewer than num_steps \(10\)"),
    (dict(num_steps=10, warmup=4, final=6), r"warmup \(4\) \+ final \(6\) must be fewer than num_steps \(10\)"),
    (dict(num_steps=10, intervals=(3, 9)), r"intervals \[9\] are longer than the 8 steps after the warm-up"),
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0 .*got nan"),
    (dict(guidance_scale=-1.0), r"guidance_scale must be a finite number >= 0 .*got -1.0"),
    (dict(methods=["nosuch"]), r"unknown harness method 'nosuch'; expected one of full, steps, reuse"),
])
def test_settings_that_measure_nothing_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        HarnessConfig(**fields)


def test_table_order_is_the_name_table_order():
    cfg = HarnessConfig(methods=["rfc", "foca", "taylorseer3", "fora", "foca-r7"], intervals=(3,))
    assert cfg.methods == tuple(m for m in METHOD_NAMES if m in cfg.methods)
    assert cfg.methods == ("full", "reuse", "taylorseer3", "foca-r7", f"foca-{harness.default_reading()}", "rfc")
