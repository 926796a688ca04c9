"""One prepared GPU check: everything this repository wants measured on one H100/H200, in one
command that ends inside 7 minutes on a fresh (cold) machine and prints one markdown report.

    bash bench/gpu_check.sh                 # on the GPU machine (picks the Python, see there)
    python bench/gpu_check.py               # the same, with this Python
    python bench/gpu_check.py --smoke       # tiny sizes on the CPU, seconds (CI: tests/test_gpu_check_smoke.py)
    python bench/gpu_check.py --sections a,c --budget 200
    python bench/gpu_check.py --plan        # the sections, their phases and time boxes; runs nothing

The report (``report.md``), every number (``report.json``) and the sections' combined output
(``sections.log``) go to ``$OUT`` if set (the device tool's output folder), else
``./gpu-check-out/`` (``--out`` overrides both). The report opens with a table of every section:
its time box, the seconds it took and whether it finished.

Each section runs in a child process with its own time box, so a crash, an out-of-memory or a
poisoned CUDA context in one section cannot take the others down; a failing section prints its
error and the check goes on. Every child gets TRITON_INTERPRET=0 (tests/conftest.py would
otherwise switch the interpreter on for the pytest runs). The check runs in two phases:

Phase 1, untimed work, in parallel (nothing in it is a speed figure):
  w  compile first: every Triton kernel specialisation the timed sections launch, so that the
     first use of a kernel (about 1 s of compilation each, tens of seconds per section on a
     cold machine) falls here and not in a timed section's box. Three processes side by side:
     sections a, c and h's launches at their real sizes in bf16 and in fp32 (two streams per
     case instead of 56 or 114: the same specialisations), and the hooks' launches of the
     models b, d and e time (one cached generation of each configuration). Timed per part and
     reported; the compiled kernels land in Triton's on-disk cache, which the later processes
     read.
  f  bf16 rounding under ``torch.compile`` (inductor): a compiled ``forecast_`` against the
     eager one, and a compiled cached tiny bf16 DiT against the eager cached one, step by
     step (bit-identical, or the largest difference in bf16 ulps), with the uncached model
     compiled the same way as the yardstick
  g  a representative subset of the repository's CUDA tests, with TRITON_INTERPRET=0 (the
     whole suite does not fit: see G_RUNS for which tests and what is left out)

Phase 2, timed, one section at a time on an otherwise idle machine, in the order a h c d b e i.
A section may use the time earlier sections left unused, never the boxes of the sections
after it:
  a  grouped skipped-step kernel (``foca_kernels.StateGroup(...).forecast_``) against a
     device-to-device copy of the same bytes, and against one ``forecast_`` per stream, at
     DiT-XL/2 (56 streams of [2, 256, 1152]), FLUX (114 streams of [1, 4608, 3072]; fewer if
     memory is short, and the report says so) and 100k-token video (4 streams of
     [1, 100000, 3072]) sizes, bf16 and fp32, FoCa (default reading calibrated, and r7),
     TaylorSeer-2, reuse
  h  the default reading's full step (``update_``: the feature copy plus the calibrated fit, two
     Triton kernels and a small sum) against r7's full step and a device copy of the fit's
     floor, one stream at DiT-XL/2 and FLUX sizes, bf16 and fp32
  c  CUDA-graph replay of a skipped step (``group.cuda_graph()``) against the eager grouped
     forecast at DiT-XL/2 size: time per call (device and host), and bit-identical outputs
     over three F s s s s windows with unequal steps
  d  ``torch.cuda.set_sync_debug_mode`` around the skipped steps of a cached 50-step
     generation of a tiny diffusers DiT (``enable_cache(model, interval=5)``): every sync,
     with the Python line that made it, against the uncached model on the same steps
  b  host time per skipped step and per full step through the hooks against diffusers'
     TaylorSeer hook: ``bench/bench_host.py`` (pytest -k host) on CUDA, its two tables and
     the target line
  e  end to end at DiT-XL/2 size with random weights: ``bench/bench_e2e.py`` with
     FOCA_E2E_MODEL=dit-xl2, rows uncached / fk-foca-N5 / fk-foca-N5-block /
     fk-foca-N5-block-F1 / diffusers-taylorseer2-N5 / cachedit-foca-N5 (if installed), two
     passes, every generation marked new and every pass required to repeat the first
  i  end to end under ``torch.compile`` at DiT-XL/2 size: ``bench/bench_e2e.py`` with
     FOCA_E2E_COMPILE=default,reduce-overhead (the model compiled whole, uncached and cached:
     ours module and block level, diffusers' TaylorSeer hook, cache-dit), one timed pass after
     each row's compile generation, compile time reported; rows run in priority order and a
     row that would not fit in the box, or cannot compile, says why in the report

Sections that need CUDA report "skipped: no CUDA" on a machine without one; ``--smoke`` runs
sections w, a and h at tiny sizes with the PyTorch backend on the CPU. Nothing is downloaded:
the check needs torch (+ triton on CUDA) and, for b, d, e and i, diffusers (cache-dit
optional); what is missing is reported per section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

SKIP_NO_CUDA = "skipped: no CUDA"


class Skip(Exception):
    """A section (or a part of one) that cannot run here; the message says why."""


# ---- section registry --------------------------------------------------------------------
# key: (title, time box in seconds, needs CUDA, phase). The boxes are sized from the first cold
# run on an H200 (docs/benchmarks.md, "GPU check"): there b (bench_host), f and g hit boxes of
# 44, 70 and 90 s because each compiled its kernels on first use; `pytest tests -m cuda` did
# not finish in 60 s and tests/test_group.py not in 21 s. Phase 1 runs its sections side by
# side, so its length is its longest box; phase 2 runs one section at a time.
SECTIONS: Dict[str, Tuple[str, int, bool, int]] = {
    "w": ("w. Compile first: the Triton specialisations of the timed sections", 90, False, 1),
    "a": ("a. Grouped skipped-step kernel vs device-to-device copy", 35, False, 2),
    "b": ("b. Host time per skipped and per full step: hooks vs diffusers' TaylorSeer hook", 40, True, 2),
    "c": ("c. CUDA-graph replay of a skipped step", 15, True, 2),
    "d": ("d. Host-device syncs in the skipped steps of a cached generation", 15, True, 2),
    "e": ("e. End to end at DiT-XL/2 size (random weights)", 55, True, 2),
    "f": ("f. bf16 rounding under torch.compile", 100, True, 1),
    "g": ("g. The repository's CUDA tests (a representative subset)", 100, True, 1),
    "h": ("h. The default's full step: the calibrated fit vs r7's full step", 15, False, 2),
    "i": ("i. End to end under torch.compile at DiT-XL/2 size", 95, True, 2),
}
PHASE1 = "wfg"  # side by side, first (untimed work)
RUN_ORDER = "ahcdbei"  # phase 2, one at a time; the report is printed in w, a..i order
DEFAULT_BUDGET_S = 400  # the whole check; bench/gpu_check.sh adds a hard limit a little above it
MIN_SECTION_S = 10  # no section starts with less than this left
WARM_PARTS = ("kernels-bf16", "kernels-fp32", "hooks")  # section w's processes


def phase1_box(wanted: str) -> int:
    return max([SECTIONS[k][1] for k in PHASE1 if k in wanted] or [0])


def planned_seconds(wanted: str = "wabcdefghi") -> int:
    """The check's length if every wanted section used its whole box (phase 1 side by side)."""
    return phase1_box(wanted) + sum(SECTIONS[k][1] for k in RUN_ORDER if k in wanted)


