"""The ``foca-kernels`` console script.

    foca-kernels demo                      # short fidelity run on the shipped digits DiT (< 2 min on 2 CPU cores)
    foca-kernels demo --full               # the full table of docs/fidelity.md
    foca-kernels demo --model mnist        # the same on the 28x28 MNIST DiT (196 tokens)
    foca-kernels demo --model textures --model-dir /work/models/textures   # a trained model that is not shipped
    foca-kernels demo --sampler dpm --unconditional                        # DPM-Solver++(2M), null label, no CFG
    foca-kernels demo --n 5 9 --methods reuse taylorseer2 foca-r0 foca-r3 foca-r4 --samples 200
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

DEFAULT_OUT = "foca-demo-out"
FULL_SAMPLES = 100
DEMO_DEPENDENCIES = ("diffusers", "safetensors", "sklearn", "matplotlib", "PIL", "tqdm", "mlxtend")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="foca-kernels",
        description="Fused feature-caching forecasts (FoCa, TaylorSeer, reuse) for Diffusion Transformers.",
    )
    ap.add_argument("--version", action="version", version=f"foca-kernels {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="measure caching fidelity on the small trained DiTs shipped with the package",
        description=(
            "Sample the shipped class-conditional digits DiT (diffusers DiTTransformer2DModel, 50 rectified-flow "
            "Euler steps) with full compute, with fewer steps at the same cost, and with each caching method at "
            "each interval N; print speed-up, fraction skipped, PSNR / relative L2 against full compute, "
            "trajectory and forecast errors, classifier accuracy and classifier-feature FID; write the table "
            "(markdown, CSV, JSON), sample grids and a per-step error plot to --out. Without options a short "
            f"run: methods {', '.join(_demo_defaults()['methods'])}, N in "
            f"{{{', '.join(map(str, _demo_defaults()['intervals']))}}}, {_demo_defaults()['samples']} samples."
        ),
    )
    d.add_argument("--model", default=None, metavar="NAME",
                   help="shipped model: digits (8x8, 64 tokens, fast; default) or mnist (28x28, 196 tokens); with "
                        "--model-dir, the name of the model in that directory (its files are NAME_dit.json and "
                        "NAME_dit.safetensors; default: the directory's only one)")
    d.add_argument("--model-dir", type=Path, default=None, metavar="DIR",
                   help="load the model (and its classifier and held-out images, when there) from a model directory "
                        "written by a study script (studies/train_*.py, studies/third_model.py) instead of the package")
    d.add_argument("--sampler", choices=("euler", "dpm"), default="euler",
                   help="euler: rectified-flow Euler (FlowMatchEulerDiscreteScheduler, default); dpm: DPM-Solver++(2M) "
                        "on flow sigmas (DPMSolverMultistepScheduler); both one model call per step")
    d.add_argument("--unconditional", action="store_true",
                   help="sample with the null label only, no classifier-free guidance (one model call per step); "
                        "accuracy is not measured")
    d.add_argument("--full", action="store_true",
                   help=f"the full table: every method, N in {{2, 3, 5, 7, 9}}, {FULL_SAMPLES} samples "
                        "(7-10 minutes on 2 shared CPU cores; the tables of docs/fidelity.md)")
    d.add_argument("--n", "--intervals", dest="intervals", type=int, nargs="+", metavar="N",
                   help="cache intervals N (every N-th step computed)")
    d.add_argument("--methods", nargs="+", metavar="M",
                   help=f"runs, any of: {_method_choices()}; steps = fewer steps at the same cost, foca-bdf2 = r0 "
                        "with the bdf2 anchor, rfc = RFE over FoCa r7, *-rcs = the adaptive RCS schedule (threshold "
                        "calibrated per N to the fixed schedule's compute); 'full' is always run")
    d.add_argument("--samples", type=int,
                   help="images per run (labels i %% 10; >= 2: the FID and the paired intervals need two)")
    d.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps of the full run, >= 2 (default {_demo_defaults()['steps']})")
    d.add_argument("--seed", type=int, default=0, help="sample i starts from the noise of seed SEED + i (default 0)")
    d.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, a finite number >= 0 (1: none; default: the sampler's)")
    d.add_argument("--warmup", type=int, default=None,
                   help="first steps always computed, fewer than --steps (default: CacheConfig's)")
    d.add_argument("--final", type=int, default=None, help="last steps always computed (default: CacheConfig's)")
    d.add_argument("--granularity", choices=("module", "block"), default="module",
                   help="cache attention/feed-forward modules (default) or whole blocks' residuals")
    d.add_argument("--compute-blocks", type=int, nargs="+", default=None, metavar="K",
                   help="K [J]: compute the first K (and last J) blocks at every step, DBCache's Fn (and Bn) "
                        "(CacheConfig.compute_blocks; default 0)")
    d.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="fused-op implementation (auto: Triton on CUDA or with TRITON_INTERPRET=1, else the C loop "
                        "on CPU when it compiles, else PyTorch; triton on CPU needs TRITON_INTERPRET=1)")
    d.add_argument("--state-dtype", choices=("float32", "float16", "bfloat16", "float8_e4m3fn"), default=None,
                   help="cache state storage (CacheConfig.state_dtype; default: the model's dtype); float8_e4m3fn: "
                        "16-bit anchor + e4m3 increments, closed-form methods only (taylorseer*, foca-r3/r6/r7)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine two OpenMP threads fighting other "
                        "jobs were measured 3-4x slower than one; 0 = torch's choice)")
    d.add_argument("--repeats", type=int, default=1, help="timed repetitions per run, the fastest counts")
    d.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default ./{DEFAULT_OUT})")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--untrained", action="store_true", help=argparse.SUPPRESS)  # tests: seeded random weights
    return ap


def _demo_defaults():
    """The short run's methods (canonical names, table order: as the banner prints them), N and samples."""
    from .demo.harness import DEMO_INTERVALS, DEMO_METHODS, DEMO_SAMPLES, DEMO_STEPS, ordered_methods

    return dict(methods=ordered_methods(DEMO_METHODS), intervals=DEMO_INTERVALS, samples=DEMO_SAMPLES,
                steps=DEMO_STEPS)


