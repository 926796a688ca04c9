"""bench/gpu_check.py --smoke runs (CPU, tiny sizes, PyTorch backend) and its report has every
section: the GPU check is prepared for a GPU machine this suite never sees, so CI at least
proves it starts, runs section a end to end, fails soft and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402


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
    assert (tmp_path / "sections.log").exists()

    for key, (title, _box, needs_cuda) in gpu_check.SECTIONS.items():
        assert f"## {title}" in report, f"section {key} missing from the report"
        sec = data["sections"][key]
        if needs_cuda:  # cannot run on the CPU: says so, does not crash
            assert sec["status"] == "skipped" and sec["markdown"] == gpu_check.SKIP_NO_CUDA, (key, sec)
            body = report.split(f"## {title}")[1].split("\n## ")[0]
            assert "skipped: no CUDA" in body
    a = data["sections"]["a"]
    assert a["status"] == "ok", a
    rows = a["data"]["rows"]
    assert len(rows) == 3 * 2 * len(gpu_check.A_METHODS) and not [r for r in rows if "error" in r], rows
    assert all(r["group"] is not None for r in rows), "StateGroup rows did not run"
    assert all(r["group_equals_per_stream"] for r in rows)
    assert "| size | dtype | method |" in report