# ---- small helpers -------------------------------------------------------------------------
def _fmt_t(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def _env_for_children() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The compiled kernels, never the interpreter: tests/conftest.py sets TRITON_INTERPRET=1
    # when the variable is unset, and the benchmarks refuse it on CUDA.
    env["TRITON_INTERPRET"] = "0"
    return env


class Job:
    """A command in its own process session, its output in a temporary file (so that several
    can run side by side without one filling a pipe). ``finish`` waits until ``deadline``
    (time.monotonic()) and then kills the whole session, grandchildren too (a pytest run under
    a section), so nothing left behind holds the GPU or the output."""

    def __init__(self, cmd: List[str], env: Dict[str, str], deadline: float):
        self.deadline = deadline
        self.t0 = time.monotonic()
        self.out = tempfile.TemporaryFile(mode="w+", errors="replace")
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.rc: Optional[int] = None
        self.timed_out = False
        self.seconds = 0.0

    def poll(self) -> bool:
        """True once the job has ended (by itself, or killed at its deadline)."""
        if self.p.poll() is not None:
            self.rc, self.seconds = self.p.returncode, self.seconds or time.monotonic() - self.t0
            return True
        if time.monotonic() >= self.deadline:
            import signal

            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()
            self.timed_out, self.rc, self.seconds = True, None, time.monotonic() - self.t0
            return True
        return False

    def output(self) -> str:
        self.out.seek(0)
        text = self.out.read()
        if self.timed_out:
            text += f"\n[gpu_check] killed after {self.seconds:.0f} s (its time box)"
        return text


def _finish_all(jobs: List[Job]) -> None:
    while not all([j.poll() for j in jobs]):
        time.sleep(0.2)


def _run(cmd: List[str], timeout: float, env: Dict[str, str]) -> Tuple[Optional[int], str]:
    """(exit code or None on timeout, stdout + stderr) of one command, killed at ``timeout``."""
    job = Job(cmd, env, time.monotonic() + max(1.0, timeout))
    _finish_all([job])
    return job.rc, job.output()


class Ctx:
    """What a section gets: the device, smoke mode, and its deadline (time.monotonic())."""

    def __init__(self, smoke: bool, deadline: float, cpu_dry: bool = False, warm: bool = False, dtypes=None):
        import torch

        self.smoke = smoke
        self.cpu_dry = cpu_dry  # developer mode: run CUDA sections' code on the CPU where it can
        self.warm = warm  # section w: run a section's launches once each, time nothing
        self.dtypes = dtypes  # section w: only these dtypes (None: the section's own list)
        self.deadline = deadline
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if not self.cuda:  # a shared CPU: one thread gives steady numbers (docs/benchmarks.md)
            torch.set_num_threads(1)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need_cuda(self):
        if not self.cuda and not self.cpu_dry:
            raise Skip(SKIP_NO_CUDA)

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _time_rounds(ctx: Ctx, fn: Callable, k: int, rounds: int, prepare: Optional[Callable] = None,
                 budget_s: float = 5.0) -> Dict[str, float]:
    """Per-call device time of ``fn`` (k calls back to back between CUDA events; perf_counter
    on the CPU) and host time per call (perf_counter around the k calls, no sync), over
    ``rounds`` rounds (fewer if ``budget_s`` runs out after 3). ``prepare`` runs untimed
    before each round (e.g. a full step, so that each round is the same k skipped steps)."""
    import torch

    if prepare is not None:
        prepare()
    fn()  # warm-up (Triton compiles on its first launch, if section w has not)
    ctx.sync()
    if ctx.warm:  # section w: the launches happened, nothing is timed
        return {"min_s": float("nan"), "median_s": float("nan"), "host_median_s": float("nan"), "rounds": 0,
                "calls_per_round": k}
    dev, host = [], []
    t_end = time.monotonic() + budget_s
    for r in range(rounds):
        if prepare is not None:
            prepare()
        ctx.sync()
        if ctx.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            h0 = time.perf_counter()
            for _ in range(k):
                fn()
            h1 = time.perf_counter()
            e1.record()
            e1.synchronize()
            dev.append(e0.elapsed_time(e1) / 1e3 / k)
        else:
            h0 = time.perf_counter()
            for _ in range(k):
                fn()
            h1 = time.perf_counter()
            dev.append((h1 - h0) / k)
        host.append((h1 - h0) / k)
        if r >= 2 and time.monotonic() > t_end:
            break
    return {"min_s": min(dev), "median_s": statistics.median(dev), "host_median_s": statistics.median(host),
            "rounds": len(dev), "calls_per_round": k}


def _group_cls():
    import foca_kernels as fk

    return getattr(fk, "StateGroup", None)


NO_GRAPH = "n/a: StateGroup has no cuda_graph() in this checkout"


class _WarmDone(Exception):
    """Section w: the rest of this case launches nothing new."""
NO_GROUP = "n/a: foca_kernels.StateGroup does not exist in this checkout (foca_kernels/group.py: merge main)"


# ---- a. grouped kernel vs copy ---------------------------------------------------------------
A_METHODS = [("foca (default: calibrated)", "foca", {}), ("foca r7", "foca", {"reading": "r7"}),
             ("taylorseer-2", "taylorseer", {"order": 2}), ("reuse", "reuse", {})]


def _a_sizes(ctx: Ctx):
    if ctx.smoke or not ctx.cuda:
        return [("dit-xl2 (smoke: 4 x [2,16,32])", 4, (2, 16, 32)), ("flux (smoke: 3 x [1,64,48])", 3, (1, 64, 48)),
                ("video (smoke: 2 x [1,256,48])", 2, (1, 256, 48))]
    return [("dit-xl2-256px: 56 x [2,256,1152]", 56, (2, 256, 1152)),
            ("flux-1024px: 114 x [1,4608,3072]", 114, (1, 4608, 3072)),
            ("video-100k: 4 x [1,100000,3072]", 4, (1, 100000, 3072))]


def _skip_tensors_moved(state) -> int:
    t = state.t + 1.0
    return state.plan(state.method.skip(state.context(t)), t).tensors_moved


def _drive(fk, states, feats, n_full: int, h: float = 1.0, start: int = 0):
    for i in range(n_full):
        f = feats[(start + i) % len(feats)]
        for st in states:
            fk.update_(st, f, h)


def _release(*lists: list) -> None:
    """Drop the tensors held in `lists` (emptied in place: the timed closures above share them)."""
    for items in lists:
        items.clear()


def _a_case(ctx: Ctx, fk, name, n_req, shape, dtype, method, opts, copy_cache: dict, case_budget: float) -> dict:
    import torch

    dev = ctx.device
    numel = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
    feats = [(base * (1.0 + 0.1 * i)).to(dtype) for i in range(3)]
    del base
    probe = fk.allocate(feats[0], method, **opts)
    _drive(fk, [probe], feats, 4)
    moved = _skip_tensors_moved(probe)
    per_stream = probe.nbytes + numel * esize  # state + out
    del probe
    n, note = (min(n_req, 2), "warm-up: 2 streams") if ctx.warm else (n_req, "")
    if ctx.cuda:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        need_per = per_stream + moved * numel * esize  # + the copy floor's src and dst
        if n * need_per > 0.85 * free:
            n = max(1, int(0.85 * free // need_per))
            note = f"{n} of {n_req} streams: {free / 2**30:.0f} GiB free"
    states = [fk.allocate(feats[0], method, **opts) for _ in range(n)]
    outs = [torch.empty(shape, device=dev, dtype=dtype) for _ in range(n)]
    _drive(fk, states, feats, 4)
    nbytes = moved * numel * esize * n
    k = 4  # the skipped steps of one N=5 window
    rounds = 3 if ctx.smoke else 10 if nbytes > 2**30 else 25
    count = [0]

    def prepare():  # one full step for every stream: each round is the same 4 skipped steps
        _drive(fk, states, feats, 1, start=count[0])
        count[0] += 1

    row = {"size": name, "dtype": str(dtype).replace("torch.", ""),
           "method": method if not opts else f"{method} {opts}", "label": None, "streams": n,
           "streams_requested": n_req, "note": note, "bytes_per_call": nbytes,
           "tensors_moved_per_stream": moved}
    budget = max(1.0, case_budget / 3)

    def loop():
        for st, o in zip(states, outs):
            fk.forecast_(st, o, 1.0)

    row["per_stream"] = _time_rounds(ctx, loop, k, rounds, prepare, budget)
    Group = _group_cls()
    if Group is None:
        row["group"] = None
        row["group_error"] = NO_GROUP
    else:
        try:
            group = Group(states, outs)
            row["group"] = _time_rounds(ctx, lambda: group.forecast_(1.0), k, rounds, prepare, budget)
            if ctx.warm:  # the check below launches the same specialisations
                raise _WarmDone
            # the grouped forecast equals the per-stream one: two fresh pairs of states with
            # the same history, one pair forecast through a group, the other stream by stream
            pair_g = [fk.allocate(feats[0], method, **opts) for _ in range(2)]
            pair_s = [fk.allocate(feats[0], method, **opts) for _ in range(2)]
            _drive(fk, pair_g + pair_s, feats, 4)
            out_g = [torch.empty_like(feats[0]) for _ in pair_g]
            out_s = [torch.empty_like(feats[0]) for _ in pair_s]
            Group(pair_g, out_g).forecast_(1.0)
            for st, o in zip(pair_s, out_s):
                fk.forecast_(st, o, 1.0)
            row["group_equals_per_stream"] = all(torch.equal(a, b) for a, b in zip(out_g, out_s))
        except _WarmDone:
            pass
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["group"] = None
            row["group_error"] = _err(e)
    if ctx.warm:  # a copy compiles nothing
        _release(states, outs, feats)
        return row
    key = nbytes
    if key not in copy_cache:
        src = torch.ones(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.zeros_like(src)
        copy_cache.clear()
        copy_cache[key] = _time_rounds(ctx, lambda: dst.copy_(src), k, rounds, None, budget)
        del src, dst
    row["copy"] = copy_cache[key]
    _release(states, outs, feats)
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


def section_a(ctx: Ctx):
    import torch

    import foca_kernels as fk

    if not ctx.cuda:
        fk.set_backend("torch")
    dtypes = ctx.dtypes or [torch.bfloat16, torch.float32]
    cases = [(s, d, m) for s in _a_sizes(ctx) for d in dtypes for m in A_METHODS]
    rows, copy_cache = [], {}
    for i, ((name, n, shape), dtype, (label, method, opts)) in enumerate(cases):
        left = ctx.left() - 3
        if left < 2:
            rows.append({"size": name, "dtype": str(dtype).replace("torch.", ""), "label": label,
                         "error": "not run: the section's time box was spent"})
            continue
        try:
            row = _a_case(ctx, fk, name, n, shape, dtype, method, opts, copy_cache, left / (len(cases) - i))
        except Exception as e:  # noqa: BLE001 - one case failing does not stop the others
            row = {"size": name, "dtype": str(dtype).replace("torch.", ""), "error": _err(e)}
            if ctx.cuda:
                torch.cuda.empty_cache()
        row["label"] = label
        rows.append(row)

    if ctx.warm:
        return f"{len(rows)} cases launched", {"rows": rows}
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["size"], r["dtype"], r["label"], "-", "error", r["error"], "", "", "", "", ""])
            continue
        c, p, gr = r["copy"]["min_s"], r["per_stream"]["min_s"], r.get("group")
        gb = r["bytes_per_call"] / 1e9
        gtxt = _fmt_t(gr["min_s"]) if gr else ("n/a (no StateGroup)" if r.get("group_error") == NO_GROUP
                                                else "error: " + r.get("group_error", "?"))
        table.append([
            r["size"], r["dtype"], r["label"], f"{r['streams']}" + (f" ({r['note']})" if r["note"] else ""),
            f"{r['bytes_per_call'] / 2**20:.1f}", gtxt,
            f"{gb / gr['min_s']:.3g}" if gr else "n/a", f"{c / gr['min_s']:.2f}" if gr else "n/a",
            _fmt_t(p), f"{c / p:.3f}", _fmt_t(c),
        ])
    md = [
        "Per skipped step (a call forecasts every stream once), fastest round; 4 calls per round, each round after",
        "one untimed full step of every stream. Bytes = the launch's tensors moved (reads + writes) x streams;",
        "GB/s = bytes / time; fraction of floor = copy time / time (1.0 = as fast as copying those bytes);",
        "per-stream = one `forecast_` per stream (a launch each). Backend: "
        + ("the Triton kernel" if ctx.cuda else "the fused PyTorch path (CPU smoke run: not a GPU figure)") + ".",
        "",
        _table(["size", "dtype", "method", "streams", "MiB / call", "grouped", "grouped GB/s", "grouped / floor",
                "per-stream loop", "per-stream / floor", "copy floor"], table),
    ]
    if any(r.get("group_error") == NO_GROUP for r in rows):
        md += ["", NO_GROUP + "."]
    eq = [r for r in rows if "group_equals_per_stream" in r]
    if eq:
        bad = [f"{r['size']} {r['dtype']} {r['label']}" for r in eq if not r["group_equals_per_stream"]]
        md.append("")
        md.append("grouped forecast == per-stream forecast (bitwise, two streams checked per case): "
                  + ("yes, every case" if not bad else "NO for " + "; ".join(bad)))
    return "\n".join(md), {"rows": rows}


# ---- c. CUDA graph ---------------------------------------------------------------------------
def section_c(ctx: Ctx):
    import torch

    import foca_kernels as fk

    ctx.need_cuda()
    Group = _group_cls()
    if Group is None:
        raise Skip(NO_GROUP)
    n, shape = (56, (2, 256, 1152)) if ctx.cuda else (4, (2, 16, 32))
    if ctx.warm:
        n = 2
    lines, data = [], {"streams": n, "shape": list(shape), "cases": []}
    hs = [1.0, 0.75, 1.25, 1.0]  # unequal steps: the coefficients change every call
    for dtype in ctx.dtypes or (torch.bfloat16, torch.float32):
        case = {"dtype": str(dtype)}
        data["cases"].append(case)
        try:
            g = torch.Generator(device=ctx.device).manual_seed(0)
            feats = [torch.randn(shape, generator=g, device=ctx.device).to(dtype) for _ in range(3)]

            def build():
                sts = [fk.allocate(feats[0], "foca") for _ in range(n)]
                outs = [torch.empty(shape, device=ctx.device, dtype=dtype) for _ in range(n)]
                _drive(fk, sts, feats, 2)
                return sts, outs, Group(sts, outs)

            sa, oa, ga = build()
            sb, ob, gb = build()
            if not hasattr(gb, "cuda_graph"):
                data["no_graph"] = NO_GRAPH
                graphed = None
            else:  # section w: the eager launches only (a capture replays what they compiled)
                graphed = gb.cuda_graph() if ctx.cuda and not ctx.warm else gb.forecast_
            mismatches, compared = [], 0
            for w in range(3 if graphed is not None else 0):  # windows F s s s s
                _drive(fk, sa, feats, 1, start=w)
                _drive(fk, sb, feats, 1, start=w)
                for j, h in enumerate(hs):
                    ga.forecast_(h)
                    got = graphed(h)
                    ctx.sync()
                    if isinstance(got, (list, tuple)) and len(got) == n and all(torch.is_tensor(t) for t in got):
                        ob_now = list(got)  # what the replay hands back (the contract: the outs themselves)
                    else:
                        ob_now = ob
                    for i, (x, y) in enumerate(zip(oa, ob_now)):
                        compared += 1
                        if not torch.equal(x, y):
                            mismatches.append((w, j, i, float((x.float() - y.float()).abs().max())))
            case["bit_identical"] = not mismatches
            case["compared"] = compared
            case["mismatches"] = mismatches[:10]
            if ctx.warm:
                continue
            cnt = [0]

            def prep_a():
                _drive(fk, sa, feats, 1, start=cnt[0])
                cnt[0] += 1

            def prep_b():
                _drive(fk, sb, feats, 1, start=cnt[0])
                cnt[0] += 1

            budget = max(1.0, (ctx.left() - 3) / 6)
            case["eager"] = _time_rounds(ctx, lambda: ga.forecast_(1.0), 4, 30, prep_a, budget)
            if graphed is not None:
                case["graph"] = _time_rounds(ctx, lambda: graphed(1.0), 4, 30, prep_b, budget)

            def loop():
                for st, o in zip(sa, oa):
                    fk.forecast_(st, o, 1.0)

            case["per_stream"] = _time_rounds(ctx, loop, 4, 30, prep_a, budget)
        except Exception as e:  # noqa: BLE001
            case["error"] = _err(e)
            case["traceback"] = traceback.format_exc()[-2000:]
    rows = []
    for c in data["cases"]:
        if "error" in c:
            rows.append([c["dtype"], "error: " + c["error"], "", "", "", ""])
            continue
        if ctx.warm:
            continue
        for kind in ("graph", "eager", "per_stream"):
            t = c.get(kind)
            if t is None:
                rows.append([c["dtype"], "graphed(h)", NO_GRAPH, "", "", ""])
                continue
            rows.append([c["dtype"], {"graph": "graphed(h) (CUDA graph replay)", "eager": "group.forecast_(h)",
                                      "per_stream": "forecast_ per stream"}[kind],
                         _fmt_t(t["min_s"]), _fmt_t(t["median_s"]), _fmt_t(t["host_median_s"]),
                         ("yes" if c["bit_identical"] else f"NO ({len(c['mismatches'])}+ outputs differ)")
                         if kind == "graph" else ""])
    if ctx.warm:
        return f"{len(data['cases'])} cases launched", data
    lines.append(f"{n} streams of {list(shape)}, FoCa (default reading); per call = one skipped step of all streams;"
                 " device time between CUDA events over 4 back-to-back calls, host time = time for the calls to"
                 " return.")
    if not ctx.cuda:
        lines.append("(CPU dry run: `graphed` is the eager group here; not a GPU figure)")
    lines.append("")
    lines.append(_table(["dtype", "what", "device min / call", "device median / call", "host median / call",
                         "bit-identical to eager group (3 windows x 4 skips, unequal h)"], rows))
    for c in data["cases"]:
        if c.get("mismatches"):
            lines.append(f"{c['dtype']}: first mismatches (window, skip, stream, max |diff|): {c['mismatches'][:5]}")
    return "\n".join(lines), data


# ---- tiny diffusers DiT for d and f ---------------------------------------------------------
def _tiny_dit(layers: int = 2, dtype=None):
    import torch

    try:
        import diffusers
    except ImportError:
        raise Skip("skipped: diffusers is not installed (carry its wheel: see bench/gpu_check.sh)") from None
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=layers,
        sample_size=8, patch_size=2, norm_num_groups=1, num_embeds_ada_norm=1000,
    ).eval()
    return m.to(dtype=dtype) if dtype is not None else m


def _generation(model, device, steps: int, per_step: Callable, dtype=None):
    """A DDIM loop; ``per_step(i, call)`` runs ``call()`` (the model call) for step i and
    returns the model output. Inputs are made before the call (their host-to-device copies
    are not the model's)."""
    import diffusers
    import torch

    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 4, 8, 8), generator=g).to(device, dtype or torch.float32)
    y = torch.tensor([1, 1000], device=device)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            ts = t.to(device).expand(2)
            inp = x
            out = per_step(i, lambda: model(inp, timestep=ts, class_labels=y).sample)
            outs.append(out.clone())
            x = sched.step(out.float(), t, x.float()).prev_sample.to(x.dtype)
    return x, outs


