"""The fidelity harness, its pictures and the ``foca-kernels demo`` command, on reduced settings.

The model is the shipped digits DiT when its weights are there, else an untrained one built
from the same config with seeded random weights (everything tested here is mechanics, true for
any weights). Cached runs pass ``backend="torch"`` (the fused PyTorch path, what a CPU user
gets without ``TRITON_INTERPRET``): conftest switches the Triton interpreter on, which would
spend seconds per run on these tensors; the kernels' parity with the PyTorch path is the core
suite's job. ``test_harness_triton_matches_torch`` runs one tiny cached run through the
interpreted Triton kernel to show that route works in the harness too.
"""

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from foca_kernels.demo.harness import (  # noqa: E402
    ADAPTIVE, ALL_METHODS, HarnessConfig, _Probe, canonical_method, default_reading, replay_forecast_error, run_harness,
)
from foca_kernels.demo import sampler as harness_sampler  # noqa: E402
from foca_kernels.demo.model import assets_dir  # noqa: E402
from foca_kernels.hooks import cache_info, cached  # noqa: E402

SHIPPED = (assets_dir() / "digits_dit.safetensors").exists()


@pytest.fixture(scope="module")
def model():
    if SHIPPED:
        from foca_kernels.demo.model import load_digits_dit

        return load_digits_dit()
    from foca_kernels.demo.model import build_digits_dit

    torch.manual_seed(0)
    return build_digits_dit(init=False).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def classifier():
    from foca_kernels.demo.classifier import load_digits_classifier

    return load_digits_classifier()


@pytest.fixture(scope="module")
def test_digits():
    from foca_kernels.demo.digits import load_digits

    return load_digits("test")[0]


def _tiny(**kw):
    base = dict(samples=4, num_steps=8, intervals=(2, 3), backend="torch", progress=False, probe_elements=256,
                probe_samples=2)
    base.update(kw)
    return HarnessConfig(**base)


def test_method_names():
    assert canonical_method("foca") == f"foca-{default_reading()}"
    assert canonical_method("FORA") == "reuse"
    assert canonical_method("foca_bdf2") == "foca-bdf2"
    assert canonical_method("foca-secant") == "foca-r0"
    assert [canonical_method(f"foca-{r}") for r in ("r0", "r3", "r4", "r6", "r7")] == [
        "foca-r0", "foca-r3", "foca-r4", "foca-r6", "foca-r7"]
    assert canonical_method("taylorseer3") == "taylorseer3"
    for bad in ("foca-cubic", "taylorseer7", "magic"):
        with pytest.raises(ValueError):
            canonical_method(bad)
    cfg = HarnessConfig(methods=["foca", "reuse", "reuse"], intervals=[5, 3, 5])
    assert cfg.methods == ("full", "reuse", f"foca-{default_reading()}")  # full added, table order
    assert cfg.intervals == (3, 5)
    assert cfg.same_cost_steps(5) == cfg.schedule(5).count("F") == 11  # warm-up 2 + one per window


