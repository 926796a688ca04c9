"""Fit the ``fitted`` method's weights to a model on one full-compute generation.

    from foca_kernels.hooks import calibrate, enable_cache
    with calibrate(pipe, interval=5) as cal:       # the schedule the weights are for (fit="free")
        image = pipe(prompt, num_inference_steps=50).images[0]   # computed in full: a real image
    enable_cache(pipe, cal.config)                 # method="fitted" with the fitted weights
    cal.save("weights.json")                       # later: enable_cache(pipe, interval=5, **load_calibration(...))

Inside the block every module is computed at every step (the generation is exactly the uncached
one), while the cache is kept as the schedule says: full steps feed the states as usual, and at
each step the schedule would skip, the computed value ``Y`` of every cached module is compared
with TaylorSeer-2's terms ``D0, D1 x, D2 x^2/2`` over the states (methods/fitted.py). Five dot
products per stream and step are summed on the device (fp64, no host sync); at the end of the
block they are read once, each stream's sums are divided by its ``|Y - D0|^2`` (so that every
module counts alike, whatever the size of its features) and pooled over the streams, and one
pair (a, c) per skipped step is the least-squares solution of ``Y - D0 ~ a D1 x + c D2 x^2/2``:

* ``fit="free"`` (default): a and c together (reuse, a = c = 0, is in reach; lines are exact
  only where the fitted a is 1, which the fit finds on data that lie on lines).
* ``fit="line"``: a = 1, only c is fitted. The forecast is then exact on every trajectory
  linear in time, like TaylorSeer's and FoCa's; in closed loop it measured worse than
  TaylorSeer-2 (docs/fidelity.md, "A forecaster fitted per model").

A pair is clipped to ``A_RANGE`` x ``C_RANGE``; where the curvature term is (near) zero on every
stream (fewer than three values held, or features on a line) c keeps TaylorSeer-2's 1.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..methods import Fitted
from ..methods.fitted import Key
from .apply import _controllers, disable_cache, enable_cache
from .config import CacheConfig

A_RANGE = (0.0, 1.5)
C_RANGE = (-1.0, 2.0)
FITS = ("line", "free")
CHECK_RULES = ("mean", "confident")  # Calibration.check(keep=...)
_DEGENERATE = 1e-10  # |K|^2 below this (relative to |D1 x|^2 + |Y - D0|^2): no curvature to fit


class Calibration:
    """The running sums of one calibration, and the weights fitted from them."""

    def __init__(self, config: CacheConfig, fit: str = "free"):
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.fit = fit
        self.base_config = config
        self.sums: Dict[Key, List[torch.Tensor]] = {}
        self._window: Dict[int, Tuple[int, int]] = {}  # id(state) -> (n_full, skips seen in its window)
        self.steps: Dict[int, str] = {}  # step index -> "F" | "s"
        self.weights: Optional[Dict[Key, Tuple[float, float]]] = None
        self.observed = 0  # skipped calls observed
        self.choice: Optional[str] = None  # check(): "fitted" or "taylorseer"
        self.check_scores: Optional[dict] = None

    # ---- during the generation ------------------------------------------------------------
    def mark(self, step: int, full: bool) -> None:
        self.steps[step] = "F" if full else "s"

    def observe(self, group, tensors: List[torch.Tensor], tau: float) -> None:
        """The computed outputs ``tensors`` of a call the schedule skips (the group is ready)."""
        h = tau - group.last_tau
        self.observed += 1
        for stream, y in zip(group.streams, tensors):
            st = stream.state
            n_full, k = self._window.get(id(st), (-1, 0))
            k = k + 1 if n_full == st.n_full else 1
            self._window[id(st)] = (st.n_full, k)
            ctx = st.context(st.t + h)
            ctx.memo = {"k": k - 1}
            method: Fitted = st.method
            key = method.key(ctx)
            d0, b1, k2 = (self._tensor(st, combo, y) for combo in method.basis(ctx))
            with torch.no_grad():
                r = y.detach().float() - d0
                dots = torch.stack([
                    _dot(r, b1), _dot(r, k2), _dot(b1, b1), _dot(b1, k2), _dot(k2, k2), _dot(r, r)])
            self.sums.setdefault(key, []).append(dots)

    @staticmethod
    def _tensor(st, combo, like) -> torch.Tensor:
        out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        for role, coef in combo.items():
            out.add_(st.role(role).float(), alpha=coef)
        return out

    # ---- after it ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Read the sums (one host transfer) and fit one (a, c) per skipped step."""
        weights: Dict[Key, Tuple[float, float]] = {}
        for key, rows in sorted(self.sums.items()):
            s = torch.stack(rows).cpu().tolist()
            rb, rk, bb, bk, kk = 0.0, 0.0, 0.0, 0.0, 0.0
            for r_b, r_k, b_b, b_k, k_k, r_r in s:
                if not all(math.isfinite(v) for v in (r_b, r_k, b_b, b_k, k_k, r_r)) or r_r <= 0:
                    continue  # a stream with nothing to fit (or a non-finite value) is left out
                rb += r_b / r_r
                rk += r_k / r_r
                bb += b_b / r_r
                bk += b_k / r_r
                kk += k_k / r_r
            weights[key] = _solve(self.fit, rb, rk, bb, bk, kk)
        self.weights = weights
        self.sums.clear()

    @property
    def pattern(self) -> Optional[str]:
        """The schedule of the calibration generation ("F" full, "s" skipped per step)."""
        if not self.steps or sorted(self.steps) != list(range(len(self.steps))):
            return None
        return "".join(self.steps[i] for i in range(len(self.steps)))

    @property
    def method_options(self) -> dict:
        if self.weights is None:
            raise RuntimeError("the calibration has not finished: run one generation inside `with calibrate(...)`")
        if not self.weights:
            raise RuntimeError(
                "the calibration saw no skipped step with a ready cache: run one whole generation inside the "
                "`with calibrate(...)` block, with a schedule that skips steps")
        return {"weights": dict(self.weights), "pattern": self.pattern}

    @property
    def config(self) -> CacheConfig:
        """The calibration's CacheConfig with method "fitted" and the fitted weights."""
        return replace(self.base_config, method="fitted", method_options=self.method_options)

    def check(self, model_or_pipeline, generate: Callable[[], Any], reference, *,
              keep: str = "confident") -> CacheConfig:
        """Keep the fitted weights only if they hold in closed loop: run ``generate()`` (the
        calibration generation again, same seed) once cached with the fitted weights and once
        with TaylorSeer-2, score each sample (first dimension of the output) by its closeness to
        ``reference`` (the calibration generation's own output: its full compute; -10 log10 MSE,
        i.e. PSNR up to a constant), and return the config that ``keep`` picks:

        * ``"confident"`` (default): the fit only if the one-sided 95% lower bound of the mean
          paired difference (fit minus TaylorSeer-2, per sample; Student t) is above zero, so a
          batch that favours the fit by less than its own noise keeps TaylorSeer-2. Needs >= 2
          samples. Chosen by a rule written before its runs (docs/fidelity.md, "The fitted
          forecaster, kept only with confidence"): within 0.1 dB of TaylorSeer-2 or better in
          every cell of a held-out grid;
        * ``"mean"``: the fit if its mean score over the batch is higher (missed that bar in 2 of
          112 cells of the earlier grid).

        ``self.choice`` says which ("fitted" or "taylorseer"), ``self.check_scores`` the mean
        scores, ``self.check_difference`` the mean paired difference and its lower bound; the
        cache is disabled again afterwards. Costs two cached generations."""
        if keep not in CHECK_RULES:
            raise ValueError(f"check: keep must be one of {CHECK_RULES}, got {keep!r}")
        ref = _as_tensor(reference)
        if keep == "confident" and (ref.dim() < 2 or ref.shape[0] < 2):
            raise ValueError("check: keep='confident' needs a batch of >= 2 samples (first dimension) for its "
                             f"paired bound, the reference has shape {tuple(ref.shape)}; generate a batch (e.g. "
                             "num_images_per_prompt=8) or pass keep='mean'")
        fitted, ts2 = self.config, replace(self.base_config, method="taylorseer", method_options={"order": 2})
        per_sample = {}
        for name, cfg in (("fitted", fitted), ("taylorseer", ts2)):
            enable_cache(model_or_pipeline, cfg)
            try:
                out = _as_tensor(generate())
            finally:
                disable_cache(model_or_pipeline)
            if out.shape != ref.shape:
                raise ValueError(f"check: generate() returned shape {tuple(out.shape)}, the reference has "
                                 f"{tuple(ref.shape)}: it must repeat the calibration generation")
            per_sample[name] = _log_closeness(out, ref)
        d = per_sample["fitted"] - per_sample["taylorseer"]
        mean = float(d.mean())
        low = mean - t_quantile_95(d.numel() - 1) * float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else mean
        self.check_scores = {k: float(v.mean()) for k, v in per_sample.items()}
        self.check_difference = (mean, low)
        kept = mean > 0 if keep == "mean" else low > 0
        self.choice = "fitted" if kept else "taylorseer"
        return fitted if kept else ts2

    def save(self, path) -> None:
        opts = self.method_options
        rows = [[n, k, a, c] for (n, k), (a, c) in sorted(opts["weights"].items())]
        with open(path, "w") as f:
            json.dump({"method": "fitted", "fit": self.fit, "pattern": opts["pattern"], "weights": rows}, f, indent=1)


