"""bench/gpu_check.py --smoke runs (CPU, tiny sizes, PyTorch backend) and its report has every
section: the GPU check is prepared for a GPU machine this suite never sees, so CI at least
proves it starts, runs its compile-first step (w) and sections a and h end to end, fails soft,
says which sections finished and writes its report; and that its plan fits the 7 minutes a cold
GPU machine gives it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

SEVEN_MINUTES = 420


def test_plan_fits_seven_minutes():
    """Phase 1 side by side plus phase 2 one at a time, every box used, fits the budget, and the
    budget plus gpu_check.sh's hard stop stay under 7 minutes."""
    assert set(gpu_check.SECTIONS) == set(gpu_check.REPORT_ORDER)
    assert set(gpu_check.PHASE1) | set(gpu_check.RUN_ORDER) == set(gpu_check.SECTIONS)
    assert not set(gpu_check.PHASE1) & set(gpu_check.RUN_ORDER)
    assert all(gpu_check.SECTIONS[k][3] == 1 for k in gpu_check.PHASE1)
    assert all(gpu_check.SECTIONS[k][3] == 2 for k in gpu_check.RUN_ORDER)
    assert gpu_check.PHASE1[0] == "w", "compile first"
    assert gpu_check.planned_seconds() + 15 <= gpu_check.DEFAULT_BUDGET_S  # + the device probe
    sh = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    hard = [int(x) for x in re.findall(r"timeout -k (\d+) (\d+)", sh)[0]]
    assert gpu_check.DEFAULT_BUDGET_S < hard[1] and sum(hard) <= SEVEN_MINUTES, hard
    assert "export TRITON_INTERPRET=0" in sh
    assert gpu_check._env_for_children()["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize("label,args", gpu_check.G_RUNS, ids=[f"g{i}" for i in range(len(gpu_check.G_RUNS))])
def test_section_g_subset_selects_tests(label, args):
    """Each pytest run of section g still selects tests (a renamed test would silently drop out)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", p.stdout)
    assert p.returncode == 0 and m and int(m.group(1)) > 0, p.stdout[-2000:] + p.stderr[-2000:]
    counts = [int(n) for n in re.findall(r"\((\d+)\)", label)]
    assert int(m.group(1)) == sum(counts), (label, m.group(0))  # the label says how many


def test_section_e_rows_exist():
    pytest.importorskip("diffusers")
    env = dict(os.environ, FOCA_E2E_MODEL="tiny", FOCA_E2E_COMPILE="1")
    code = ("import sys; sys.path.insert(0, 'bench'); import bench_e2e as b, gpu_check as g; "
            "missing = [c for c in g.E_ROWS if c not in b.CONFIGS]; "
            "compiled = [c for c in b.CONFIGS if c.endswith(('-compile', '-compile-ro'))]; "
            "print(missing, len(compiled))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == f"[] {2 * len(__import__('bench_e2e').COMPILE_ROWS)}", p.stdout


def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the smoke run uses the PyTorch backend; nothing to interpret
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert p.stdout.strip().endswith(report.strip()[-200:])  # printed as well as written
    data = json.loads((tmp_path / "report.json").read_text())
    log = (tmp_path / "sections.log").read_text()

    # the opening table: every section with its box and outcome; which finished
    assert "## Sections" in report and "| phase | box | allowed | took | outcome |" in report
    assert data["finished"] == ["w", "a", "h"], data["finished"]
    assert re.search(r"Finished: w, a, h\. Not finished or not run: b, c, d, e, f, g, i\.", report)
    for key, (title, _box, needs_cuda, _phase) in gpu_check.SECTIONS.items():
        assert f"## {title}" in report, f"section {key} missing from the report"
        sec = data["sections"][key]
        if needs_cuda:  # cannot run on the CPU: says so, does not crash
            assert sec["status"] == "skipped" and sec["markdown"] == gpu_check.SKIP_NO_CUDA, (key, sec)
            body = report.split(f"## {title}")[1].split("\n## ")[0]
            assert "skipped: no CUDA" in body

    # w: compile first, its processes side by side, before any timed section
    w = data["sections"]["w"]
    assert w["status"] == "ok", w
    parts = w["data"]["parts"]
    assert set(parts) == set(gpu_check.WARM_PARTS)
    assert parts["kernels-bf16"]["status"] == parts["kernels-fp32"]["status"] == "ok"
    assert parts["hooks"]["status"] == "skipped"  # needs CUDA
    assert [s["section"] for s in parts["kernels-fp32"]["data"]["parts"]] == ["a", "c", "h"]
    assert log.index("===== section w") < log.index("===== section a") < log.index("===== section h")

    a = data["sections"]["a"]
    assert a["status"] == "ok", a
    rows = a["data"]["rows"]
    assert len(rows) == 3 * 2 * len(gpu_check.A_METHODS) and not [r for r in rows if "error" in r], rows
    assert all(r["group"] is not None for r in rows), "StateGroup rows did not run"
    assert all(r["group_equals_per_stream"] for r in rows)
    assert "| size | dtype | method |" in report
    assert data["sections"]["h"]["status"] == "ok"
