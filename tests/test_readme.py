"""Every code block of README.md runs as written.

Each Python block is executed as it stands, in a namespace of its own: nothing is supplied to
it (the diffusers block builds its own small pipeline). A block is skipped only when one of the
optional dependencies it imports is missing, and never in CI (``CI`` set), which installs them
all. Bash blocks install packages (CI runs the ci:tests block itself, see .ci/run); here their
``foca-kernels`` commands must parse and their extras must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
CORE = {"torch", "triton", "numpy", "foca_kernels"}  # installed with the package: never a reason to skip


def test_readme_has_the_blocks_this_test_knows():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") == 2 and langs.count("bash") == 2, langs
    assert "enable_cache(pipe" in PYTHON[1]


def _run(i: int) -> dict:
    ns = {"__name__": f"readme_block_{i + 1}"}
    try:
        exec(compile(PYTHON[i], f"README.md (python block {i + 1})", "exec"), ns)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if os.environ.get("CI") or top in CORE:
            raise
        pytest.skip(f"README python block {i + 1} needs the optional dependency {top!r}")
    return ns


def test_api_block_runs_as_written():
    ns = _run(0)
    assert isinstance(ns["out"], torch.Tensor) and torch.isfinite(ns["out"].float()).all()
    assert ns["state"].nbytes > 0 and ns["state"].n_full == 0  # reset() ran last
    assert len(ns["outs"]) == 4 and all(torch.isfinite(o.float()).all() for o in ns["outs"])


def test_diffusers_block_runs_as_written(capsys):
    ns = _run(1)
    pipe = ns["pipe"]
    assert ns["image"].size == (8, 8)  # a PIL image from the pipeline
    assert int(capsys.readouterr().out.strip()) > 0  # cache_info(pipe).state_bytes was printed
    assert not hasattr(pipe.transformer, "_foca_cache")  # disable_cache ran


def test_bash_blocks_name_real_commands_and_extras():
    from foca_kernels.cli import _parser

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["optional-dependencies"])
    seen = 0
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            for cmd in line.split("&&"):
                words = shlex.split(cmd)
                if words[:1] == ["foca-kernels"]:
                    _parser().parse_args(words[1:])  # exits (SystemExit) on a bad command
                    seen += 1
                for w in words:
                    m = re.fullmatch(r"\.?\[([\w,]+)\]", w.lstrip("-e").strip('"'))
                    if m:
                        assert set(m.group(1).split(",")) <= extras, f"README installs unknown extras {w}"
                        seen += 1
    assert seen >= 3