def test_harness_end_to_end(model, classifier, test_digits):
    cfg = _tiny(methods=ALL_METHODS)
    res = run_harness(cfg, model=model, classifier=classifier, fid_reference=test_digits)
    assert [r.label for r in res.runs][:3] == ["full", "steps N=2", "reuse N=2"]
    assert len(res.runs) == 1 + 2 * (len(ALL_METHODS) - 1)
    full = res.full
    assert full.psnr == math.inf and full.rel_l2 == 0.0 and full.speedup == 1.0
    assert full.images.shape == (4, 1, 8, 8) and len(full.traj_err) == 8
    assert len(res.probe_modules) == 12  # attn1 and ff of 6 blocks
    for r in res.runs[1:]:
        pattern = cfg.schedule(r.interval)
        # RCS: its realised schedule, calibrated on the same batch to at most the fixed compute
        if r.method in ADAPTIVE:
            assert len(r.schedule) == len(pattern) and r.schedule.count("F") <= pattern.count("F")
            pattern = r.schedule
        assert r.seconds > 0 and r.speedup > 0
        assert 0.0 <= r.accuracy <= 1.0 and r.fid_test >= 0.0 and r.fid_full >= 0.0
        assert math.isfinite(r.psnr) and r.rel_l2 > 0.0  # every run here skips something
        if r.method == "steps":
            assert r.num_steps == pattern.count("F") and r.traj_err == [] and r.fcst_err == []
            assert r.skipped == pytest.approx(1 - r.num_steps / cfg.num_steps)
            continue
        # every skipped step forecasts all 12 modules (warm-up 2 >= what each method needs)
        assert r.calls_forecast == 12 * pattern.count("s") and r.calls_forced == 0
        assert r.skipped == pytest.approx(pattern.count("s") / len(pattern))
        assert r.state_bytes > 0
        if r.method in ("duca", "rfc") + ADAPTIVE:  # need the model (duca's refresh, rfc's inputs) or a fixed pattern
            assert r.fcst_err == []
        else:
            assert [math.isnan(e) for e in r.fcst_err] == [c == "F" for c in pattern]
        assert all(e > 0 for e in r.fcst_err if not math.isnan(e))
        first_skip = pattern.index("s")
        assert r.traj_err[:first_skip] == [0.0] * first_skip and r.traj_err[first_skip] > 0
    # the first forecast of FoCa (h = h_prev = 1) is the linear extrapolation, like TaylorSeer 1
    fs, ts1 = res.get("foca-r0", 2), res.get("taylorseer1", 2)
    assert fs.traj_err[2] == pytest.approx(ts1.traj_err[2], rel=1e-4)
    assert fs.fcst_err[2] == pytest.approx(ts1.fcst_err[2], rel=1e-4)

    md = res.to_markdown()
    assert md.startswith("| method | N | steps | skipped |") and md.count("\n") == 2 + len(res.runs)
    csv_lines = res.to_csv().strip().split("\n")
    assert len(csv_lines) == 1 + len(res.runs) and csv_lines[1].startswith("full,,8,")
    doc = res.to_json()
    json.dumps(doc, allow_nan=False)  # strict JSON: inf/nan written as strings
    assert doc["runs"][0]["psnr"] == "inf" and len(doc["runs"]) == len(res.runs)
    assert "full" in res.to_text()


def test_interval_one_equals_full_exactly(model, classifier, test_digits):
    from foca_kernels.demo.sampler import sample

    labels = [0, 1, 2]
    ref = sample(model, labels, seed=3, num_steps=6)
    for method, opts in (("foca", {}), ("foca", {"anchor": "bdf2"}), ("taylorseer", {"order": 2}), ("reuse", {})):
        with cached(model, interval=1, method=method, method_options=opts, num_inference_steps=6):
            x = sample(model, labels, seed=3, num_steps=6)
            info = cache_info(model)
        assert torch.equal(x, ref), method
        assert info.calls_forecast == 0 and info.state_bytes == 0
    # and through the harness (auto backend: nothing is launched at interval 1)
    res = run_harness(_tiny(intervals=(1,), methods=["reuse", "taylorseer2", "foca"], backend=None),
                      model=model, classifier=classifier, fid_reference=test_digits)
    for r in res.runs[1:]:
        assert torch.equal(r.images, res.full.images), r.label
        assert r.psnr == math.inf and r.rel_l2 == 0.0 and r.skipped == 0.0 and r.fid_full == 0.0
        assert r.traj_err == [0.0] * 8 and all(math.isnan(e) for e in r.fcst_err)