def _as_tensor(x) -> torch.Tensor:
    """A generation's output as one float64 tensor: a tensor, a diffusers output's ``images``
    (tensor, numpy array or list of PIL images / arrays), or a one-item tuple holding a tensor."""
    if hasattr(x, "images"):
        x = x.images
    if isinstance(x, (tuple, list)) and len(x) == 1 and isinstance(x[0], torch.Tensor):
        x = x[0]
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu()
    if isinstance(x, (tuple, list)):
        return torch.stack([torch.as_tensor(np.asarray(v)) for v in x]).double()
    return torch.as_tensor(np.asarray(x)).double()


def _log_closeness(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """-10 log10(MSE) per sample (first dimension; one value for a 1-d output): PSNR up to the
    data range's constant."""
    mse = (x - ref).pow(2).flatten(1).mean(1) if x.dim() > 1 else (x - ref).pow(2).mean().reshape(1)
    return -10 * torch.log10(mse.clamp_min(1e-300))


def t_quantile_95(df: int) -> float:
    """The 0.95 quantile of Student's t with ``df`` degrees of freedom: the CDF integrated
    numerically (Simpson, 4096 intervals), then bisected; accurate to ~1e-6."""
    if df < 1:
        raise ValueError(f"t_quantile_95 needs df >= 1, got {df}")
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        n = 4096
        h = x / n
        f = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 8.0
    while cdf(hi) < 0.95:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum()


def _clip(v: float, lo_hi: Tuple[float, float]) -> float:
    return min(max(v, lo_hi[0]), lo_hi[1])


def _solve(fit: str, rb: float, rk: float, bb: float, bk: float, kk: float) -> Tuple[float, float]:
    """(a, c) minimising |R - a B - c K|^2 from the pooled sums (a = 1 for fit="line")."""
    curved = kk > _DEGENERATE * (bb + 1.0)
    if fit == "line":
        return 1.0, (_clip((rk - bk) / kk, C_RANGE) if curved else 1.0)
    if not curved:
        return (_clip(rb / bb, A_RANGE) if bb > 0 else 1.0), 1.0
    det = bb * kk - bk * bk
    if det <= _DEGENERATE * bb * kk:  # the two terms are parallel: keep a at 1, fit c
        return 1.0, _clip((rk - bk) / kk, C_RANGE)
    a = (rb * kk - rk * bk) / det
    c = (rk * bb - rb * bk) / det
    return _clip(a, A_RANGE), _clip(c, C_RANGE)


def load_calibration(path) -> dict:
    """The method options saved by :meth:`Calibration.save`: ``enable_cache(pipe, interval=..,
    **load_calibration(path))`` (it includes ``method="fitted"``)."""
    with open(path) as f:
        data = json.load(f)
    if data.get("method") != "fitted" or not isinstance(data.get("weights"), list):
        raise ValueError(f"{path}: not a calibration file written by Calibration.save")
    weights = {}
    for row in data["weights"]:
        if not (isinstance(row, list) and len(row) == 4):
            raise ValueError(f"{path}: a weight row must be [n_full, k, a, c], got {row!r}")
        weights[(int(row[0]), int(row[1]))] = (float(row[2]), float(row[3]))
    return {"method": "fitted", "weights": weights, "pattern": data.get("pattern")}


@contextmanager
def calibrate(model_or_pipeline, config: Optional[CacheConfig] = None, *, fit: str = "free", **options):
    """Compute one generation in full inside the block and fit the ``fitted`` method's weights
    for ``config``'s schedule and targets (see the module docstring); yields the
    :class:`Calibration`, whose ``config`` / ``method_options`` / ``save`` hold the result."""
    config = CacheConfig.build(config, **options)
    name = None if config.method_spec is None else config.method_spec.name  # None: a Method instance
    if name == "fitted":
        config = replace(config, method_options={})
    elif name != "taylorseer" or config.parsed_options != {"order": 2}:
        raise ValueError(
            f"calibrate fits the 'fitted' method (TaylorSeer-2's terms); leave method at its default or "
            f"'fitted', got method={config.method!r} with options {config.method_options}")
    else:
        config = replace(config, method="fitted", method_options={})
    if config.schedule != "fixed":
        raise ValueError("calibrate needs a fixed schedule (interval, warmup, final or mask), not schedule='rcs'")
    cal = Calibration(config, fit)
    enable_cache(model_or_pipeline, config)
    try:
        for _, ctl in _controllers(model_or_pipeline):
            ctl.calibration = cal
        yield cal
    finally:
        disable_cache(model_or_pipeline)
    cal.finish()