# ---- d. syncs --------------------------------------------------------------------------------
def _sync_sites(fn) -> List[dict]:
    """Run ``fn`` under sync debug mode "warn"; each sync's warning with the innermost frames
    of the Python stack that made it."""
    import warnings

    import torch

    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        ours = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:{f.lineno} "
                f"({f.name})" for f in stack[-6:]]
        found.append({"message": str(message)[:200], "where": f"{filename}:{lineno}", "stack": ours})

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old = warnings.showwarning
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    return found


def section_d(ctx: Ctx):
    import torch

    from foca_kernels.hooks import CacheConfig, disable_cache, enable_cache, reset_cache

    ctx.need_cuda()
    steps = 50
    pattern = CacheConfig(interval=5).pattern(steps)
    model = _tiny_dit(layers=4).to(ctx.device)
    data = {"pattern": pattern}

    def run(per_skip):
        def per_step(i, call):
            return per_skip(call) if pattern[i] == "s" else call()

        return _generation(model, ctx.device, steps, per_step)

    # uncached model, the same steps: syncs that are the model's own
    base_sites: List[dict] = []
    if ctx.cuda:
        run(lambda call: _collect(base_sites, call))
    enable_cache(model, interval=5)
    cached_sites = []
    if ctx.cuda:
        run(lambda call: _collect(cached_sites, call))
    else:  # CPU dry run: the loop without a debug mode
        run(lambda call: call())
    # "error" mode, as the issue asks: the first sync raises; report where
    reset_cache(model)
    first_error = None
    if ctx.cuda:
        def strict(call):
            nonlocal first_error
            if first_error is not None:
                return call()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return call()
            except RuntimeError as e:
                tb = traceback.extract_tb(e.__traceback__)
                first_error = {"error": _err(e), "stack": [
                    f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:{f.lineno} "
                    f"({f.name})" for f in tb[-8:]]}
                raise
            finally:
                torch.cuda.set_sync_debug_mode(0)

        try:
            run(strict)
        except RuntimeError:
            pass
    disable_cache(model)
    n_skip = pattern.count("s")
    data.update({"uncached_syncs": len(base_sites), "cached_syncs": len(cached_sites), "skipped_steps": n_skip,
                 "cached_sites": cached_sites[:50], "uncached_sites": base_sites[:50], "first_error": first_error})
    lines = [f"Tiny diffusers DiT (4 blocks, 8 cached modules), DDIM 50 steps, `enable_cache(model, interval=5)`"
             f" (pattern {pattern}); sync debug mode on around the {n_skip} skipped-step model calls only.",
             "",
             _table(["model", "syncs over the skipped-step calls", "per skipped step"], [
                 ["uncached (the model's own)", len(base_sites), f"{len(base_sites) / n_skip:.2f}"],
                 ["cached (foca_kernels.hooks)", len(cached_sites), f"{len(cached_sites) / n_skip:.2f}"]])]
    if not ctx.cuda:
        lines += ["", "(CPU dry run: no sync debug mode without CUDA)"]
    extra = len(cached_sites) - len(base_sites)
    lines.append("")
    lines.append("Expect no sync from the cache: " + (
        "none found." if extra <= 0 and not cached_sites
        else f"{len(cached_sites)} syncs in the cached calls ({extra:+d} vs uncached)."))
    distinct = {}
    for s in cached_sites:
        distinct.setdefault(s["where"], s)
    for where, s in list(distinct.items())[:8]:
        n = sum(1 for x in cached_sites if x["where"] == where)
        lines.append(f"- {n} x `{where}`: {s['message'][:100]}; stack: " + " <- ".join(reversed(s["stack"][-4:])))
    if first_error:
        lines.append(f"- mode \"error\": the first skipped step raised {first_error['error']} at "
                     + " <- ".join(reversed(first_error["stack"][-4:])))
    elif ctx.cuda:
        lines.append("- mode \"error\": the whole generation ran without raising")
    return "\n".join(lines), data