def test_replay_matches_the_hooks_first_forecast(model):
    """The teacher-forced replay and the hooks agree where their inputs agree: up to the first
    skipped step the cached trajectory is the full one, so the first forecast is the same."""
    from foca_kernels.demo.sampler import sample

    cfg = _tiny(samples=2, num_steps=6)
    labels = [3, 8]
    full = _Probe(model, cfg.cache_config("reuse", 2), 512)
    with full:
        sample(model, labels, seed=0, num_steps=6)
    _, true = full.stacked()
    for m in ("foca-secant", "foca-bdf2", "taylorseer2", "reuse"):
        ccfg = cfg.cache_config(m, 3)
        method, opts = ccfg.method, ccfg.method_options
        online = _Probe(model, ccfg, 512)
        online.index = full.index  # same elements
        with cached(model, ccfg), online:
            sample(model, labels, seed=0, num_steps=6)
        _, got = online.stacked()
        pattern = cfg.schedule(3)
        k = pattern.index("s")
        err = ((got[k] - true[k]).norm(dim=1) / true[k].norm(dim=1)).mean()
        replay = replay_forecast_error(true, method, opts, pattern, backend="torch")
        assert replay[k] == pytest.approx(float(err), rel=1e-4, abs=1e-7), m
        assert torch.equal(got[:k], true[:k])


def test_harness_triton_matches_torch(model, classifier, test_digits):
    pytest.importorskip("triton")
    from foca_kernels.backend import interpreter_on

    if not interpreter_on() and not torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    kw = dict(samples=2, num_steps=5, intervals=(2,), methods=["foca"], probe_elements=64, probe_samples=1)
    a = run_harness(_tiny(backend="triton", **kw), model=model, classifier=classifier, fid_reference=test_digits)
    b = run_harness(_tiny(backend="torch", **kw), model=model, classifier=classifier, fid_reference=test_digits)
    assert a.machine["backend"] == "triton" and b.machine["backend"] == "torch"
    ra, rb = a.runs[1], b.runs[1]
    assert ra.calls_forecast > 0
    torch.testing.assert_close(ra.images, rb.images, rtol=1e-5, atol=1e-5)


