"""The fidelity harness: the shipped digits DiT sampled with the real sampler (rectified-flow
Euler, 50 steps) under full compute and under every caching method, side by side.

    from foca_kernels.demo.harness import HarnessConfig, run_harness
    res = run_harness(HarnessConfig(intervals=(3, 5), samples=50))
    print(res.to_markdown())

Every run samples the same way: ``sampler`` "euler" (default) or "dpm" (DPM-Solver++(2M)),
classifier-free guidance or ``unconditional`` (null label, no guidance), on a shipped model or
on one from a model directory (``model_dir``, see ``specs.spec_from_dir``).

Runs (each from the same seeds, one batch of ``samples`` images, labels ``i % 10``):

* ``full``: every step computed: the reference every other run is compared with.
* ``steps``: the same sampler with fewer steps at the same cost: as many steps as the cached
  runs at interval N compute fully (e.g. 11 for N = 5: the warm-up plus one full step per
  window), so it does the same number of full transformer evaluations.
* ``reuse`` (FORA), ``taylorseer1``/``taylorseer2``/``taylorseer3``, FoCa in each reading
  ``foca-calibrated``/``foca-r7``/``foca-r0``/``foca-r3`` (``foca-secant`` = ``foca-r0``, ``foca-bdf2`` = r0
  with the bdf2 anchor; ``foca`` alone is FoCa's default reading) and the study readings ``foca-r4``/``foca-r6``
  (a Method instance as ``method``): :func:`foca_kernels.hooks.cached`
  on the model with ``CacheConfig(interval=N, method=..., method_options=...)``, module
  granularity by default (attention and feed-forward of every block), so skipped modules do
  not run and their forecasts come from the fused kernels.

Measured for each run:

* ``seconds`` / ``speedup``: wall-clock time of the sampling call, and full compute's time
  divided by it (all runs in one process, one after the other; ``repeats`` > 1 keeps the
  fastest of several). ``cpu_speedup``: the same with the process's CPU time, which other
  jobs on a shared machine disturb less (with one torch thread it is close to the work done).
* ``skipped``: fraction of the cached modules' calls answered by a forecast
  (``cache_info``: ``calls_forecast / (calls_computed + calls_forecast)``); for ``steps``, the
  fraction of the full run's compute not done (``1 - k / num_steps``).
* ``psnr`` / ``rel_l2``: final samples against the full-compute samples from the same seeds.
* ``traj_err``: per step, ``||v - v_full|| / ||v_full||`` of the guided model output (the
  transformer's prediction the sampler steps with) along the cached trajectory, against the
  full run's at the same step: forecast error plus the drift it has caused so far.
  The table gives its mean over the steps.
* ``fcst_err``: per skipped step, the forecast error of the cached modules on the full-compute
  trajectory (teacher forced): an untimed full-compute run of the first ``probe_samples``
  samples records a fixed random subset of ``probe_elements`` elements of every cached
  module's output at every step (it also warms the model up), and each method is replayed on
  those recordings with the package's own ``allocate``/``update_``/``forecast_`` and the same
  schedule. Forecasts are elementwise, so a subset forecasts exactly like the whole tensor.
  Mean over modules of the relative L2 error; the table gives the mean over skipped steps.
* ``accuracy``: the model's classifier's accuracy on the requested classes (NaN when
  unconditional, or for a model directory without a classifier, which also has no FID);
  ``fid_test``: Fréchet distance in the classifier's 64-d feature space to the held-out test
  images (359 digits, or 1,000 MNIST digits); ``fid_full``: the same against the full-compute samples.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import api as _api
from ..backend import get_backend
from ..hooks import CacheConfig, cache_info, cached, calibrate
from ..hooks.schedule import Schedule
from ..hooks.targets import select_sites
from ..methods import Method
from .specs import resolve_spec
from .method_table import (  # noqa: F401  (re-exported: the harness's names)
    BASELINES,
    CACHED,
    ADAPTIVE,
    FITTED,
    ALL_METHODS,
    METHOD_NAMES,
    METHOD_ALIASES,
    DEFAULT_INTERVALS,
    DEMO_METHODS,
    DEMO_INTERVALS,
    DEMO_SAMPLES,
    DEMO_STEPS,
    default_reading,
    canonical_method,
    method_choices,
    ordered_methods,
    cache_method,
    replayable,
)


@dataclass
class HarnessConfig:
    """What the harness runs. ``methods`` in any order (the table follows :data:`METHOD_NAMES`;
    ``full`` is always run, it is the reference)."""

    methods: Sequence[str] = ALL_METHODS
    intervals: Sequence[int] = DEFAULT_INTERVALS
    samples: int = 100  # images per run; labels i % 10 (balanced when a multiple of 10)
    num_steps: int = 50
    guidance_scale: Optional[float] = None  # None: the sampler's default
    seed: int = 0
    warmup: int = CacheConfig.warmup  # the package's defaults
    final: int = CacheConfig.final
    granularity: str = "module"
    compute_blocks: Tuple[int, int] = (0, 0)  # first k (and last j) blocks always computed (CacheConfig.compute_blocks)
    backend: Optional[str] = None  # fused ops: None = auto ("torch" on CPU unless TRITON_INTERPRET=1)
    # cache state storage (CacheConfig.state_dtype): a torch dtype's name, None = the model's
    state_dtype: Optional[str] = None
    repeats: int = 1  # timed repetitions per run (the fastest counts)
    threads: Optional[int] = None  # torch intra-op threads during the runs (None: leave as is)
    probe_elements: int = 4096  # elements recorded per cached module for the teacher-forced replay
    probe_samples: int = 10  # samples of the (untimed) recording run for the replay
    calibration_samples: int = 8  # fitted methods: samples of their calibration run (other seeds)
    progress: bool = True  # tqdm bar over all sampling steps
    fid_reference: str = "test"  # data split the FID is measured against
    model: str = "digits"  # which demo model: "digits" (8x8), "mnist" (28x28), or a model directory's name
    model_dir: Optional[str] = None  # a model directory (specs.spec_from_dir): the model's files come from here
    sampler: str = "euler"  # "euler" (FlowMatchEulerDiscreteScheduler) or "dpm" (DPM-Solver++(2M), flow sigmas)
    unconditional: bool = False  # null label only, no guidance (one call per step); accuracy is not measured
    rcs_options: Dict[str, object] = field(default_factory=dict)  # extra CacheConfig fields of the RCS runs
    rcs_calibration: str = "samples"  # RCS threshold calibrated on "samples" (the evaluated batch: equal
    # compute) or "probe" (the first probe_samples: cheaper, RCS may then compute a step more or less)

    def __post_init__(self):
        self.methods = ordered_methods(["full", *self.methods])
        self.intervals = tuple(sorted({int(n) for n in self.intervals}))
        if any(n < 1 for n in self.intervals):
            raise ValueError("intervals must be >= 1")
        if len(self.methods) > 1 and not self.intervals:
            raise ValueError("no intervals given")
        if self.samples < 2:
            raise ValueError("samples must be >= 2 (the FID needs a covariance)")
        if self.num_steps < 2 or self.warmup < 1 or self.repeats < 1:
            raise ValueError("need num_steps >= 2, warmup >= 1, repeats >= 1")
        if self.final < 0 or self.warmup + self.final >= self.num_steps:
            raise ValueError(f"warmup ({self.warmup}) + final ({self.final}) must be fewer than num_steps "
                             f"({self.num_steps}) and final >= 0: else nothing is cached")
        long = [n for n in self.intervals if n > self.num_steps - self.warmup]
        if long:
            raise ValueError(f"intervals {long} are longer than the {self.num_steps - self.warmup} steps after the "
                             "warm-up: they would compute none of them")
        g = self.guidance_scale
        if g is not None and not 0.0 <= float(g) < math.inf:  # nan fails both
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {g}")
        from .sampler import check_sampler

        if self.model_dir is not None:
            self.model_dir = str(self.model_dir)
        resolve_spec(self.model, self.model_dir)  # validates the model name (and directory)
        check_sampler(self.sampler)
        if self.unconditional and self.guidance_scale is not None and float(self.guidance_scale) != 1.0:
            raise ValueError(f"unconditional sampling has no guidance; got guidance_scale={self.guidance_scale}")
        self.compute_blocks = CacheConfig(compute_blocks=self.compute_blocks).compute_blocks  # validates, (k, j)
        if self.state_dtype is not None and not isinstance(getattr(torch, str(self.state_dtype), None), torch.dtype):
            raise ValueError(f"state_dtype must name a torch dtype (float32, bfloat16, float8_e4m3fn), "
                             f"got {self.state_dtype!r}")
        if self.rcs_calibration not in ("samples", "probe"):
            raise ValueError(f"rcs_calibration must be 'samples' or 'probe', got {self.rcs_calibration!r}")

    def cache_config(self, method: str, interval: int, threshold: Optional[float] = None,
                     weights: Optional[dict] = None, stored: bool = True) -> CacheConfig:
        m, opts = cache_method(method)
        if canonical_method(method) in FITTED:
            if weights is None:
                raise ValueError(f"{method} needs its fitted weights (hooks.calibrate)")
            opts = dict(weights)
        rcs = {}
        if canonical_method(method) in ADAPTIVE:
            if threshold is None:
                raise ValueError(f"{method} needs its calibrated RCS threshold")
            rcs = dict(dict(schedule="rcs", rcs_threshold=threshold, rcs_max_gap=2 * interval), **self.rcs_options)
        return CacheConfig(interval=interval, warmup=self.warmup, final=self.final, method=m, method_options=opts,
                           granularity=self.granularity, compute_blocks=self.compute_blocks,
                           num_inference_steps=self.num_steps, backend=self.backend,
                           state_dtype=(None if self.state_dtype is None or not stored
                                        else getattr(torch, self.state_dtype)), **rcs)

    def sample_options(self) -> Dict[str, object]:
        """The sampler's keyword arguments of every run (guidance, sampler, conditioning)."""
        return dict(guidance_scale=self.guidance_scale, sampler=self.sampler, unconditional=self.unconditional)

    def schedule(self, interval: int) -> str:
        """The planned full/skip pattern at ``interval`` ('F' computed, 's' skipped)."""
        return Schedule(interval, self.warmup, self.final).pattern(self.num_steps)

    def same_cost_steps(self, interval: int) -> int:
        """Sampling steps of the ``steps`` baseline at ``interval``: the cached schedule's full steps."""
        return self.schedule(interval).count("F")

    def runs(self) -> List[Tuple[str, Optional[int]]]:
        """(method, interval) of every run, in execution order: full first, then per interval."""
        out: List[Tuple[str, Optional[int]]] = [("full", None)]
        for n in self.intervals:
            out += [(m, n) for m in self.methods if m != "full"]
        return out

    def total_model_steps(self) -> int:
        """Sampling steps the timed runs take (the progress bar's total)."""
        return sum(self.num_steps if m != "steps" else self.same_cost_steps(n) for m, n in self.runs()) * self.repeats