def _collect(sink: list, call):
    out = []
    sink.extend(_sync_sites(lambda: out.append(call())))
    return out[0]


# ---- f. compiled bf16 rounding ---------------------------------------------------------------
def _ulps_bf16(a, b) -> int:
    """Largest distance in bf16 ulps between two bf16 tensors (bit patterns mapped to a
    monotone integer line; nan/inf compare by bits)."""
    import torch

    def line(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)  # negative floats: reverse order below zero

    return int((line(a) - line(b)).abs().max()) if a.numel() else 0


def _diff(a, b) -> str:
    import torch

    if torch.equal(a, b):
        return "bit-identical"
    if a.dtype == torch.bfloat16:
        return f"max {_ulps_bf16(a, b)} ulp (max |diff| {float((a.float() - b.float()).abs().max()):.3g})"
    return f"max |diff| {float((a.double() - b.double()).abs().max()):.3g}"


def section_f(ctx: Ctx):
    import torch
    import torch._dynamo

    import foca_kernels as fk
    from foca_kernels.hooks import CacheConfig, disable_cache, enable_cache, reset_cache

    ctx.need_cuda()
    backend = "inductor" if ctx.cuda else "aot_eager"
    dt = torch.bfloat16
    lines, data = [], {"backend": backend}
    # 1. forecast_ alone
    try:
        torch._dynamo.reset()
        g = torch.Generator(device=ctx.device).manual_seed(0)
        feats = [torch.randn((2, 256, 1152), generator=g, device=ctx.device).to(dt) for _ in range(3)]
        a, b = fk.allocate(feats[0], "foca"), fk.allocate(feats[0], "foca")
        _drive(fk, [a, b], feats, 3)

        def skip(st, out, h):
            fk.forecast_(st, out, h)

        comp = torch.compile(skip, backend=backend, fullgraph=True)
        res = []
        for h in (1.0, 0.5, 1.25):
            oa, ob = torch.empty_like(feats[0]), torch.empty_like(feats[0])
            skip(a, oa, h)
            comp(b, ob, h)
            res.append(_diff(ob, oa))
        data["forecast"] = res
        lines.append(f"- compiled `forecast_` (fullgraph, {backend}) vs eager, bf16 [2,256,1152], 3 skipped steps: "
                     + "; ".join(res))
    except Exception as e:  # noqa: BLE001
        data["forecast_error"] = _err(e)
        lines.append(f"- compiled `forecast_`: error {_err(e)}")
    # 2. the cached tiny DiT in bf16, compiled vs eager; the uncached model as the yardstick
    try:
        steps = 20 if ctx.cuda else 8
        pattern = CacheConfig(interval=5).pattern(steps)
        model = _tiny_dit(layers=1, dtype=dt).to(ctx.device)
        rows = []
        for cached in (False, True):
            if cached:
                enable_cache(model, interval=5)
            _, eager = _generation(model, ctx.device, steps, lambda i, call: call(), dtype=dt)
            if cached:
                reset_cache(model)
            torch._dynamo.reset()
            cm = torch.compile(model, backend=backend)
            _, comp = _generation(cm, ctx.device, steps, lambda i, call: call(), dtype=dt)
            full = [_ulps_bf16(comp[i], eager[i]) for i in range(steps) if pattern[i] == "F"]
            skipped = [_ulps_bf16(comp[i], eager[i]) for i in range(steps) if pattern[i] == "s"]
            rows.append(["cached (interval 5)" if cached else "uncached", max(full), max(skipped) if cached else "-",
                         sum(1 for i in range(steps) if torch.equal(comp[i], eager[i])), steps])
            if cached:
                disable_cache(model)
        data["model"] = rows
        lines.append("")
        lines.append(f"Tiny diffusers DiT (1 block) in bf16, {steps} DDIM steps, pattern {pattern}: model output of"
                     f" every step, `torch.compile(model, backend={backend!r})` vs eager, inputs fed from each run's"
                     " own trajectory (so differences compound). Max difference in bf16 ulps:")
        lines.append("")
        lines.append(_table(["model", "full steps (max ulp)", "skipped steps (max ulp)", "bit-identical steps",
                             "steps"], rows))
        lines.append("")
        lines.append("The uncached row is the model's own rounding under inductor (fused bf16 ops keep fp32"
                     " intermediates); the cached row should match it on full steps, and its skipped steps add"
                     " only what the eager forecast (outside the graph) passes on.")
    except Skip as e:
        lines.append(f"- compiled cached model: {e}")
    except Exception as e:  # noqa: BLE001
        data["model_error"] = _err(e)
        data["model_traceback"] = traceback.format_exc()[-2000:]
        lines.append(f"- compiled cached model: error {_err(e)}")
    torch._dynamo.reset()
    return "\n".join(lines), data