def test_pictures(model, classifier, test_digits, tmp_path):
    pytest.importorskip("matplotlib")
    from foca_kernels.demo.harness import write_outputs

    res = run_harness(_tiny(intervals=(5, 7), num_steps=12, methods=["reuse", "taylorseer2", "foca"]),
                      model=model, classifier=classifier, fid_reference=test_digits)
    files = write_outputs(res, tmp_path / "out")
    assert set(files) == {"table.md", "table.csv", "results.json", "samples_N5.png", "samples_N7.png",
                          "forecast_error.png"}
    from PIL import Image

    for name in ("samples_N5.png", "samples_N7.png", "forecast_error.png"):
        with Image.open(files[name]) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_demo_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from foca_kernels.cli import main

    out = tmp_path / "demo-out"
    args = ["demo", "--samples", "4", "--steps", "8", "--n", "2", "3", "--methods", "steps", "reuse", "foca",
            "--out", str(out), "--no-progress", "--backend", "torch", "--threads", "1"]
    if not SHIPPED:
        args.append("--untrained")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and f"foca-{default_reading()}" in text and str(out) in text
    for name in ("table.md", "table.csv", "results.json", "samples_N3.png", "forecast_error.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["runs"]] == ["full"] + ["steps", "reuse", f"foca-{default_reading()}"] * 2


def test_cli_help(capsys):
    from foca_kernels.cli import main

    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--full" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# the second sampler, unconditional sampling, models from a model directory (issue 19)

class _Calls:
    """Counts model calls and records their class labels and timesteps."""

    def __init__(self, model):
        self.labels, self.timesteps = [], []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.labels.append(kwargs["class_labels"].clone())
        self.timesteps.append(kwargs["timestep"].clone())

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("sampler", ["euler", "dpm"])
@pytest.mark.parametrize("unconditional", [False, True])
def test_one_model_call_per_step(model, sampler, unconditional):
    from foca_kernels.demo.sampler import NULL_CLASS, sample, timesteps_and_sigmas

    calls = _Calls(model)
    try:
        a = sample(model, [1, 2, 3], seed=5, num_steps=7, sampler=sampler, unconditional=unconditional)
    finally:
        calls.remove()
    b = sample(model, [1, 2, 3], seed=5, num_steps=7, sampler=sampler, unconditional=unconditional)
    assert torch.equal(a, b)  # deterministic
    assert len(calls.labels) == 7
    if unconditional:  # batch B, every row the null label
        assert all(y.tolist() == [NULL_CLASS] * 3 for y in calls.labels)
    else:  # batched CFG: cond rows, then null rows
        assert all(y.tolist() == [1, 2, 3] + [NULL_CLASS] * 3 for y in calls.labels)
    ts, sigmas = timesteps_and_sigmas(7, sampler)
    assert len(ts) == 7 and len(sigmas) == 8 and float(sigmas[-1]) == 0.0
    # the model sees 1000 * sigma (a float) with either sampler
    got = torch.stack([t[0] for t in calls.timesteps])
    torch.testing.assert_close(got, (sigmas[:-1] * 1000).float(), rtol=1e-6, atol=1e-3)
    assert got.dtype == torch.float32 and float(got[0]) > float(got[-1])


def test_dpm_and_unconditional_change_the_samples_and_the_defaults_do_not(model):
    from foca_kernels.demo.sampler import sample

    base = sample(model, [0, 5], seed=0, num_steps=6)
    assert torch.equal(base, sample(model, [0, 5], seed=0, num_steps=6, sampler="euler", unconditional=False))
    assert not torch.equal(base, sample(model, [0, 5], seed=0, num_steps=6, sampler="dpm"))
    unc = sample(model, [0, 5], seed=0, num_steps=6, unconditional=True)
    assert not torch.equal(base, unc)
    # unconditional ignores the labels (only the seeds matter) and equals guidance 1 on the null label
    assert torch.equal(unc, sample(model, [7, 9], seed=0, num_steps=6, unconditional=True))
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(model, [0], num_steps=3, sampler="heun")
    with pytest.raises(ValueError, match="unconditional sampling has no guidance"):
        sample(model, [0], num_steps=3, unconditional=True, guidance_scale=2.0)


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped digits weights")
def test_dpm_samples_the_trained_model_like_euler(model, classifier):
    """DPM-Solver++(2M) solves the same ODE: on the shipped digits DiT its 20-step samples are
    within 35 dB of Euler's at 50 steps (10 samples; 100 samples measured 44.4 dB against Euler
    at 200 steps, Euler's own 50 steps 48.6 dB) and read back as the requested digits."""
    from foca_kernels.demo.metrics import classifier_accuracy, psnr
    from foca_kernels.demo.sampler import sample

    labels = torch.arange(10)
    euler = sample(model, labels, seed=0, num_steps=50)
    dpm = sample(model, labels, seed=0, num_steps=20, sampler="dpm")
    assert psnr(dpm, euler) > 35.0
    assert classifier_accuracy(classifier, dpm, labels) == 1.0


def test_harness_runs_unconditional_and_dpm(model, classifier, test_digits):
    res = run_harness(_tiny(intervals=(3,), methods=["reuse", "foca"], sampler="dpm", unconditional=True),
                      model=model, classifier=classifier, fid_reference=test_digits)
    assert res.config.sampler == "dpm" and res.config.unconditional
    for r in res.runs:
        assert math.isnan(r.accuracy)  # no class was requested
        assert r.fid_test >= 0.0
    assert math.isfinite(res.runs[1].psnr) and res.runs[1].calls_forecast > 0
    # the reference is full compute sampled the same way
    from foca_kernels.demo.sampler import sample

    ref = sample(model, res.labels, seed=0, num_steps=8, sampler="dpm", unconditional=True)
    assert torch.equal(res.full.images, ref)
    doc = res.to_json()
    assert doc["config"]["sampler"] == "dpm" and doc["config"]["unconditional"] is True
    with pytest.raises(ValueError, match="sampler must be one of"):
        HarnessConfig(sampler="heun")
    with pytest.raises(ValueError, match="unconditional sampling has no guidance"):
        HarnessConfig(unconditional=True, guidance_scale=3.0)


TINY_DIT = dict(in_channels=1, out_channels=1, num_layers=2, dropout=0.0, norm_num_groups=1, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=10, upcast_attention=False,
                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5, num_attention_heads=2,
                attention_head_dim=8, sample_size=8, patch_size=2)


@pytest.fixture
def fresh_specs(monkeypatch):
    """Names registered by a test do not outlive it."""
    from foca_kernels.demo import specs

    monkeypatch.setattr(specs, "SPECS", dict(specs.SPECS))
    return specs


def _write_model_dir(d, name="tiny", *, classifier=False, test_split=True, config=None):
    """A model directory as the study scripts write it (seeded random weights, float32)."""
    from safetensors.torch import save_file

    from foca_kernels.demo import specs
    from foca_kernels.demo.model import build_digits_dit

    torch.manual_seed(1)
    m = build_digits_dit(config or TINY_DIT, init=False)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / f"{name}_dit.safetensors"))
    (d / f"{name}_dit.json").write_text(json.dumps(dict(model=name, config=config or TINY_DIT)))
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    y = torch.arange(20) % 10
    if test_split:
        specs.save_split(d, name, "test", x, y)
    if classifier:
        from foca_kernels.demo.classifier import DigitsClassifier, save_classifier

        specs.register(specs.DemoSpec(name=name, image_size=8, dit_config=config or TINY_DIT, classifier_size=4,
                                      loader=None, train_steps=0, train_batch_size=0, directory=str(d)))
        save_classifier(DigitsClassifier(image_size=4), {}, d, name=name)
    return m


