"""Every code block of README.md runs as written.

Python blocks are executed in order in one namespace. The diffusers block uses a pipeline the
reader already has: the test supplies ``pipe`` (a tiny random-weight DiT behind a pipeline-like
object: ``components``, a scheduler, ``__call__(prompt, num_inference_steps)``) and ``prompt``,
and nothing else. Bash blocks install packages (CI runs the ci:tests block itself, see
.ci/run); here their ``foca-kernels`` commands must parse and their extras must exist.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _tiny_pipe():
    diffusers = pytest.importorskip("diffusers")
    from hooks_tiny import dit

    class Pipe:
        """Stand-in for a diffusers pipeline: a transformer, a scheduler, a sampling loop."""

        def __init__(self):
            self.transformer = dit()
            self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
            self.components = {"transformer": self.transformer, "scheduler": self.scheduler}

        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps=50):
            self.scheduler.set_timesteps(num_inference_steps)
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            label = torch.tensor([len(prompt) % 10])
            for t in self.scheduler.timesteps:
                v = self.transformer(x, timestep=t.expand(1), class_labels=label).sample
                x = self.scheduler.step(v, t, x).prev_sample
            return SimpleNamespace(images=[x[0]])

    return Pipe()


def test_readme_has_the_blocks_this_test_knows():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") == 2 and langs.count("bash") == 2, langs


def test_python_blocks_run(capsys):
    ns = {"pipe": _tiny_pipe(), "prompt": "a handwritten seven"}
    for lang, code in BLOCKS:
        if lang == "python":
            exec(compile(code, "README.md", "exec"), ns)
    assert isinstance(ns["out"], torch.Tensor) and torch.isfinite(ns["out"].float()).all()
    assert ns["state"].nbytes > 0 and ns["image"].shape == (4, 8, 8)
    assert int(capsys.readouterr().out.strip()) > 0  # cache_info(pipe).state_bytes was printed
    assert not hasattr(ns["pipe"].transformer, "_foca_cache")  # disable_cache ran


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