@dataclass
class RunResult:
    method: str
    interval: Optional[int]
    num_steps: int  # sampling steps of this run
    skipped: float  # fraction of block compute skipped (see module doc)
    seconds: float
    speedup: float
    cpu_seconds: float  # process CPU time of the sampling call (all threads)
    cpu_speedup: float
    psnr: float
    rel_l2: float
    accuracy: float
    fid_test: float
    fid_full: float
    psnr_per_image: List[float] = field(default_factory=list)  # same seeds as full: pairs across runs
    traj_err: List[float] = field(default_factory=list)  # per step (empty for "steps")
    fcst_err: List[float] = field(default_factory=list)  # per step, NaN on computed steps
    nonfinite: int = 0  # samples with NaN/inf (replaced by 0 / +-1 before judging)
    calls_computed: int = 0
    calls_forecast: int = 0
    calls_forced: int = 0
    state_bytes: int = 0
    schedule: str = ""
    images: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.method if self.interval is None else f"{self.method} N={self.interval}"

    @property
    def traj_err_mean(self) -> float:
        return _nanmean(self.traj_err)

    @property
    def fcst_err_mean(self) -> float:
        return _nanmean(self.fcst_err)

    def row(self) -> Dict[str, object]:
        return dict(method=self.method, N=self.interval if self.interval is not None else "", steps=self.num_steps,
                    skipped=self.skipped, seconds=self.seconds, speedup=self.speedup, cpu_speedup=self.cpu_speedup,
                    psnr=self.psnr,
                    rel_l2=self.rel_l2, traj_err=self.traj_err_mean, fcst_err=self.fcst_err_mean,
                    accuracy=self.accuracy, fid_test=self.fid_test, fid_full=self.fid_full)