def test_model_directory_runs_in_the_harness(fresh_specs, tmp_path):
    from foca_kernels.demo.model import load_demo_dit

    d = tmp_path / "tiny-model"
    m = _write_model_dir(d, classifier=True)
    spec = fresh_specs.spec_from_dir(d)  # the only model there
    assert spec.name == "tiny" and spec.tokens == 16 and spec.classifier_size == 4 and spec.has_data("test")
    assert fresh_specs.get_spec("tiny") is spec  # registered
    loaded = load_demo_dit("tiny", directory=d)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    res = run_harness(_tiny(intervals=(3,), methods=["reuse", "foca"], model="tiny", model_dir=str(d)))
    assert res.full.images.shape == (4, 1, 8, 8) and len(res.probe_modules) == 4  # 2 blocks x (attn1, ff)
    assert res.runs[1].calls_forecast > 0
    assert all(0.0 <= r.accuracy <= 1.0 and math.isfinite(r.fid_test) for r in res.runs)  # its classifier, its split
    assert res.to_json()["config"]["model_dir"] == str(d)


def test_model_directory_without_classifier_measures_psnr_only(fresh_specs, tmp_path):
    d = tmp_path / "bare"
    _write_model_dir(d, name="bare", test_split=False)
    res = run_harness(_tiny(intervals=(3,), methods=["taylorseer2"], model="bare", model_dir=str(d)))
    assert all(math.isnan(r.accuracy) and math.isnan(r.fid_test) and math.isnan(r.fid_full) for r in res.runs)
    assert math.isfinite(res.runs[1].psnr) and res.runs[1].psnr_per_image
    assert not fresh_specs.get_spec("bare").has_data("test")
    with pytest.raises(FileNotFoundError, match="bare_test.safetensors is missing"):
        fresh_specs.get_spec("bare").load_data("test")