def _method_choices() -> str:
    from .demo.harness import method_choices

    return method_choices()


def _run_settings(args):
    """(methods, intervals, samples, steps, warmup, final) the demo runs with: the arguments given,
    else the defaults of the short run (or of --full)."""
    from .demo.harness import ALL_METHODS, DEFAULT_INTERVALS, HarnessConfig

    defaults = _demo_defaults()
    if args.full:
        methods, intervals, samples = ALL_METHODS, DEFAULT_INTERVALS, FULL_SAMPLES
    else:
        methods, intervals, samples = defaults["methods"], defaults["intervals"], defaults["samples"]
    return (args.methods or methods, args.intervals or intervals, FULL_SAMPLES if args.samples is None and args.full
            else args.samples if args.samples is not None else samples,
            defaults["steps"] if args.steps is None else args.steps,
            HarnessConfig.warmup if args.warmup is None else args.warmup,
            HarnessConfig.final if args.final is None else args.final)


def _untrained_model():
    import torch

    from .demo.model import build_digits_dit

    torch.manual_seed(0)
    return build_digits_dit(init=False).eval().requires_grad_(False)


def demo(args) -> int:
    from .demo.harness import HarnessConfig, prepare_fused_ops, run_harness, write_outputs

    methods, intervals, samples, steps, warmup, final = _run_settings(args)
    cfg = HarnessConfig(
        methods=methods,
        intervals=intervals,
        samples=samples,
        num_steps=steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        warmup=warmup,
        final=final,
        model=args.model,
        model_dir=None if args.model_dir is None else str(args.model_dir),
        sampler=args.sampler,
        unconditional=args.unconditional,
        granularity=args.granularity,
        **({} if args.compute_blocks is None else {"compute_blocks": tuple(args.compute_blocks + [0])[:2]}),
        backend=None if args.backend == "auto" else args.backend,
        state_dtype=args.state_dtype,
        repeats=args.repeats,
        threads=args.threads or None,
        progress=not args.no_progress,
    )
    model = _untrained_model() if args.untrained else None
    what = ("UNTRAINED (seeded random) digits DiT" if args.untrained else f"shipped {args.model} DiT"
            if args.model_dir is None else f"{args.model} DiT from {args.model_dir}")
    what += f", {cfg.sampler} sampler" + (", unconditional" if cfg.unconditional else "")
    print(f"foca-kernels demo: {what}, {cfg.samples} samples x {cfg.num_steps} steps, "
          f"warm-up {cfg.warmup}, final {cfg.final}, {cfg.granularity} granularity"
          + (f", compute_blocks {cfg.compute_blocks}" if any(cfg.compute_blocks) else "") + "; "
          f"runs: {', '.join(cfg.methods)}; N in {{{', '.join(map(str, cfg.intervals))}}}", flush=True)
    t0 = time.perf_counter()
    fused, seconds = prepare_fused_ops("cpu", cfg.backend)  # the demo's models run on the CPU
    print(f"fused ops: {fused}" + (" (now, before the timed runs)" if seconds >= 0.05 else ""), flush=True)
    res = run_harness(cfg, model=model)
    files = write_outputs(res, args.out)
    m = res.machine
    print()
    print(res.to_text(), end="")
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"fused ops: {m['fused_ops']}; load average at start {_load(m.get('loadavg_start'))}")
    print(f"columns: skipped = fraction of cached-module calls forecast (steps: of the {cfg.num_steps}-step compute "
          "not done); "
          "speed-up = full time / run time;\n  PSNR, rel-L2 = final samples vs full compute (same seeds); "
          "traj err = mean per-step rel. error of the model output vs full;\n  fcst err = mean teacher-forced forecast "
          "error of the cached modules; accuracy = the model's classifier on the requested class;\n  FID test / full = "
          "Frechet distance in the classifier's feature space to the test digits / to the full-compute samples.")
    for line in _summary(res):
        print(line)
    print(f"\nwrote {len(files)} files to {args.out}/: {', '.join(sorted(Path(p).name for p in files.values()))}")
    print("full tables and how to read them: docs/fidelity.md")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


