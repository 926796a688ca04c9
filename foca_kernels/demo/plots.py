"""PNG pictures of a harness result (matplotlib, drawn with the Agg canvas directly: pyplot and
the global backend are never touched).

* :func:`sample_grid`: one row per run at one interval N (full compute on top), the first
  samples of each run side by side (same seeds in every row: column ``c`` is class ``c``).
* :func:`error_plot`: per-step error curves of the caching methods (the paper's Figures 1b
  and 8b in miniature), one column per N: top, the error of the guided model output along
  the cached trajectory against full compute; bottom, the teacher-forced forecast error of
  the cached modules on the full-compute trajectory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

from .method_table import BASELINES, COLORS

def _color(method: str) -> Optional[str]:
    return COLORS.get(method)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def pick_intervals(result, wanted: Sequence[int]) -> List[int]:
    """``wanted`` intervals that the result has, else the nearest ones it has (deduplicated)."""
    have = sorted({r.interval for r in result.runs if r.interval is not None})
    if not have:
        return []
    out: List[int] = []
    for n in wanted:
        best = min(have, key=lambda h: (abs(h - n), -h))
        if best not in out:
            out.append(best)
    return out


def _short(x: float, fmt: str) -> str:
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "-"
    return fmt.format(x)


def sample_grid(result, interval: int, path, *, columns: int = 10) -> Path:
    """Samples of full compute and of every run at ``interval``, one row each, written to ``path``."""
    from .digits import image_grid

    runs = [result.full] + [r for r in result.sorted_runs() if r.interval == interval]
    ncol = min(columns, result.full.images.shape[0])
    fig = _figure(1.0 + 0.62 * ncol + 2.4, 0.25 + 0.68 * len(runs))
    top = 1.0 - 0.3 / (0.25 + 0.68 * len(runs))
    fig.subplots_adjust(left=0.2, right=0.73, top=top, bottom=0.02, hspace=0.12)
    fig.suptitle(f"Samples, same seeds in every row: full compute vs caching at N = {interval}", fontsize=10)
    for i, r in enumerate(runs):
        ax = fig.add_subplot(len(runs), 1, i + 1)
        tiles = image_grid(r.images[:ncol], nrow=ncol, upscale=1, pad=1)
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        name = f"full ({r.num_steps} steps)" if r.method == "full" else (
            f"steps ({r.num_steps} steps)" if r.method == "steps" else r.method)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9, color=_color(r.method) or "black")
        if r.method == "full":
            note = f"acc {r.accuracy:.2f}  FID {r.fid_test:.2f}"
        else:
            note = f"PSNR {_short(r.psnr, '{:.1f}')} dB  acc {r.accuracy:.2f}\n" \
                   f"rel-L2 {r.rel_l2:.3f}  {r.speedup:.2f}x"
        ax.text(1.02, 0.5, note, transform=ax.transAxes, va="center", ha="left", fontsize=8, family="monospace")
    path = Path(path)
    fig.savefig(str(path))
    return path


def error_plot(result, intervals: Sequence[int], path, *, methods: Optional[Sequence[str]] = None) -> Path:
    """Per-step error of the caching methods at each of ``intervals`` (columns); rows:
    trajectory error of the model output, teacher-forced forecast error of the cached modules."""
    methods = list(methods) if methods is not None else [m for m in result.config.methods if m not in BASELINES]
    ncol = len(intervals)
    width = max(9.0, 1.0 + 4.6 * ncol)
    fig = _figure(width, 7.6)
    fig.subplots_adjust(left=0.8 / width, right=0.98, top=0.86, bottom=0.08, hspace=0.3, wspace=0.18)
    fig.suptitle("Relative error against sampling step (log scale), same seeds as full compute.\n"
                 "Top: guided model output along the cached trajectory vs full compute (forecast error + drift).\n"
                 "Bottom: forecast error of the cached modules on the full-compute trajectory (teacher forced).\n"
                 "Dotted: computed steps. Where curves coincide, the earlier one is drawn thicker.", fontsize=9)
    axes = [[fig.add_subplot(2, ncol, row * ncol + c + 1) for c in range(ncol)] for row in range(2)]
    for c, n in enumerate(intervals):
        pattern = next((r.schedule for r in result.runs if r.interval == n and r.method not in BASELINES), "")
        for row in range(2):
            ax = axes[row][c]
            for k, ch in enumerate(pattern):
                if ch == "F" and k > 0:
                    ax.axvline(k, color="#cccccc", lw=0.6, ls=":", zorder=0)
            for i, m in enumerate(methods):  # later curves thinner: coinciding curves stay visible
                r = result.get(m, n)
                if r is None:
                    continue
                ys = r.traj_err if row == 0 else r.fcst_err
                xs = list(range(len(ys)))
                pos = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y) and y > 0]
                if not pos:
                    continue
                # NaN (computed steps) breaks the curve: one segment per window
                yy = [y if (not math.isnan(y) and y > 0) else float("nan") for y in ys]
                ax.plot(xs, yy, color=_color(m), lw=max(0.8, 3.0 - 0.5 * i), marker="." if row == 1 else None, ms=3,
                        label=f"{m} (mean {_nanmean(ys):.3g})")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlim(0, result.config.num_steps - 1)
            if row == 0:
                ax.set_title(f"N = {n}", fontsize=10)
                ax.set_ylabel("rel. error of model output" if c == 0 else "")
            else:
                ax.set_xlabel("sampling step")
                ax.set_ylabel("rel. forecast error (modules)" if c == 0 else "")
            ax.legend(fontsize=7, loc="best")
    path = Path(path)
    fig.savefig(str(path))
    return path


def _nanmean(v) -> float:
    vals = [x for x in v if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


__all__ = ["COLORS", "error_plot", "pick_intervals", "sample_grid"]
