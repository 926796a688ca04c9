"""pytest set-up for the kernel benchmarks in this directory.

    python -m pytest bench -p no:cacheprovider

* collects ``bench_*.py`` here (pytest's default ``python_files`` only knows ``test_*.py``);
* benchmarks run on CUDA when it is available (the fused path is then the Triton kernel), else
  on CPU (the fused PyTorch path; never the Triton interpreter);
* prints, after pytest-benchmark's own tables, one markdown table of every benchmark with its
  effective bandwidth and its speed relative to a plain copy of the same bytes.

Environment (see docs/benchmarks.md):
  FOCA_BENCH_THREADS=N  torch's CPU thread count. On a shared, loaded machine 1 thread gives
                        far steadier numbers: an OpenMP op waits for its slowest thread, and a
                        thread that loses its core stalls the op for a scheduler slice.
  FOCA_BENCH_VIDEO=1    adds the ~100k-token video size (1.2 GB per fp32 tensor); on by default
                        on a CUDA device with >= 40 GiB, =0 turns it off there.
  FOCA_BENCH_DTYPES     comma-separated dtypes, default "bf16,fp32" (also: fp16).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys

import pytest

if importlib.util.find_spec("foca_kernels") is None:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("FOCA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FOCA_BENCH_THREADS"]))
ROWS: list = []  # one dict per finished benchmark, for the summary table


def pytest_configure(config):
    if DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise pytest.UsageError("TRITON_INTERPRET=1 would time the Triton interpreter: unset it for benchmarks")


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None  # already collected through python_files
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def foca_bench_rows():
    """Rows for the summary table printed at the end of the session."""
    return ROWS


def device_description() -> str:
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name(DEVICE)} (Triton kernel)"
    return f"CPU, {torch.get_num_threads()} threads (fused PyTorch path)"


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("foca-kernels benchmark summary")
    tr.write_line(f"device: {device_description()}, torch {torch.__version__}")
    tr.write_line("floor = a plain copy reading and writing the same bytes as the fused launch; "
                  "fraction of floor = floor time / time; x floor = time / floor time; "
                  "GB/s and floor columns use the fastest round (min); faults/call = host page faults")
    tr.write_line("")
    tr.write_line("| operation | size | dtype | provider | min | median | GB/s | fraction of floor | x floor "
                  "| faults/call |")
    tr.write_line("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in ROWS:
        tr.write_line(
            f"| {r['op']} | {r['size']} | {r['dtype']} | {r['provider']} | {_fmt_time(r['min_s'])} | "
            f"{_fmt_time(r['median_s'])} | "
            f"{r['gb_per_s']:.1f} | {r['fraction_of_copy_floor']:.3f} | {1 / r['fraction_of_copy_floor']:.1f} | "
            f"{r['page_faults_per_call']:.0f} |"
        )
