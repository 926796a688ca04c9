"""Repository plumbing: .ci/run starts from a fresh environment, .gitignore covers what
runs leave behind, and the docs' numbers and commands match the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_run_never_reuses_a_venv(tmp_path):
    """A README whose ci block reports whether .venv already existed; a stale .venv with a marker."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(
        "<!-- ci:tests -->\n```bash\n"
        "echo \"venv-$([ -e .venv/stale ] && echo reused || echo fresh)\"\n"
        "```\n<!-- /ci:tests -->\n"
    )
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "stale").write_text("left by an earlier run")
    r = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "venv-fresh" in r.stdout and "venv-reused" not in r.stdout


def test_readme_ci_block_clears_its_venv():
    block = re.search(r"<!-- ci:tests -->(.*?)<!-- /ci:tests -->", (ROOT / "README.md").read_text("utf-8"), re.S)
    assert block and "python3 -m venv --clear .venv" in block.group(1)


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv-gpu/x", ".venv311/x", "venv2/x", "env/x", ".mypy_cache/x", ".ruff_cache/x",
    "foca-demo-out/table.md", "foca-demo-out-full/table.md", "demo-out/x.png", "grid.png", "digits-eval/x.json",
    "foca_kernels/__pycache__/api.cpython-311.pyc", ".coverage", "htmlcov/index.html", ".ipynb_checkpoints/x",
])
def test_gitignore_covers_run_leftovers(path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
    assert r.returncode == 0, f"{path} is not ignored"


def test_test_split_size_is_stated_consistently():
    pytest.importorskip("sklearn")
    from foca_kernels.demo.digits import load_digits

    n_test, n_train = len(load_digits("test")[1]), len(load_digits("train")[1])
    for f in ["docs/fidelity.md", "docs/demo-model.md", "foca_kernels/demo/digits.py"]:
        text = (ROOT / f).read_text("utf-8")
        for m in re.finditer(r"(\d[\d,]*) (?:held-out )?(test|training) (?:images|digits)|\((\d+) images\)", text):
            n = int((m.group(1) or m.group(3)).replace(",", ""))
            assert n in (n_test, n_train, 1797), f"{f}: {m.group(0)!r} but the split has {n_train} / {n_test}"
    assert (n_train, n_test) == (1438, 359)


def test_documented_grid_command_does_not_write_into_the_package():
    """demo.train writes its meta JSON into --out (default: the package assets). Evaluation-only
    commands (--skip-dit) must name another --out; the plain training command re-makes the
    shipped weights from a source checkout and says so."""
    text = (ROOT / "docs" / "demo-model.md").read_text("utf-8")
    cmds = [c for c in re.findall(r"python -m foca_kernels\.demo\.train[^`\n]*", text) if "--skip-dit" in c]
    assert cmds
    for cmd in cmds:
        assert "--out " in cmd, f"docs/demo-model.md runs {cmd!r} without --out: it rewrites the shipped assets"