def _load(v) -> str:
    return "-" if not v else " ".join(f"{x:.2f}" for x in v)


def _summary(res) -> List[str]:
    from .demo.harness import BASELINES, canonical_method, paired_psnr_difference

    default = canonical_method("taylorseer2")  # what CacheConfig() runs (tests/test_cli_args.py pins it)
    lines = []
    for n in res.config.intervals:
        rows = [r for r in res.runs if r.interval == n and r.method not in BASELINES]
        if len(rows) < 2:
            continue
        best = max(rows, key=lambda r: r.psnr)
        line = f"N={n}: closest to full compute: {best.method} (PSNR {best.psnr:.1f} dB, rel-L2 {best.rel_l2:.4f})"
        ours = next((r for r in rows if r.method == default), None)
        if ours is not None:
            diffs = []
            for other in rows:
                if other is ours:
                    continue
                try:
                    m, lo, hi = paired_psnr_difference(ours, other)
                except ValueError:
                    continue
                diffs.append(f"{other.method} {m:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            if diffs:
                line += f"\n  {default} minus (paired, dB, 95% CI): " + "; ".join(diffs)
        lines.append(line)
    return (["", *lines] if lines else [])


def _validate_args(ap: argparse.ArgumentParser, args) -> None:
    """Refuse bad demo arguments with a usage message before any work (no `x or default`
    may turn a 0 into the default, no run may fail halfway or at the end, nothing may be
    accepted that makes the run measure nothing)."""
    demo_ap = ap._subparsers._group_actions[0].choices["demo"]  # for the subcommand's usage line

    def at_least(name, value, low, note=""):
        if value is not None and value < low:
            demo_ap.error(f"--{name} must be >= {low}{note}, got {value}")

    from .demo.specs import MODEL_NAMES, resolve_spec

    if args.model_dir is None:
        args.model = "digits" if args.model is None else args.model
        if args.model not in MODEL_NAMES:
            demo_ap.error(f"--model: {args.model!r} is not a shipped model ({', '.join(MODEL_NAMES)}); a model "
                          "trained elsewhere needs --model-dir DIR")
    else:
        try:
            args.model = resolve_spec(args.model, args.model_dir).name
        except ValueError as e:
            demo_ap.error(f"--model-dir: {e}")
    g = args.guidance_scale
    if g is not None and not 0.0 <= g < math.inf:  # nan fails both comparisons
        demo_ap.error(f"--guidance-scale must be a finite number >= 0 (1: no guidance; a negative scale steers "
                      f"away from the requested class, which the accuracy column measures), got {g}")
    if args.unconditional and g is not None and g != 1.0:
        demo_ap.error(f"--unconditional has no guidance; --guidance-scale {g} makes no sense with it")
    if args.untrained and (args.model != "digits" or args.model_dir is not None):
        demo_ap.error("--untrained builds the digits DiT; it takes no --model/--model-dir")
    at_least("samples", args.samples, 2, " (the FID and the paired intervals need two samples)")
    at_least("steps", args.steps, 2, " (one step leaves nothing to cache)")
    at_least("warmup", args.warmup, 1, " (the first step has nothing to forecast from)")
    at_least("final", args.final, 0)
    at_least("threads", args.threads, 0, " (0: torch's choice)")
    cores = os.cpu_count() or 1
    if args.threads is not None and args.threads > cores:
        demo_ap.error(f"--threads {args.threads}: more than this machine's {cores} cores (extra threads only "
                      "compete with each other)")
    at_least("repeats", args.repeats, 1)
    at_least("seed", args.seed, 0)
    for n in args.intervals or ():
        if n < 1:
            demo_ap.error(f"--n: every interval must be >= 1, got {n}")
    if args.methods:
        from .demo.harness import canonical_method

        for m in args.methods:
            try:
                canonical_method(m)
            except ValueError as e:
                demo_ap.error(f"--methods: {e}")

    methods, intervals, samples, steps, warmup, final = _run_settings(args)
    if args.seed + samples > 2 ** 63:
        demo_ap.error(f"--seed {args.seed}: sample i uses seed SEED + i, which must stay below 2**63 "
                      f"({samples} samples)")
    if warmup + final >= steps:
        what = f"--warmup {warmup}" + (f" + --final {final}" if final else "")
        demo_ap.error(f"{what}: the warm-up and final steps together must be fewer than the {steps} steps "
                      f"(--steps), or nothing is cached")
    free = steps - warmup  # steps after the warm-up: an interval longer than this computes none of them
    long = [n for n in intervals if n > free]
    if long:
        given = "" if args.intervals else " (the default --n)"
        demo_ap.error(f"--n {' '.join(map(str, long))}{given}: an interval N longer than the {free} steps after the "
                      f"{warmup} warm-up step(s) of {steps} computes none of them (the run would extrapolate the "
                      f"warm-up to the end); use N <= {free}")
    if args.compute_blocks is not None:
        if len(args.compute_blocks) > 2:
            demo_ap.error(f"--compute-blocks takes K or K J, got {len(args.compute_blocks)} numbers")
        for v in args.compute_blocks:
            if v < 0:
                demo_ap.error(f"--compute-blocks: every count must be >= 0, got {v}")
        blocks = _model_blocks(resolve_spec(args.model, args.model_dir))
        if blocks is not None and sum(args.compute_blocks) >= blocks:
            demo_ap.error(f"--compute-blocks {' '.join(map(str, args.compute_blocks))}: the {args.model} DiT has "
                          f"{blocks} blocks, so every block would be computed and nothing cached")
    if args.state_dtype is not None:  # e.g. fp8 storage holds closed forms only: refused per method, now
        import torch

        from .demo.harness import BASELINES, cache_method, ordered_methods
        from .hooks import CacheConfig

        for m in ordered_methods(methods):
            if m not in BASELINES:
                name, opts = cache_method(m)
                try:
                    CacheConfig(method=name, method_options=opts, state_dtype=getattr(torch, args.state_dtype))
                except ValueError as e:
                    given = "" if args.methods else " (a default method; choose --methods)"
                    demo_ap.error(f"--state-dtype {args.state_dtype} with --methods {m}{given}: {e}")
    if args.backend == "triton":
        from .backend import get_backend

        try:
            get_backend("cpu", "triton")  # the demo's models run on the CPU
        except RuntimeError as e:
            demo_ap.error(f"--backend triton: {e} (e.g. TRITON_INTERPRET=1 foca-kernels demo --backend triton ...)")
    problem = _unwritable(args.out)
    if problem:
        demo_ap.error(f"--out {args.out}: {problem}")


def _model_blocks(spec) -> Optional[int]:
    """Transformer blocks of a demo model (its config's num_layers, else diffusers' default);
    None when diffusers is missing (the demo then reports the missing extra)."""
    if "num_layers" in spec.dit_config:
        return int(spec.dit_config["num_layers"])
    try:
        import inspect

        from diffusers import DiTTransformer2DModel
    except ModuleNotFoundError:
        return None
    return int(inspect.signature(DiTTransformer2DModel.__init__).parameters["num_layers"].default)


def _unwritable(out: Path) -> Optional[str]:
    """Why files cannot be written under ``out`` (None if they can); creates nothing that stays."""
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        return "exists and is not a directory"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {probe} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"not writable ({probe}: {e.strerror or e})"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "demo":
        _validate_args(ap, args)
    if args.command is None:
        ap.print_help()
        return 0
    if args.command == "demo":
        try:
            return demo(args)
        except ModuleNotFoundError as e:  # the demo extra is missing
            if (e.name or "").split(".")[0] not in DEMO_DEPENDENCIES:
                raise
            print(f"foca-kernels demo needs the demo extra (pip install 'foca-kernels[demo]'): {e}", file=sys.stderr)
            return 1
    ap.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
