"""What the fidelity studies share: one demo DiT, a batch of labels, its full-compute samples,
and the loop of cached generations compared with them.

A study builds a :class:`Sweep` from its command line (:func:`add_arguments`), then asks for
cached generations (:meth:`Sweep.generate`, any :class:`~foca_kernels.hooks.CacheConfig`) and
prints a table of one row per variant and one column per interval N (:meth:`Sweep.table`).
Every generation samples the same seeds as the reference: per-image PSNRs pair up.

The studies are run from the repository root with the package installed (``pip install -e``),
e.g. ``python studies/duca_study.py --model mnist``; this directory is on ``sys.path`` because
the script is in it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from foca_kernels.demo.metrics import psnr
from foca_kernels.demo.model import load_demo_dit
from foca_kernels.demo.sampler import DEFAULT_NUM_STEPS, sample
from foca_kernels.demo.specs import resolve_spec
from foca_kernels.hooks import CacheConfig, CacheInfo, cache_info, cached, duca_info

MAX_DB = 120.0  # PSNR of an image equal to the reference (instead of inf)


def add_arguments(ap: argparse.ArgumentParser, *, model: str = "digits", samples: int = 20,
                  intervals: Sequence[int] = (3, 5, 7, 9), threads: int = 1) -> argparse.ArgumentParser:
    """The options every study takes: which model, how many samples, which N, seed, threads."""
    ap.add_argument("--model", default=model, help="digits | mnist | the name of a model in --model-dir")
    ap.add_argument("--model-dir", default=None, help="a model directory (studies/train_*.py, third_model.py)")
    ap.add_argument("--samples", type=int, default=samples, help="images per run (labels i %% 10)")
    ap.add_argument("--intervals", "--n", type=int, nargs="+", default=list(intervals), help="the N of each column")
    ap.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS, help="sampling steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    return ap


@dataclass
class Run:
    """One cached generation: the samples, the cache's counters, DuCa's token counts, seconds."""

    x: torch.Tensor
    info: CacheInfo
    tokens: dict
    seconds: float


class Sweep:
    """A demo DiT, ``samples`` labels (i % 10) and their full-compute samples (the reference)."""

    def __init__(self, model: str = "digits", samples: int = 20, *, model_dir: Optional[str] = None,
                 steps: int = DEFAULT_NUM_STEPS, seed: int = 0, threads: int = 1):
        torch.set_num_threads(threads)
        self.spec = resolve_spec(model, model_dir)
        self.name, self.steps, self.seed = self.spec.name, steps, seed
        self.dit = load_demo_dit(self.spec.name, directory=model_dir)
        self.labels = torch.arange(samples) % 10
        t0 = time.perf_counter()
        self.full = sample(self.dit, self.labels, seed=seed, num_steps=steps)
        self.full_seconds = time.perf_counter() - t0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Sweep":
        return cls(args.model, args.samples, model_dir=args.model_dir, steps=args.steps, seed=args.seed,
                   threads=args.threads)

    def config(self, interval: int, **fields) -> CacheConfig:
        """A cache configuration at interval N for this sweep's number of steps."""
        return CacheConfig(interval=interval, num_inference_steps=self.steps, **fields)

    def generate(self, config: CacheConfig, *, num_steps: Optional[int] = None) -> Run:
        """The reference's labels and seeds sampled with ``config``'s cache on."""
        t0 = time.perf_counter()
        with cached(self.dit, config):
            x = sample(self.dit, self.labels, seed=self.seed, num_steps=num_steps or self.steps)
            info, tokens = cache_info(self.dit), duca_info(self.dit)
        return Run(x, info, tokens, time.perf_counter() - t0)

    def uncached(self, num_steps: int) -> torch.Tensor:
        """The reference's labels and seeds sampled with another number of steps, no cache."""
        return sample(self.dit, self.labels, seed=self.seed, num_steps=num_steps)

    def psnr_per_image(self, x: torch.Tensor) -> List[float]:
        return [float(v) for v in psnr(x, self.full, reduction="none", max_db=MAX_DB)]

    def psnr(self, x: torch.Tensor) -> float:
        """Mean PSNR (dB) of ``x`` against the full-compute samples."""
        return float(psnr(x, self.full))

    def table(self, rows: Sequence[Tuple[str, Callable[[int], str]]], intervals: Sequence[int],
              first: str = "variant") -> None:
        """Print a markdown table, one row per ``(label, cell)`` and one column per N: ``cell(N)``
        is the text of a cell. Rows are printed as they finish; the total time last."""
        print(f"| {first} | " + " | ".join(f"N={n}" for n in intervals) + " |")
        print("|---|" + "---|" * len(intervals))
        t0 = time.time()
        for label, cell in rows:
            print(f"| {label} | " + " | ".join(cell(n) for n in intervals) + " |", flush=True)
        print(f"({time.time() - t0:.0f} s)")


def paired(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> Tuple[float, float, float]:
    """Mean of a - b over paired images and its normal 95% interval."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    half = z * math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d))
    return m, m - half, m + half
