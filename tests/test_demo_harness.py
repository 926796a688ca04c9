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
        if r.method in ADAPTIVE:  # RCS: its realised schedule, calibrated on the same batch to at most the fixed compute
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
