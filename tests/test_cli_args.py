"""foca-kernels demo refuses bad arguments with a usage message before doing any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from foca_kernels import cli


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as sampling."""
    def boom(*a, **k):
        raise AssertionError("sampling started despite bad arguments")

    monkeypatch.setattr(cli, "demo", boom)


BAD = [
    (["--samples", "0"], r"--samples must be >= 2 \(the FID and the paired intervals need two samples\), got 0"),
    (["--samples", "-3"], r"--samples must be >= 2 .*, got -3"),
    (["--samples", "1"], r"--samples must be >= 2 .*, got 1"),
    (["--steps", "0"], r"--steps must be >= 2 \(one step leaves nothing to cache\), got 0"),
    (["--steps", "1"], r"--steps must be >= 2 .*, got 1"),
    (["--guidance-scale", "nan"], r"--guidance-scale must be a finite number >= 0 .*, got nan"),
    (["--guidance-scale", "inf"], r"--guidance-scale must be a finite number >= 0 .*, got inf"),
    (["--guidance-scale", "-1"], r"--guidance-scale must be a finite number >= 0 .*, got -1.0"),
    (["--n", "100"], r"--n 100: an interval N longer than the 48 steps after the 2 warm-up step\(s\) of 50 "
                     r"computes none of them .*use N <= 48"),
    (["--n", "3", "49"], r"--n 49: .*use N <= 48"),
    (["--steps", "10", "--n", "9"], r"--n 9: .*the 8 steps after the 2 warm-up step\(s\) of 10 .*use N <= 8"),
    (["--steps", "5"], r"--n 5 7 \(the default --n\): .*use N <= 3"),
    (["--warmup", "20", "--steps", "10"], r"--warmup 20: the warm-up and final steps together must be fewer than "
                                          r"the 10 steps \(--steps\), or nothing is cached"),
    (["--warmup", "10", "--steps", "10"], r"--warmup 10: .*fewer than the 10 steps"),
    (["--warmup", "5", "--final", "5", "--steps", "10"], r"--warmup 5 \+ --final 5: .*fewer than the 10 steps"),
    (["--final", "50"], r"--warmup 2 \+ --final 50: .*fewer than the 50 steps"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1"),
    (["--seed", str(2 ** 63 - 10), "--samples", "20"], r"--seed 9223372036854775798: sample i uses seed SEED \+ i, "
                                                        r"which must stay below 2\*\*63 \(20 samples\)"),
    (["--threads", "100000"], r"--threads 100000: more than this machine's \d+ cores"),
    (["--compute-blocks", "6"], r"--compute-blocks 6: the digits DiT has 6 blocks, so every block would be computed"),
    (["--compute-blocks", "3", "3"], r"--compute-blocks 3 3: the digits DiT has 6 blocks"),
    (["--model", "mnist", "--compute-blocks", "4", "2"], r"--compute-blocks 4 2: the mnist DiT has 6 blocks"),
    (["--state-dtype", "float8_e4m3fn"], r"--state-dtype float8_e4m3fn with --methods reuse \(a default method; "
                                         r"choose --methods\): fp8 state storage applies to closed-form methods"),
    (["--state-dtype", "float8_e4m3fn", "--methods", "taylorseer2", "rfc"],
     r"--state-dtype float8_e4m3fn with --methods rfc: fp8 state storage applies to closed-form methods"),
    (["--n", "0"], r"--n: every interval must be >= 1, got 0"),
    (["--n", "3", "-2"], r"--n: every interval must be >= 1, got -2"),
    (["--methods", "nosuch"], r"--methods: unknown harness method 'nosuch'"),
    (["--methods", "foca-bdf3"], r"--methods: unknown harness method .foca-bdf3."),
    (["--warmup", "-1"], r"--warmup must be >= 1"),
    (["--warmup", "0"], r"--warmup must be >= 1"),
    (["--final", "-1"], r"--final must be >= 0, got -1"),
    (["--threads", "-1"], r"--threads must be >= 0 \(0: torch's choice\), got -1"),
    (["--repeats", "0"], r"--repeats must be >= 1, got 0"),
    (["--compute-blocks", "-1"], r"--compute-blocks: every count must be >= 0, got -1"),
    (["--compute-blocks", "1", "1", "1"], r"--compute-blocks takes K or K J, got 3 numbers"),
    (["--sampler", "heun"], r"argument --sampler: invalid choice: 'heun'"),
    (["--granularity", "token"], r"argument --granularity: invalid choice: 'token'"),
    (["--backend", "cuda"], r"argument --backend: invalid choice: 'cuda'"),
    (["--state-dtype", "int8"], r"argument --state-dtype: invalid choice: 'int8'"),
    (["--seed", "1.5"], r"argument --seed: invalid int value: '1.5'"),
    (["--full", "--steps", "5"], r"--n 5 7 9 \(the default --n\): .*use N <= 3"),
    (["--unconditional", "--guidance-scale", "2"], r"--unconditional has no guidance; --guidance-scale 2.0"),
    (["--model", "textures"], r"--model: 'textures' is not a shipped model \(digits, mnist\); a model trained "
                              r"elsewhere needs --model-dir DIR"),
]


@pytest.mark.parametrize("argv,match", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_give_a_usage_error(argv, match, no_work, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: foca-kernels demo" in err
    assert re.search(match, err), err


def test_unwritable_out_is_refused_before_sampling(no_work, capsys, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for out, match in [(f, "is not a directory"), (f / "sub", "cannot be created"), ("/proc/foca-out", "not writable")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: foca-kernels demo" in err and f"--out {out}" in err and match in err, err


def test_good_arguments_pass_validation(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "demo", lambda args: seen.setdefault("args", args) and 0)
    argv = ["demo", "--samples", "2", "--steps", "6", "--n", "1", "5", "--methods", "fora", "taylorseer3", "foca",
            "--warmup", "1", "--final", "0", "--threads", "0", "--guidance-scale", "0", "--seed", "7",
            "--compute-blocks", "2", "3", "--out", str(tmp_path / "new" / "dir")]
    assert cli.main(argv) == 0
    assert seen["args"].samples == 2 and not (tmp_path / "new").exists()  # validation creates nothing
    # the limits themselves are accepted: N = steps - warm-up, warm-up + final = steps - 1
    for argv in (["--steps", "10", "--n", "8"], ["--steps", "10", "--warmup", "5", "--final", "4", "--n", "1"],
                 ["--steps", "2", "--warmup", "1", "--n", "1"], ["--guidance-scale", "1e6"],
                 ["--state-dtype", "float8_e4m3fn", "--methods", "taylorseer2", "foca-r7"]):
        assert cli.main(["demo", *argv, "--out", str(tmp_path / "o")]) == 0, argv


def test_methods_error_lists_every_accepted_name(no_work, capsys, tmp_path):
    """The message lists each name the harness accepts (its own table) and each alias."""
    from foca_kernels.demo.harness import METHOD_ALIASES, METHOD_NAMES, canonical_method

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--methods", "nosuch", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    listed = capsys.readouterr().err.split("expected one of", 1)[1]
    names = re.findall(r"[a-z][a-z0-9-]*", listed.replace("aliases", ""))
    assert set(METHOD_NAMES) | set(METHOD_ALIASES) <= set(names)
    for name in ("foca-calibrated", "foca-r7", "taylorseer3"):  # accepted, and once missing from the message
        assert canonical_method(name) == name and name in names


def _banner(monkeypatch, capsys, tmp_path, *argv):
    """The lines the demo prints before the harness runs (run_harness is stopped at its start)."""
    from foca_kernels.demo import harness

    def stop(cfg, model=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_harness", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    return capsys.readouterr().out


def test_help_and_banner_list_the_default_methods_alike(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    shown = re.search(r"Without options a short run: methods (.*?), N in", help_text).group(1)
    banner = _banner(monkeypatch, capsys, tmp_path)
    assert re.search(r"runs: (.*?); N in", banner).group(1) == shown
    assert "foca-calibrated" in shown and "foca," not in shown  # canonical names, as the table prints them


def test_banner_names_the_fused_op_path_that_runs(monkeypatch, capsys, tmp_path):
    from foca_kernels.ops import cpu_codegen

    monkeypatch.delenv("FOCA_KERNELS_BACKEND", raising=False)
    line = next(ln for ln in _banner(monkeypatch, capsys, tmp_path, "--backend", "torch").splitlines()
                if ln.startswith("fused ops:"))
    if cpu_codegen.status().startswith("in use"):
        assert line.startswith("fused ops: C loop, compiled with ") and "torch" not in line.split(",")[0], line
    else:
        assert line.startswith("fused ops: PyTorch ops ("), line
    monkeypatch.setenv("FOCA_KERNELS_CPU_CODEGEN", "0")
    line = next(ln for ln in _banner(monkeypatch, capsys, tmp_path, "--backend", "torch").splitlines()
                if ln.startswith("fused ops:"))
    assert line.startswith("fused ops: PyTorch ops (off"), line
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    line = next(ln for ln in _banner(monkeypatch, capsys, tmp_path, "--backend", "triton").splitlines()
                if ln.startswith("fused ops:"))
    assert line == "fused ops: Triton interpreter", line


def test_triton_on_cpu_without_the_interpreter_says_how_to_enable_it(no_work, monkeypatch, capsys, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--backend", "triton", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: foca-kernels demo" in err and "--backend triton:" in err and "TRITON_INTERPRET=1" in err, err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = {}
    monkeypatch.setattr(cli, "demo", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["demo", "--backend", "triton", "--out", str(tmp_path / "o")]) == 0  # with it: accepted


@pytest.mark.parametrize("given,expected", [([], (0, 0)), (["--compute-blocks", "1"], (1, 0)),
                                            (["--compute-blocks", "1", "2"], (1, 2))])
def test_compute_blocks_reaches_the_harness(monkeypatch, tmp_path, given, expected):
    from foca_kernels.demo import harness

    seen = {}

    def stop(cfg, model=None):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_harness", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", "--granularity", "block", *given, "--out", str(tmp_path / "o"), "--no-progress"])
    assert seen["cfg"].compute_blocks == expected and seen["cfg"].granularity == "block"
    assert seen["cfg"].cache_config("reuse", 3).compute_blocks == expected


def test_legend_names_the_steps_run_and_nothing_is_written_into_the_package(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    argv = ["demo", "--samples", "2", "--steps", "6", "--n", "3", "--methods", "steps", "--out", str(tmp_path / "o"),
            "--no-progress", "--backend", "torch", "--threads", "1"]
    pkg = Path(cli.__file__).parent
    before = {p: p.read_bytes() for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "of the 6-step compute" in text and "50-step" not in text
    after = {p: p.read_bytes() for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert after == before, "the demo wrote into the installed package"


def _model_dir(d, name="tiny", config=None):
    """The two files a model directory needs (their content is not read before sampling)."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(sample_size=8, patch_size=2, in_channels=1, num_embeds_ada_norm=10) if config is None else config
    (d / f"{name}_dit.json").write_text(json.dumps({"config": cfg}))
    (d / f"{name}_dit.safetensors").write_bytes(b"")
    return d


@pytest.fixture
def fresh_specs(monkeypatch):
    from foca_kernels.demo import specs

    monkeypatch.setattr(specs, "SPECS", dict(specs.SPECS))
    return specs


def test_bad_model_directories_give_a_usage_error(no_work, fresh_specs, capsys, tmp_path):
    _model_dir(tmp_path / "two", "a")
    _model_dir(tmp_path / "two", "b")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    _model_dir(tmp_path / "five", config=dict(sample_size=8, patch_size=2, in_channels=1, num_embeds_ada_norm=5))
    cases = [
        (["--model-dir", str(tmp_path / "nowhere")], "does not exist"),
        (["--model-dir", str(tmp_path / "file")], "is not a directory"),
        (["--model-dir", str(tmp_path / "empty")], "no <name>_dit.json in it"),
        (["--model-dir", str(tmp_path / "two")], "several models (a, b); give the name"),
        (["--model-dir", str(tmp_path / "two"), "--model", "c"], "no c_dit.json (models there: a, b)"),
        (["--model-dir", str(tmp_path / "five")], "the demo sampler needs 10 classes"),
        (["--untrained", "--model-dir", str(tmp_path / "two"), "--model", "a"], "--untrained builds the digits DiT"),
    ]
    for argv, match in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", *argv, "--out", str(tmp_path / "o")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: foca-kernels demo" in err and match in err, (argv, err)


def test_new_options_reach_the_harness(monkeypatch, fresh_specs, tmp_path):
    from foca_kernels.demo import harness

    seen = []

    def stop(cfg, model=None):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_harness", stop)
    d = _model_dir(tmp_path / "m", "tex")
    runs = [([], ("digits", None, "euler", False)),  # the defaults are unchanged
            (["--model", "mnist", "--sampler", "dpm"], ("mnist", None, "dpm", False)),
            (["--model-dir", str(d), "--unconditional"], ("tex", str(d), "euler", True)),  # the directory's only model
            (["--model-dir", str(d), "--model", "tex", "--sampler", "dpm"], ("tex", str(d), "dpm", False))]
    for argv, expected in runs:
        with pytest.raises(KeyboardInterrupt):
            cli.main(["demo", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
        cfg = seen[-1]
        assert (cfg.model, cfg.model_dir, cfg.sampler, cfg.unconditional) == expected, argv
        assert cfg.sample_options() == dict(guidance_scale=None, sampler=expected[2], unconditional=expected[3])
    assert fresh_specs.get_spec("tex").tokens == 16 and fresh_specs.get_spec("tex").directory == str(d.resolve())


def test_summary_compares_the_hooks_default_method():
    """The demo's summary line reports the paired differences of the method CacheConfig() runs."""
    from types import SimpleNamespace

    from foca_kernels.hooks import CacheConfig

    assert CacheConfig().make_method().describe() == "taylorseer(order=2)"

    def run(method, per_image):
        return SimpleNamespace(interval=5, method=method, psnr=sum(per_image) / len(per_image), rel_l2=0.01,
                               psnr_per_image=per_image)

    res = SimpleNamespace(config=SimpleNamespace(intervals=(5,)),
                          runs=[run("taylorseer2", [30.0, 31.0, 32.0]), run("foca-calibrated", [29.0, 30.5, 31.0])])
    lines = cli._summary(res)
    assert any("\n  taylorseer2 minus (paired" in line and "foca-calibrated +0.83" in line for line in lines)