# ---- b, e, g, i: pytest runs ------------------------------------------------------------------
def _pytest_cmd(args: List[str]) -> List[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def _pytest(ctx: Ctx, args: List[str], env_extra: Dict[str, str], timeout: float, log: List[str]):
    env = _env_for_children()
    env.update(env_extra)
    cmd = _pytest_cmd(args)
    t0 = time.monotonic()
    rc, out = _run(cmd, timeout, env)
    log.append(f"$ {' '.join(cmd)}  (env {env_extra})\n{out}")
    return rc, out, time.monotonic() - t0


def _last_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", ln):
            return ln.strip("= ")
    return lines[-1] if lines else "(no output)"


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise Skip("skipped: diffusers is not installed (carry its wheel: see bench/gpu_check.sh)") from None


def section_b(ctx: Ctx):
    ctx.need_cuda()
    _need_diffusers()
    if not os.path.exists(os.path.join(ROOT, "bench", "bench_host.py")):
        raise Skip("skipped: bench/bench_host.py is not in this checkout")
    log: List[str] = []
    rounds = "4" if ctx.cuda else "1"
    env = {"FOCA_HOST_ROUNDS": rounds}
    rc, out, dt = _pytest(ctx, ["bench", "-k", "host", "-q", "-s"], env, ctx.left() - 2, log)
    lines = [f"`FOCA_HOST_ROUNDS={rounds} python -m pytest bench -k host -s` ({dt:.0f} s): "
             f"{'TIMED OUT: ' if rc is None else ''}{_last_line(out)}", ""]
    found = {}
    for kind in ("skipped", "full"):
        m = re.search(rf"host time per {kind} step.*?\n((?:\|.*\n?)+)", out)
        found[kind] = bool(m)
        lines += ([out[m.start():m.end()].strip(), ""] if m
                  else [f"(no {kind}-step table in its output; see sections.log)", ""])
    m = re.search(r"target \(full-step overhead.*?\n((?:- .*\n?)+)", out)
    if m:
        lines.append(out[m.start():m.end()].strip())
    return "\n".join(lines), {"rc": rc, "tables_found": found, "log": log}


E_ROWS = ("uncached", "fk-foca-N5", "fk-foca-N5-block", "fk-foca-N5-block-F1", "diffusers-taylorseer2-N5",
          "cachedit-foca-N5")


def _e2e_env(ctx: Ctx, margin_s: float) -> Dict[str, str]:
    """bench_e2e's environment: DiT-XL/2 on CUDA (a 4-block toy on the CPU), and a deadline a
    little before the section's box ends (rows that would not fit are skipped with the reason)."""
    env = {"FOCA_E2E_MODEL": "dit-xl2" if ctx.cuda else "tiny",
           "FOCA_E2E_DEADLINE": f"{time.time() + ctx.left() - margin_s:.0f}"}
    if not ctx.cuda:
        env.update({"FOCA_E2E_STEPS": "10", "FOCA_BENCH_THREADS": "1"})
    return env


def _e2e_report(out: str) -> Tuple[str, bool]:
    m = re.search(r"foca-kernels end-to-end summary.*?\n(.*?)(?:\n[-=]{10,}|\Z)", out, re.S)
    if m:
        return m.group(1).strip(), True
    return "(no summary table in its output; the tail of the output is in sections.log)", False


def _has_cache_dit() -> str:
    try:
        import cache_dit  # noqa: F401

        return "cache-dit installed: its rows run"
    except ImportError:
        return "cache-dit not installed: its rows skip"


def section_e(ctx: Ctx):
    ctx.need_cuda()
    _need_diffusers()
    log: List[str] = []
    env = _e2e_env(ctx, 8)
    env["FOCA_E2E_PASSES"] = os.environ.get("FOCA_E2E_PASSES", "2" if ctx.cuda else "1")
    kexpr = "e2e and not driver and not compile and (" + " or ".join(E_ROWS) + ")"
    rc, out, dt = _pytest(ctx, ["bench", "-k", kexpr, "-q", "-rs"], env, ctx.left() - 2, log)
    table, found = _e2e_report(out)
    lines = [f"`FOCA_E2E_MODEL={env['FOCA_E2E_MODEL']} FOCA_E2E_PASSES={env['FOCA_E2E_PASSES']} python -m pytest "
             f"bench -k \"{kexpr}\"` ({dt:.0f} s; {_has_cache_dit()}; every generation marked new, every pass must "
             f"repeat the first): {'TIMED OUT: ' if rc is None else ''}{_last_line(out)}", "", table]
    return "\n".join(lines), {"rc": rc, "summary_found": found, "log": log}


def section_i(ctx: Ctx):
    ctx.need_cuda()
    _need_diffusers()
    log: List[str] = []
    env = _e2e_env(ctx, 8)
    env.update({"FOCA_E2E_PASSES": "1", "FOCA_E2E_COMPILE": "default,reduce-overhead" if ctx.cuda else "default"})
    kexpr = "e2e and not driver and (uncached or compile)"
    rc, out, dt = _pytest(ctx, ["bench", "-k", kexpr, "-q", "-rs"], env, ctx.left() - 2, log)
    table, found = _e2e_report(out)
    lines = [f"`FOCA_E2E_MODEL={env['FOCA_E2E_MODEL']} FOCA_E2E_COMPILE={env['FOCA_E2E_COMPILE']} FOCA_E2E_PASSES=1 "
             f"python -m pytest bench -k \"{kexpr}\"` ({dt:.0f} s; {_has_cache_dit()}; rows in priority order, "
             f"default mode first; one timed pass after each row's untimed compile generation): "
             f"{'TIMED OUT: ' if rc is None else ''}{_last_line(out)}", "", table]
    return "\n".join(lines), {"rc": rc, "summary_found": found, "log": log}


# Section g: the CUDA tests that fit a cold machine's box, side by side (three pytest runs).
# Left out (run them when a GPU session has time: `TRITON_INTERPRET=0 pytest <file>`, minutes
# each with a cold Triton cache): the rest of tests/test_group.py, tests/test_parity.py (519
# tests, every method x dtype x schedule on the device), tests/test_compile.py,
# tests/test_duca_kernel.py, the rest of tests/test_calibrated.py.
G_RUNS = [
    ("CUDA-marked tests: CUDA-graph replay == eager (6), a cached generation makes no sync (1), "
     "the compiled kernel vs the reference, every method, fp32 and bf16 (2)",
     ["tests/test_group_graph.py", "tests/test_hooks_nosync.py", "tests/test_parity.py", "-m", "cuda"]),
    ("the grouped kernel on CUDA: misaligned and strided outs, the float64 reference for 5 methods, "
     "one launch per skipped step (19)",
     ["tests/test_group.py", "-k", "triton and (unaddressable or float64_reference or one_launch)"]),
    ("the calibrated fit's Triton kernels on CUDA against float64 (6)",
     ["tests/test_calibrated.py", "-k", "triton and (fp32_sequences or each_step)"]),
]


def section_g(ctx: Ctx):
    ctx.need_cuda()
    env = _env_for_children()  # TRITON_INTERPRET=0: conftest's device fixture then puts kernel tests on CUDA
    deadline = ctx.deadline - 2
    jobs = [(label, args, Job(_pytest_cmd([*args, "-q", "-rfE"]), env, deadline)) for label, args in G_RUNS]
    _finish_all([j for _, _, j in jobs])
    rows, fails, log = [], [], []
    for label, args, job in jobs:
        out = job.output()
        cmd = "TRITON_INTERPRET=0 pytest " + " ".join(f'"{a}"' if " " in a else a for a in args)
        log.append(f"$ {cmd}\n{out}")
        rows.append([f"`{cmd}`", label, f"{job.seconds:.0f} s",
                     ("TIMED OUT (its box): " if job.timed_out else "") + _last_line(out)])
        fails += [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    lines = ["The three runs go side by side (correctness only, nothing timed). Not in this check (too long for a "
             "cold machine's box): the rest of tests/test_group.py, tests/test_parity.py, tests/test_compile.py, "
             "tests/test_duca_kernel.py and tests/test_calibrated.py; run them with "
             "`TRITON_INTERPRET=0 pytest <file>`.",
             "", _table(["command", "what", "time", "result"], rows)]
    if fails:
        lines.append("")
        lines += [f"- {f[:240]}" for f in fails[:20]]
    return "\n".join(lines), {"failures": fails, "log": log,
                              "timed_out": [label for label, _, j in jobs if j.timed_out]}


# ---- w. compile first -------------------------------------------------------------------------
def _triton_specialisations() -> Optional[int]:
    """Kernel specialisations this process holds (compiled here or loaded from Triton's disk
    cache), over the package's Triton kernels; None if Triton's layout is not the expected one."""
    try:
        import importlib

        import triton

        total = 0
        for mod in ("triton_group", "triton_lincomb", "triton_fit", "triton_tokens"):
            try:
                m = importlib.import_module(f"foca_kernels.ops.{mod}")
            except Exception:  # noqa: BLE001
                continue
            for obj in vars(m).values():
                if isinstance(obj, triton.runtime.jit.JITFunction):
                    for cache in getattr(obj, "device_caches", {}).values():
                        total += len(cache[0])
        return total
    except Exception:  # noqa: BLE001
        return None


def _warm_kernels(ctx: Ctx, dtype_name: str) -> Tuple[str, dict]:
    """Sections a, c and h's launches, once each, at their real sizes, in one dtype."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    wctx = Ctx(ctx.smoke, ctx.deadline, ctx.cpu_dry, warm=True, dtypes=[dt])
    parts = []
    for key, fn in (("a", section_a), ("c", section_c), ("h", section_h)):
        t0 = time.monotonic()
        try:
            md, _ = fn(wctx)
            status = md
        except Skip as e:
            status = str(e)
        except Exception as e:  # noqa: BLE001 - the timed section will meet it and report it
            status = f"error: {_err(e)}"
        parts.append({"section": key, "seconds": time.monotonic() - t0, "status": status})
    return f"{dtype_name}: " + "; ".join(f"{p['section']} {p['seconds']:.1f} s ({p['status']})" for p in parts), \
        {"parts": parts, "specialisations": _triton_specialisations()}


def _warm_hooks(ctx: Ctx) -> Tuple[str, dict]:
    """One cached generation of each model and configuration sections b, d and e run."""
    import importlib

    ctx.need_cuda()
    _need_diffusers()
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    os.environ.update(_e2e_env(ctx, 0))  # bench_e2e reads its model and steps at import
    parts = []

    def part(name, fn):
        t0 = time.monotonic()
        try:
            fn()
            status = "ok"
        except Skip as e:
            status = str(e)
        except BaseException as e:  # noqa: BLE001 - includes pytest's skip outcome
            status = f"not warmed: {_err(e)}"
        parts.append({"part": name, "seconds": time.monotonic() - t0, "status": status})

    def host():  # b: bench_host's 28-block model, one generation per foca-kernels method
        bh = importlib.import_module("bench_host")
        base = bh._model()
        for m in bh.FK_METHODS:
            model, call, reset = bh._fk(base, m)
            reset()
            bh._generation(model, call, lambda s, dt: None)
            bh.disable_cache(model)

    def syncs():  # d: the tiny DiT, interval 5
        from foca_kernels.hooks import disable_cache, enable_cache

        model = _tiny_dit(layers=4).to(ctx.device)
        enable_cache(model, interval=5)
        _generation(model, ctx.device, 50, lambda i, call: call())
        disable_cache(model)

    def e2e():  # e (and i's eager parts): bench_e2e's foca-kernels rows at DiT-XL/2 size
        be = importlib.import_module("bench_e2e")
        base = be.Baseline()
        failed = []
        for cid in (c for c in E_ROWS if c.startswith("fk-")):
            _, _, setup_fn, options = be.CONFIGS[cid]
            try:
                s = setup_fn(base.model, **options)
                s.before()
                be._generate(s.model, base.scheduler, base.labels, base.noise, call=s.call)
                s.teardown()
            except BaseException as e:  # noqa: BLE001 - includes pytest's skip outcome
                failed.append(f"{cid}: {_err(e)}")
        if failed:
            raise RuntimeError("; ".join(failed))

    part("b: bench_host model, foca/taylorseer/reuse", host)
    part("d: tiny DiT", syncs)
    part(f"e: {os.environ['FOCA_E2E_MODEL']} rows {', '.join(c for c in E_ROWS if c.startswith('fk-'))}", e2e)
    return "hooks: " + "; ".join(f"{p['part']} {p['seconds']:.1f} s ({p['status']})" for p in parts), \
        {"parts": parts, "specialisations": _triton_specialisations()}


def section_w(ctx: Ctx, part: str):
    if part.startswith("kernels-"):
        return _warm_kernels(ctx, part.split("-", 1)[1])
    if part == "hooks":
        return _warm_hooks(ctx)
    raise ValueError(f"unknown warm-up part {part!r}")


# ---- h. the calibrated reading's full step ----------------------------------------------------
def section_h(ctx: Ctx):
    """update_ of the default reading (copy + the fit: two Triton kernels and a small sum on
    CUDA) against r7's full step (one copy) and against a copy of the fit's floor (10 tensors
    moved: 5 read + 5 written), one stream, per call."""
    import torch

    import foca_kernels as fk

    sizes = ([("dit-xl2 [2,256,1152]", (2, 256, 1152)), ("flux [1,4608,3072]", (1, 4608, 3072))]
             if ctx.cuda and not ctx.smoke else [("smoke [2,16,32]", (2, 16, 32))])
    backend = "triton" if ctx.cuda else "torch"
    rows, data = [], []
    cases = [(n, s, d) for n, s in sizes for d in ctx.dtypes or (torch.bfloat16, torch.float32)]
    for i, (name, shape, dtype) in enumerate(cases):
        budget = max(1.0, (ctx.left() - 3) / (len(cases) - i) / 3)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        feats = [torch.randn(shape, generator=g, device=ctx.device).to(dtype) for _ in range(4)]
        row = {"size": name, "dtype": str(dtype).replace("torch.", "")}
        for label, opts in (("calibrated", {}), ("r7", {"reading": "r7"})):
            buf = fk.allocate(feats[0], "foca", **opts)
            for f in feats:
                fk.update_(buf, f, 1.0, backend=backend)
            row[label] = _time_rounds(ctx, lambda: fk.update_(buf, feats[0], 1.0, backend=backend), 10, 20,
                                      budget_s=budget)
        if ctx.warm:
            continue
        src = torch.empty(5 * feats[0].numel(), device=ctx.device, dtype=dtype)
        dst = torch.empty_like(src)
        row["floor"] = _time_rounds(ctx, lambda: dst.copy_(src), 10, 20, budget_s=budget)
        data.append(row)
        c, r, fl = row["calibrated"], row["r7"], row["floor"]
        rows.append([name, row["dtype"], _fmt_t(c["min_s"]), _fmt_t(c["host_median_s"]), _fmt_t(r["min_s"]),
                     _fmt_t(fl["min_s"]), f"{fl['min_s'] / c['min_s']:.2f}"])
    if ctx.warm:
        return f"{len(cases)} cases launched", {"rows": data}
    lines = ["One stream; per call: `update_` (device min over rounds of 10 back-to-back calls; host = time for "
             "the calls to return). Floor: a device copy of 5 tensors (10 tensors moved, the fit's two-pass "
             "traffic plus the feature copy)."]
    if not ctx.cuda:
        lines.append("(CPU dry run: the compiled C fit, not a GPU figure)")
    lines.append("")
    lines.append(_table(["size", "dtype", "calibrated full", "its host / call", "r7 full", "floor (10 tensors)",
                         "floor / calibrated"], rows))
    return "\n".join(lines), {"rows": data}


FUNCS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f, "g": section_g,
         "h": section_h, "i": section_i}


# ---- child: one section ----------------------------------------------------------------------
def run_child(key: str, result_path: str, smoke: bool, box: float, cpu_dry: bool, part: Optional[str] = None) -> int:
    t0 = time.monotonic()
    res = {"key": key, "part": part}
    try:
        ctx = Ctx(smoke, t0 + box, cpu_dry)
        md, data = section_w(ctx, part) if key == "w" else FUNCS[key](ctx)
        res.update(status="ok", markdown=md, data=data)
    except Skip as e:
        res.update(status="skipped", markdown=str(e))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        res.update(status="error", markdown=f"error: {_err(e)}", traceback=traceback.format_exc()[-4000:])
    res["seconds"] = time.monotonic() - t0
    with open(result_path, "w") as f:
        json.dump(res, f, default=str)
    return 0


# ---- parent ----------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "triton", "diffusers", "cache-dit", "transformers"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = "not installed"
    try:
        v["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        v["commit"] = "unknown"
    return v


def _probe_cuda() -> Tuple[bool, str]:
    """(CUDA usable, device description) from a child, so the parent never holds a CUDA
    context (and never imports torch: each section's child does)."""
    code = ("import torch, json; ok = torch.cuda.is_available(); "
            "print(json.dumps([ok, (torch.cuda.get_device_name(0) + ', %.0f GiB' % "
            "(torch.cuda.get_device_properties(0).total_memory / 2**30) + ', torch ' + torch.__version__ "
            "+ ', CUDA ' + str(torch.version.cuda)) if ok else 'no CUDA device (torch ' + torch.__version__ + ')']))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=_env_for_children())
        ok, desc = json.loads(p.stdout.strip().splitlines()[-1])
        return bool(ok), desc
    except Exception as e:  # noqa: BLE001
        return False, f"could not import torch: {_err(e)}"


REPORT_ORDER = "wabcdefghi"


def _outcome(r: dict, box: int) -> str:
    st = r.get("status", "not run")
    if st == "ok":
        return "finished" + ("" if r.get("seconds", 0) <= box
                             else f" (used {r['seconds'] - box:.0f} s left by earlier sections)")
    if st == "timed out":
        return "NOT finished: killed at its time box"
    if st == "error":
        return "NOT finished: error"
    return r.get("markdown", st).split("\n")[0][:120]


def _write_report(args, budget, t_start, device_desc, cuda, versions, wanted, results, logs, out_dir) -> str:
    """report.md, report.json, sections.log: written after every section (phase), so a hard
    stop keeps what had finished."""
    total = time.monotonic() - t_start
    keys = [k for k in REPORT_ORDER if k in wanted]
    md = [f"# GPU check ({'smoke run' if args.smoke else 'full'})", "",
          f"- device: {device_desc}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
          f"- total {total:.0f} s of a {budget:.0f} s budget; phase 1 (untimed, side by side): "
          f"{', '.join(k for k in PHASE1 if k in wanted) or '-'}; phase 2 (timed, one at a time): "
          f"{' '.join(k for k in RUN_ORDER if k in wanted) or '-'}; every child runs with TRITON_INTERPRET=0", "",
          "## Sections", ""]
    rows, done, not_done = [], [], []
    for key in keys:
        title, box, _, phase = SECTIONS[key]
        r = results.get(key, {"status": "not run", "markdown": "not run: the check stopped before this section"})
        out = _outcome(r, box)
        (done if r.get("status") == "ok" else not_done).append(key)
        rows.append([title.split(". ", 1)[0], title.split(". ", 1)[1], phase, f"{box} s",
                     f"{r['allowed_s']:.0f} s" if "allowed_s" in r else "-", f"{r.get('seconds', 0):.0f} s", out])
    md.append(_table(["", "section", "phase", "box", "allowed", "took", "outcome"], rows))
    md += ["", f"Finished: {', '.join(done) or 'none'}. Not finished or not run: {', '.join(not_done) or 'none'}.", ""]
    for key in keys:
        title, box, _, _ = SECTIONS[key]
        r = results.get(key, {"status": "not run", "markdown": "not run: the check stopped before this section",
                              "seconds": 0})
        md.append(f"## {title}")
        md.append("")
        md.append(f"_{r['status']}, {r.get('seconds', 0):.0f} s of a {box} s time box_")
        md.append("")
        md.append(r["markdown"])
        md.append("")
    report = "\n".join(md)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"device": device_desc, "cuda": cuda, "smoke": args.smoke, "versions": versions,
                   "total_s": total, "budget_s": budget, "finished": done, "not_finished": not_done,
                   "sections": results}, f, indent=1, default=str)
    with open(os.path.join(out_dir, "sections.log"), "w") as f:
        f.write("\n\n".join(logs))
    return report


def _child_cmd(key: str, res_path: str, box: float, args, part: Optional[str] = None) -> List[str]:
    return ([sys.executable, os.path.abspath(__file__), "--child", key, "--result", res_path, "--box", f"{box:.1f}"]
            + (["--part", part] if part else []) + (["--smoke"] if args.smoke else [])
            + (["--cpu-dry"] if args.cpu_dry else []))


def _collect_result(job: Job, res_path: str, box: float, label: str, logs: List[str]) -> dict:
    """A child's result (its JSON), or what its end says when it wrote none."""
    output = job.output()
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    elif job.timed_out:
        res = {"status": "timed out", "markdown": f"error: killed at its time box ({box:.0f} s); "
               "the output so far is in sections.log"}
    else:
        tail = "\n".join(output.strip().splitlines()[-15:])
        res = {"status": "error", "markdown": f"error: the section's process ended with exit code {job.rc} "
               f"and no result:\n\n```\n{tail}\n```"}
    res["seconds"] = job.seconds
    res["allowed_s"] = box
    data = res.get("data") if isinstance(res.get("data"), dict) else {}
    for entry in data.pop("log", []):
        output += "\n" + entry
    if res.get("traceback"):
        output += "\n" + res["traceback"]
    logs.append(f"===== {label} ({job.seconds:.1f} s, {res['status']}) =====\n{output}")
    return res


def _merge_w(parts: Dict[str, dict], wall: float) -> dict:
    """Section w's one result from its processes."""
    rows, statuses = [], []
    for name, r in parts.items():
        st = r.get("status", "?")
        statuses.append(st)
        data = r.get("data") or {}
        spec = data.get("specialisations")
        rows.append([name, f"{r.get('seconds', 0):.1f} s", "n/a" if spec is None else spec,
                     r.get("markdown", "").replace("\n", " ")[:400]])
    status = "ok" if all(s in ("ok", "skipped") for s in statuses) and "ok" in statuses else (
        "skipped" if all(s == "skipped" for s in statuses) else
        "timed out" if "timed out" in statuses else "error")
    md = [f"{len(parts)} processes side by side, {wall:.0f} s of wall-clock (the compile cost a cold machine pays "
          "once; the kernels land in Triton's on-disk cache, which every later process reads). Specialisations = the "
          "package's Triton kernels the process held at its end (compiled, or loaded from that cache).", "",
          _table(["process", "time", "specialisations", "what ran"], rows)]
    return {"status": status, "markdown": "\n".join(md), "seconds": wall, "data": {"parts": parts}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU (torch backend): proves the script runs")
    ap.add_argument("--sections", default=REPORT_ORDER, help="which sections, e.g. 'a,c' or 'ac' (default: all)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}; smoke 100)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu-check-out)")
    ap.add_argument("--plan", action="store_true", help="print the sections, phases and time boxes; run nothing")
    ap.add_argument("--cpu-dry", action="store_true", help=argparse.SUPPRESS)  # developers: CUDA sections' code on CPU
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--box", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child, args.result, args.smoke, args.box, args.cpu_dry, args.part)

    t_start = time.monotonic()
    budget = args.budget if args.budget is not None else (100.0 if args.smoke else DEFAULT_BUDGET_S)
    wanted = "".join(k for k in REPORT_ORDER if k in re.sub(r"[^a-i,w]", "", args.sections.lower()))
    if args.plan:
        print(_table(["", "section", "phase", "box", "needs CUDA"],
                     [[k, SECTIONS[k][0].split(". ", 1)[1], SECTIONS[k][3], f"{SECTIONS[k][1]} s",
                       "yes" if SECTIONS[k][2] else "no"] for k in wanted]))
        print(f"\nphase 1 ({', '.join(k for k in PHASE1 if k in wanted)}) side by side: {phase1_box(wanted)} s; "
              f"phase 2 in the order {' '.join(k for k in RUN_ORDER if k in wanted)}; "
              f"{planned_seconds(wanted)} s if every box were used, budget {budget:.0f} s")
        return 0
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu-check-out")
    os.makedirs(out_dir, exist_ok=True)
    cuda, device_desc = (False, "CPU (smoke run: tiny sizes, PyTorch backend)") if args.smoke else _probe_cuda()
    if args.cpu_dry:
        cuda = False
    versions = _versions()
    print(f"[gpu_check] device: {device_desc}; budget {budget:.0f} s; output {out_dir}", flush=True)

    results: Dict[str, dict] = {}
    logs: List[str] = []
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    env = _env_for_children()

    def runnable(key: str) -> bool:
        return not (SECTIONS[key][2] and not cuda and not args.cpu_dry)

    def elapsed() -> float:
        return time.monotonic() - t_start

    def report():
        return _write_report(args, budget, t_start, device_desc, cuda, versions, wanted, results, logs, out_dir)

    def reserved(keys) -> float:  # the boxes of sections still to run
        return sum(SECTIONS[k][1] for k in keys if k in wanted and runnable(k))

    try:
        for key in wanted:
            if not runnable(key):
                results[key] = {"status": "skipped", "markdown": SKIP_NO_CUDA, "seconds": 0.0}
        # ---- phase 1: the untimed sections side by side
        p1 = [k for k in PHASE1 if k in wanted and runnable(k)]
        if p1:
            box1 = min(phase1_box(p1), budget - elapsed() - reserved(RUN_ORDER) - 5)
            jobs = []  # (key, part, job, res_path, box)
            if box1 < MIN_SECTION_S:
                for k in p1:
                    results[k] = {"status": "skipped", "seconds": 0.0,
                                  "markdown": f"skipped: out of time ({box1:.0f} s for phase 1)"}
                p1 = []
            for key in p1:
                box = min(SECTIONS[key][1], box1)
                for part in (WARM_PARTS if key == "w" else (None,)):
                    res_path = os.path.join(tmp, f"{key}-{part or ''}.json")
                    deadline = time.monotonic() + box
                    jobs.append((key, part, Job(_child_cmd(key, res_path, box - 4, args, part), env, deadline),
                                 res_path, box))
            if p1:
                print(f"[gpu_check] phase 1: {', '.join(p1)} side by side (box {box1:.0f} s) ...", flush=True)
            t1 = time.monotonic()
            _finish_all([j for _, _, j, _, _ in jobs])
            wall1 = time.monotonic() - t1
            w_parts = {}
            for key, part, job, res_path, box in jobs:
                label = f"section {key}" + (f" ({part})" if part else "") + f": {SECTIONS[key][0]}"
                res = _collect_result(job, res_path, box, label, logs)
                if key == "w":
                    w_parts[part] = res
                else:
                    results[key] = res
                    print(f"[gpu_check] section {key}: {res['status']} in {res['seconds']:.0f} s", flush=True)
            if w_parts:
                results["w"] = _merge_w(w_parts, max(r["seconds"] for r in w_parts.values()))
                results["w"]["allowed_s"] = min(SECTIONS["w"][1], box1)
                print(f"[gpu_check] section w: {results['w']['status']} in {results['w']['seconds']:.0f} s "
                      f"(phase 1: {wall1:.0f} s)", flush=True)
            report()
        # ---- phase 2: the timed sections, one at a time
        for i, key in enumerate(RUN_ORDER):
            if key not in wanted or not runnable(key):
                continue
            title = SECTIONS[key][0]
            avail = budget - elapsed() - reserved(RUN_ORDER[i + 1:]) - 5
            if avail < MIN_SECTION_S:
                results[key] = {"status": "skipped", "seconds": 0.0,
                                "markdown": f"skipped: out of time ({avail:.0f} s left for it within the "
                                            f"{budget:.0f} s budget)"}
                continue
            print(f"[gpu_check] section {key} (box {SECTIONS[key][1]} s, allowed {avail:.0f} s) ...", flush=True)
            res_path = os.path.join(tmp, f"{key}.json")
            job = Job(_child_cmd(key, res_path, avail - 4, args), env, time.monotonic() + avail)
            _finish_all([job])
            results[key] = _collect_result(job, res_path, avail, f"section {key}: {title}", logs)
            print(f"[gpu_check] section {key}: {results[key]['status']} in {results[key]['seconds']:.0f} s", flush=True)
            report()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