def test_bad_model_directories_are_refused(fresh_specs, tmp_path):
    spec_from_dir = fresh_specs.spec_from_dir
    with pytest.raises(ValueError, match="does not exist"):
        spec_from_dir(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        spec_from_dir(tmp_path / "f")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no <name>_dit.json"):
        spec_from_dir(empty)
    two = tmp_path / "two"
    _write_model_dir(two, name="a")
    _write_model_dir(two, name="b")
    with pytest.raises(ValueError, match="several models \\(a, b\\); give the name"):
        spec_from_dir(two)
    assert spec_from_dir(two, "b").name == "b"
    with pytest.raises(ValueError, match="no c_dit.json \\(models there: a, b\\)"):
        spec_from_dir(two, "c")
    (two / "a_dit.safetensors").unlink()
    with pytest.raises(ValueError, match="no a_dit.safetensors"):
        spec_from_dir(two, "a")
    with pytest.raises(ValueError, match="a model name must be"):
        spec_from_dir(two, "../b")
    bad = tmp_path / "bad"
    _write_model_dir(bad, name="m")
    (bad / "m_dit.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        spec_from_dir(bad)
    (bad / "m_dit.json").write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="has no 'config'"):
        spec_from_dir(bad)
    (bad / "m_dit.json").write_text(json.dumps({"config": dict(TINY_DIT, num_embeds_ada_norm=5)}))
    with pytest.raises(ValueError, match="needs 10 classes"):
        spec_from_dir(bad)
    with pytest.raises(ValueError, match="model directory .* does not exist"):
        HarnessConfig(model="x", model_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown demo model 'x'"):
        HarnessConfig(model="x")
    with pytest.raises(ValueError, match="is a shipped demo model"):
        fresh_specs.register(fresh_specs.DemoSpec(name="mnist", image_size=8, dit_config=TINY_DIT, classifier_size=8,
                                                  loader=None, train_steps=0, train_batch_size=0))


def test_demo_command_on_a_model_directory(fresh_specs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from foca_kernels.cli import main

    d = tmp_path / "tiny-model"
    _write_model_dir(d, classifier=True)
    out = tmp_path / "out"
    assert main(["demo", "--model-dir", str(d), "--samples", "2", "--steps", "6", "--n", "3", "--methods", "reuse",
                 "--sampler", "dpm", "--unconditional", "--out", str(out), "--no-progress", "--backend", "torch",
                 "--threads", "1"]) == 0
    assert "tiny DiT from" in capsys.readouterr().out
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["model"], cfg["model_dir"], cfg["sampler"], cfg["unconditional"]) == ("tiny", str(d), "dpm", True)


def test_fitted_runs_are_calibrated_on_other_seeds(model, classifier, test_digits, monkeypatch):
    """fitted / fitted-free: one calibration per N, on calibration_samples samples from a seed
    other than the judged samples'; the runs then forecast every skipped call with the weights
    (not TaylorSeer-2's: the samples differ) at TaylorSeer-2's compute."""
    from foca_kernels.demo import harness

    seen = []
    real = harness.calibrate_fitted

    def spy(model_, config, fit, interval):
        seen.append((fit, interval))
        return real(model_, config, fit, interval)

    monkeypatch.setattr(harness, "calibrate_fitted", spy)
    sampled = []
    real_sample = harness_sampler.sample

    def sample_spy(model_, labels, seed, **kw):
        sampled.append((len(labels), seed))
        return real_sample(model_, labels, seed=seed, **kw)

    monkeypatch.setattr(harness_sampler, "sample", sample_spy)
    if hasattr(harness, "sample"):  # imported at module level
        monkeypatch.setattr(harness, "sample", sample_spy)
    cfg = _tiny(methods=["taylorseer2", "fitted", "fitted-free"], calibration_samples=3)
    res = run_harness(cfg, model=model, classifier=classifier, fid_reference=test_digits)
    assert sorted(seen) == [("free", 2), ("free", 3), ("line", 2), ("line", 3)]
    cal_seeds = {s for n, s in sampled if n == 3}
    assert cal_seeds and cfg.seed not in cal_seeds  # the calibration never sees the judged noise
    by = {(r.method, r.interval): r for r in res.runs}
    for n in (2, 3):
        ts2, free = by[("taylorseer2", n)], by[("fitted-free", n)]
        assert free.calls_forecast == ts2.calls_forecast and free.calls_computed == ts2.calls_computed
        assert not torch.equal(free.images, ts2.images)
        assert all(math.isfinite(e) for e in free.fcst_err if not math.isnan(e))