def paired_psnr_difference(a: "RunResult", b: "RunResult", z: float = 1.96) -> Tuple[float, float, float]:
    """Mean per-image PSNR of ``a`` minus ``b`` (same seeds, so the images pair up) and its
    normal-approximation 95% confidence interval: (mean, low, high) in dB."""
    if len(a.psnr_per_image) != len(b.psnr_per_image) or len(a.psnr_per_image) < 2:
        raise ValueError("paired differences need two runs over the same (>= 2) samples")
    d = torch.tensor(a.psnr_per_image, dtype=torch.float64) - torch.tensor(b.psnr_per_image, dtype=torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError("a run matches full compute exactly (infinite PSNR): no paired difference")
    m, se = float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return m, m - z * se, m + z * se


def _nanmean(v: Sequence[float]) -> float:
    vals = [x for x in v if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


TABLE_COLUMNS = (
    ("method", "method", "{}"), ("N", "N", "{}"), ("steps", "steps", "{}"), ("skipped", "skipped", "{:.2f}"),
    ("seconds", "time s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"), ("cpu_speedup", "CPU speed-up", "{:.2f}x"),
    ("psnr", "PSNR dB", "{:.1f}"),
    ("rel_l2", "rel-L2", "{:.4f}"), ("traj_err", "traj err", "{:.3g}"), ("fcst_err", "fcst err", "{:.3g}"),
    ("accuracy", "accuracy", "{:.3f}"), ("fid_test", "FID test", "{:.2f}"), ("fid_full", "FID full", "{:.2f}"),
)


def _fmt(v, fmt: str) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
    return fmt.format(v)


@dataclass
class HarnessResult:
    config: HarnessConfig
    runs: List[RunResult]
    labels: torch.Tensor
    machine: Dict[str, object]
    probe_modules: List[str]
    seconds_total: float = 0.0

    @property
    def full(self) -> RunResult:
        return self.runs[0]

    def get(self, method: str, interval: Optional[int] = None) -> Optional[RunResult]:
        m = canonical_method(method)
        for r in self.runs:
            if r.method == m and (r.interval == interval or m == "full"):
                return r
        return None

    def sorted_runs(self) -> List[RunResult]:
        """Table order: full, then per interval, methods in :data:`METHOD_NAMES` order."""
        order = {m: i for i, m in enumerate(self.config.methods)}
        return [self.full] + sorted((r for r in self.runs[1:]), key=lambda r: (r.interval, order.get(r.method, 99)))

    def to_markdown(self) -> str:
        head = "| " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
        sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
        lines = [head, sep]
        for r in self.sorted_runs():
            row = r.row()
            lines.append("| " + " | ".join(_fmt(row[k], f) for k, _, f in TABLE_COLUMNS) + " |")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """The table as aligned plain text (for the terminal)."""
        cells = [[c[1] for c in TABLE_COLUMNS]]
        for r in self.sorted_runs():
            row = r.row()
            cells.append([_fmt(row[k], f) for k, _, f in TABLE_COLUMNS])
        widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
        out = []
        for j, c in enumerate(cells):
            out.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        keys = [c[0] for c in TABLE_COLUMNS] + ["seconds_cpu", "calls_computed", "calls_forecast", "calls_forced",
                                                 "state_bytes", "nonfinite"]
        w.writerow(keys)
        for r in self.sorted_runs():
            row = dict(r.row(), seconds_cpu=r.cpu_seconds, calls_computed=r.calls_computed,
                       calls_forecast=r.calls_forecast, calls_forced=r.calls_forced, state_bytes=r.state_bytes,
                       nonfinite=r.nonfinite)
            w.writerow([_csv_value(row[k]) for k in keys])
        return buf.getvalue()

    def to_json(self) -> Dict[str, object]:
        """Everything but the images, JSON-safe (inf/nan as strings)."""
        runs = []
        for r in self.sorted_runs():
            d = {k: v for k, v in asdict(r).items() if k != "images"}
            runs.append(_json_safe(d))
        cfg = dict(asdict(self.config), methods=list(self.config.methods), intervals=list(self.config.intervals))
        return _json_safe(dict(config=cfg, machine=self.machine, probe_modules=self.probe_modules,
                               labels=self.labels.tolist(), seconds_total=self.seconds_total, runs=runs))


def _csv_value(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return v


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------
# recording

class _Probe:
    """Forward hooks recording a fixed random subset of each cached module's output (for
    residual-cached blocks: output minus ``hidden_states``) at every model call."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig, elements: int, seed: int = 0):
        self.sites = select_sites(model, config)
        self.elements = elements
        self.seed = seed
        self.index: Dict[str, Tuple[int, torch.Tensor]] = {}
        self.records: Dict[str, List[torch.Tensor]] = {s.name: [] for s in self.sites}
        self.handles = []

    def _hook(self, site):
        def hook(module, args, kwargs, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, torch.Tensor):
                return
            if site.mode == "residual":
                x = kwargs.get("hidden_states", args[0] if args else None)
                if isinstance(x, torch.Tensor) and x.shape == t.shape:
                    t = t - x
            flat = t.detach().reshape(-1)
            numel, idx = self.index.get(site.name, (None, None))
            if numel != flat.numel():
                if numel is not None:
                    raise RuntimeError(f"{site.name}: output size changed during the recording run")
                g = torch.Generator().manual_seed(self.seed + len(self.index))
                idx = torch.randperm(flat.numel(), generator=g)[:min(self.elements, flat.numel())].to(flat.device)
                self.index[site.name] = (flat.numel(), idx)
            self.records[site.name].append(flat[idx].float().cpu())
        return hook

    def __enter__(self):
        for s in self.sites:
            self.handles.append(s.module.register_forward_hook(self._hook(s), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def stacked(self) -> Tuple[List[str], torch.Tensor]:
        """Module names and a ``(steps, modules, elements)`` tensor."""
        names = [s.name for s in self.sites]
        return names, torch.stack([torch.stack(self.records[n]) for n in names], dim=1)


def replay_forecast_error(records: torch.Tensor, method: Union[str, Method], options: Dict[str, object], pattern: str,
                          backend: Optional[str] = None) -> List[float]:
    """Teacher-forced forecast error per step: ``records`` ``(steps, modules, elements)`` are
    true features along a trajectory; each method is fed the computed steps of ``pattern``
    (and, like the hooks, computes a skipped step while it is not ready) and forecasts the
    skipped ones. Returns per step the mean over modules of ``||forecast - true|| / ||true||``
    (NaN on computed steps)."""
    steps, mods, k = records.shape
    flat = records.reshape(steps, mods * k).contiguous()
    state = _api.allocate(flat[0], method, **options)
    out = torch.empty_like(flat[0])
    errs: List[float] = []
    for s in range(steps):
        true = flat[s]
        if pattern[s] == "s" and state.ready:
            _api.forecast_(state, out, 1.0, backend=backend)
            e = (out - true).reshape(mods, k).norm(dim=1) / true.reshape(mods, k).norm(dim=1).clamp_min(1e-30)
            errs.append(float(e.mean()))
        else:
            _api.update_(state, true, 1.0, backend=backend)
            errs.append(float("nan"))
    return errs


# ---------------------------------------------------------------------------------------
# running

def machine_info(threads: int, backend: str) -> Dict[str, object]:
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import diffusers

    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
                diffusers=diffusers.__version__, python=platform.python_version(), platform=platform.platform(),
                backend=backend, loadavg_start=list(load) if load else None)


def prepare_fused_ops(device, backend: Optional[str] = None) -> Tuple[str, float]:
    """Which implementation of the fused ops runs on ``device`` with ``backend`` (None: the
    package's choice, :func:`foca_kernels.get_backend`), and the seconds spent now making it
    ready: on CPU with the PyTorch backend the C loop is compiled here (once per process;
    ops/cpu_codegen.py), so that no timed run pays for it. Triton compiles each kernel on its
    first launch on CUDA: :func:`run_harness` warms those up with an untimed generation."""
    from ..ops import cpu_codegen

    device = torch.device(device)
    name = get_backend(device, backend)
    if name == "triton":
        return ("Triton interpreter" if device.type == "cpu" else f"Triton kernels on {device.type}"), 0.0
    if device.type != "cpu":
        return f"PyTorch ops on {device.type}", 0.0
    if cpu_codegen.status().startswith("off"):
        return f"PyTorch ops ({cpu_codegen.status()})", 0.0
    t0 = time.perf_counter()
    cpu_codegen.load()
    seconds = time.perf_counter() - t0
    status = cpu_codegen.status()
    if status.startswith("in use ("):
        return f"C loop, {status[len('in use ('):-1]}", seconds
    return f"PyTorch ops ({status})", seconds


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="harness", dynamic_ncols=True, leave=True)


def run_harness(config: Optional[HarnessConfig] = None, *, model=None, classifier=None,
                fid_reference: Optional[torch.Tensor] = None, log: Optional[Callable[[str], None]] = None,
                **fields) -> HarnessResult:
    """Run every (method, interval) of ``config`` (or ``HarnessConfig(**fields)``) on ``model``
    (default: the DiT named by ``config.model``, shipped or from ``config.model_dir``) and judge
    the samples with ``classifier`` (default: that model's, from ``config.model_dir`` when it has
    one there, else the shipped one; a model directory without a classifier: none, and accuracy
    and FID are NaN) against ``fid_reference`` images (default: its held-out test images, when
    it has them). Accuracy is NaN for unconditional runs (no class was requested)."""
    from .metrics import classifier_accuracy, frechet_distance, psnr, relative_l2
    from .model import load_demo_dit
    from .sampler import sample

    if config is None:
        config = HarnessConfig(**fields)
    elif fields:
        config = HarnessConfig(**{**asdict(config), **fields})
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    try:
        spec = resolve_spec(config.model, config.model_dir)
        model = load_demo_dit(spec.name, directory=config.model_dir) if model is None else model
        if classifier is None:
            classifier = _default_classifier(spec, config.model_dir)
        if fid_reference is None and classifier is not None and spec.has_data(config.fid_reference):
            fid_reference = spec.load_data(config.fid_reference)[0]
        device = next(model.parameters()).device
        backend = get_backend(device, config.backend)
        fused_ops, compile_seconds = prepare_fused_ops(device, config.backend)  # not in the first timed run
        machine = machine_info(torch.get_num_threads(), backend)
        machine.update(fused_ops=fused_ops, compile_seconds=compile_seconds)
        labels = torch.arange(config.samples) % 10
        ref_feats = classifier.features(fid_reference) if classifier is not None and fid_reference is not None \
            else None

        bar = _progress(config.total_model_steps(), config.progress)

        def run(method: str, interval: Optional[int]):
            steps = config.same_cost_steps(interval) if method == "steps" else config.num_steps
            best, best_cpu, images, velocities, info = math.inf, math.inf, None, None, None
            for rep in range(config.repeats):
                vel: List[torch.Tensor] = []

                def cb(si):
                    vel.append(si.velocity.detach().float().cpu().clone())
                    if bar is not None:
                        bar.update(1)

                if bar is not None:
                    bar.set_description(method if interval is None else f"{method} N={interval}")
                if method in BASELINES:
                    t0, c0 = time.perf_counter(), time.process_time()
                    x = sample(model, labels, seed=config.seed, num_steps=steps,
                               callback=cb, **config.sample_options())
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    inf = None
                else:
                    with cached(model, config.cache_config(method, interval, thresholds.get((method, interval)),
                                                           fitted.get((method, interval)))):
                        t0, c0 = time.perf_counter(), time.process_time()
                        x = sample(model, labels, seed=config.seed, num_steps=steps,
                                   callback=cb, **config.sample_options())
                        dt, dc = time.perf_counter() - t0, time.process_time() - c0
                        inf = cache_info(model)
                best, best_cpu = min(best, dt), min(best_cpu, dc)
                if images is None:
                    images, velocities, info = x, vel, inf
                elif not torch.equal(images, x):
                    raise RuntimeError(f"{method} N={interval}: repeated runs gave different samples")
            return images, velocities, info, (best, best_cpu), steps

        # Recording run for the teacher-forced replay, on the first (at most) probe_samples
        # samples; untimed, it is also the warm-up (first calls pay for lazy initialisation).
        probe = _Probe(model, config.cache_config("reuse", 2, stored=False), config.probe_elements, config.seed)
        with probe:
            sample(model, labels[:config.probe_samples], seed=config.seed, num_steps=config.num_steps,
                   **config.sample_options())
        probe_names, records = probe.stacked()
        if backend == "triton" and device.type != "cpu":  # Triton compiles each kernel on its first launch
            t0 = time.perf_counter()
            # (a fitted method runs TaylorSeer-2's kernels: its weights are only coefficients)
            warm = ("taylorseer2" if m in FITTED else m for m, _ in config.runs()[1:] if m not in BASELINES + ADAPTIVE)
            for method in dict.fromkeys(warm):
                with cached(model, config.cache_config(method, config.intervals[0])):
                    sample(model, labels[:config.probe_samples], seed=config.seed, num_steps=config.num_steps,
                           **config.sample_options())
            machine["compile_seconds"] += time.perf_counter() - t0

        thresholds: Dict[Tuple[str, int], float] = {}
        for method, interval in config.runs()[1:]:
            if method in ADAPTIVE:
                cal = labels if config.rcs_calibration == "samples" else labels[:config.probe_samples]
                thresholds[(method, interval)] = calibrate_rcs(model, config, method, interval, cal)

        fitted: Dict[Tuple[str, int], dict] = {}
        for method, interval in config.runs()[1:]:
            if method in FITTED:
                fitted[(method, interval)] = calibrate_fitted(model, config, FITTED[method], interval)

        full_x, full_v, _, full_t, _ = run("full", None)
        full_feats = classifier.features(full_x) if classifier is not None else None

        def judge(method, interval, x, vel, info, times, steps) -> RunResult:
            secs, cpu = times
            nan = float("nan")
            nonfinite = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            if nonfinite:  # a diverged forecast: judge it as the clipped image it would be shown as
                x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
            feats = classifier.features(x) if classifier is not None else None
            if method == "full":
                skipped, traj = 0.0, [0.0] * len(vel)
            elif method == "steps":
                skipped, traj = 1.0 - steps / config.num_steps, []
            else:
                done = info.calls_computed + info.calls_forecast
                skipped = info.calls_forecast / done if done else 0.0
                traj = [float((v - r).norm() / r.norm().clamp_min(1e-30)) for v, r in zip(vel, full_v)]
            fc: List[float] = []
            if replayable(method):  # not duca (needs the model), rfc (the inputs), rcs (no fixed pattern)
                m, opts = cache_method(method)
                opts = fitted.get((method, interval), opts)
                fc = replay_forecast_error(records, m, opts, config.schedule(interval), backend=config.backend)
            return RunResult(
                method=method, interval=interval, num_steps=steps, skipped=skipped, seconds=secs,
                speedup=full_t[0] / secs, cpu_seconds=cpu, cpu_speedup=full_t[1] / max(cpu, 1e-9),
                psnr=psnr(x, full_x), rel_l2=relative_l2(x, full_x),
                psnr_per_image=[float(v) for v in psnr(x, full_x, reduction="none")],
                accuracy=nan if feats is None or config.unconditional else classifier_accuracy(classifier, x, labels),
                fid_test=nan if feats is None or ref_feats is None else frechet_distance(feats, ref_feats),
                fid_full=nan if feats is None else frechet_distance(feats, full_feats) if method != "full" else 0.0,
                traj_err=traj, fcst_err=fc, nonfinite=nonfinite,
                calls_computed=info.calls_computed if info else 0, calls_forecast=info.calls_forecast if info else 0,
                calls_forced=info.calls_forced if info else 0, state_bytes=info.state_bytes if info else 0,
                schedule=(info.pattern if method in ADAPTIVE else config.schedule(interval))
                if interval is not None and method != "steps" else "F" * steps,
                images=x)

        results = [judge("full", None, full_x, full_v, None, full_t, config.num_steps)]
        for method, interval in config.runs()[1:]:
            x, vel, info, times, steps = run(method, interval)
            r = judge(method, interval, x, vel, info, times, steps)
            results.append(r)
            if log is not None:
                log(f"{r.label}: {r.seconds:.1f}s ({r.speedup:.2f}x), PSNR {r.psnr:.1f} dB, acc {r.accuracy:.3f}")
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(old_threads)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return HarnessResult(config=config, runs=results, labels=labels, machine=machine, probe_modules=probe_names,
                         seconds_total=time.perf_counter() - t_start)


def _default_classifier(spec, model_dir):
    """The classifier of a model: from its model directory when it has one there, else the
    shipped one of a shipped model, else None."""
    from .classifier import classifier_files, load_digits_classifier
    from .specs import MODEL_NAMES

    if model_dir is not None and all((Path(model_dir) / f).is_file() for f in classifier_files(spec.name)):
        return load_digits_classifier(directory=model_dir, name=spec.name)
    if spec.name in MODEL_NAMES:
        return load_digits_classifier(name=spec.name)
    return None


CALIBRATION_SEED_OFFSET = 1_000_003  # the calibration generation's seed: config.seed + this


def calibrate_fitted(model, config: HarnessConfig, fit: str, interval: int) -> dict:
    """The fitted method's options (weights, pattern) for ``interval``: fitted (hooks.calibrate)
    on one full-compute generation of ``calibration_samples`` samples whose noise comes from
    another seed than the judged samples', so no judged sample is seen by the fit."""
    from .sampler import sample

    labels = torch.arange(config.calibration_samples) % 10
    base = config.cache_config("taylorseer2", interval)
    with calibrate(model, base, fit=fit) as cal:
        sample(model, labels, seed=config.seed + CALIBRATION_SEED_OFFSET, num_steps=config.num_steps,
               **config.sample_options())
    return cal.method_options


def calibrate_rcs(model, config: HarnessConfig, method: str, interval: int, labels, iters: int = 10) -> float:
    """The RCS threshold at which ``method`` computes as many steps of one generation as the
    fixed schedule at ``interval`` does (bisection on log(threshold) in [1e-4, 10] over sampling
    runs of ``labels``; ends on a threshold computing at most that many steps)."""
    from .sampler import sample

    target = config.schedule(interval).count("F")

    def full_steps(th: float) -> int:
        with cached(model, config.cache_config(method, interval, th)):
            sample(model, labels, seed=config.seed, num_steps=config.num_steps, **config.sample_options())
            return cache_info(model).pattern.count("F")

    lo, hi = math.log(1e-4), math.log(10.0)  # full_steps falls as the threshold grows
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if full_steps(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def write_outputs(result: HarnessResult, out_dir, *, grid_intervals: Sequence[int] = (5, 7),
                  plot_intervals: Sequence[int] = (5, 7)) -> Dict[str, str]:
    """Write table.md, table.csv, results.json, the sample grids and the error plot into
    ``out_dir``; returns {what: path}. Intervals not in the result are replaced by the
    nearest ones that are."""
    import json
    from pathlib import Path

    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    (out / "table.md").write_text(result.to_markdown(), encoding="utf-8")
    files["table.md"] = str(out / "table.md")
    (out / "table.csv").write_text(result.to_csv(), encoding="utf-8")
    files["table.csv"] = str(out / "table.csv")
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    files["results.json"] = str(out / "results.json")
    for n in plots.pick_intervals(result, grid_intervals):
        p = plots.sample_grid(result, n, out / f"samples_N{n}.png")
        files[f"samples_N{n}.png"] = str(p)
    ns = plots.pick_intervals(result, plot_intervals)
    if ns and any(r.method not in BASELINES for r in result.runs):
        p = plots.error_plot(result, ns, out / "forecast_error.png")
        files["forecast_error.png"] = str(p)
    return files


__all__ = [
    "ADAPTIVE", "ALL_METHODS", "BASELINES", "calibrate_rcs", "CACHED", "DEFAULT_INTERVALS", "DEMO_INTERVALS",
    "DEMO_METHODS", "DEMO_SAMPLES",
    "HarnessConfig", "HarnessResult", "METHOD_ALIASES", "METHOD_NAMES", "RunResult", "cache_method", "canonical_method",
    "default_reading", "method_choices", "ordered_methods", "paired_psnr_difference",
    "replay_forecast_error", "run_harness", "write_outputs",
]
