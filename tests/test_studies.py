"""The studies (studies/*.py) run as written: each is started as a script, the way its docstring
says, on the shipped digits DiT with a few samples and steps, and its own built-in check holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
SMALL = ["--model", "digits", "--samples", "2", "--steps", "10", "--intervals", "3", "--threads", "1"]


def run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # as a user runs it: the package installed, nothing else on the path
    r = subprocess.run([sys.executable, str(STUDIES / script), *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def rows(markdown: str) -> dict:
    """{first cell: [other cells]} of the markdown table rows in ``markdown``."""
    out = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("-"):
            out[cells[0]] = cells[1:]
    return out


@pytest.mark.slow
def test_duca_study_fresh_ratio_zero_is_reuse():
    """DuCa recomputing no token on its conservative steps is reuse, bit for bit (the study's check)."""
    table = rows(run("duca_study.py", *SMALL, "--variants", "reuse", "fresh 0", "duca"))
    assert table["fresh 0"][0].split()[0] == table["reuse"][0]
    assert re.fullmatch(r"\d+\.\d\d \(0\.00\)", table["fresh 0"][0]), table
    assert re.fullmatch(r"\d+\.\d\d \(0\.\d\d\)", table["duca"][0]), table


@pytest.mark.slow
def test_curvature_study_mix_zero_is_taylorseer2():
    """mix:0 (a weighted sum of the package's forecasts, weight 0 on r7) is TaylorSeer-2 exactly."""
    out = run("curvature_study.py", *SMALL, "--methods", "ts2", "mix:0", "blend:0.5")
    line = next(ln for ln in out.splitlines() if " mix:0 " in ln)
    assert "- ts2 +0.00 [+0.00, +0.00]" in line, out


def test_study_readings_names_how_to_find_the_oracle(tmp_path):
    """reference/ is not installed: run from elsewhere without it, the study says how to run it."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, str(STUDIES / "study_readings.py")], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    if r.returncode == 0:
        pytest.skip("reference/ is importable here (an older install put it in site-packages)")
    assert "PYTHONPATH=. python studies/study_readings.py" in r.stderr, r.stderr[-2000:]


def test_bench_holds_only_benchmarks():
    """bench/ is the pytest benchmarks, bytes_moved.py and the GPU check; studies go to studies/."""
    allowed = {"conftest.py", "bytes_moved.py", "gpu_check.py", "gpu_check.sh"}
    files = [p.name for p in (ROOT / "bench").iterdir() if p.is_file() and p.suffix in (".py", ".sh")]
    assert "bench_kernels.py" in files
    stray = [f for f in files if f not in allowed and not (f.startswith("bench_") and f.endswith(".py"))]
    assert not stray, f"not benchmarks (studies/ is the place for one-off studies): {stray}"
