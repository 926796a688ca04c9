"""CacheConfig: everything a user chooses when turning caching on (validated on creation)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..methods import Method
from ..fp8 import FP8_DTYPES, check_fp8_method, is_fp8
from ..registry import MethodSpec, method_spec
from ..state import STORAGE_DTYPES

GRANULARITIES = ("module", "block")
CACHE_MODES = ("output", "residual")
TIME_SOURCES = ("step", "timesteps", "sigmas")
SCHEDULES = ("fixed", "rcs")
RCS_REDUCE = ("max", "sum")

Target = Union[str, Tuple[str, str]]  # regex, or (regex, "output" | "residual")
Mask = Union[Sequence[bool], Callable[[int, Optional[int]], bool]]


class FocaCacheWarning(UserWarning):
    """Something the cache handled on its own but the user should know (e.g. a reset)."""


@dataclass
class CacheConfig:
    """How to cache a model's modules.

    Schedule (per model call, i.e. per sampling step of one cache context):
      interval: N. After the warm-up, N-1 forecast steps then one full step, repeated
          ("FoCa (N=5)" in the paper). ``interval=1`` computes every step.
      warmup: steps computed fully at the start (>= 1: the first step has nothing to forecast).
      final: steps computed fully at the end. Needs the number of steps: taken from
          ``num_inference_steps`` here, else from the diffusers cache context, else from the
          pipeline's scheduler (when :func:`enable_cache` got a pipeline). Ignored (with a
          warning) when none of these is known.
      mask: explicit per-step schedule instead of interval/warmup/final: a sequence of bools
          (True = compute; steps past its end are computed) or a callable
          ``(step, num_steps_or_None) -> bool``.
      A module that has not seen enough full steps for its method (FoCa: 2) is computed on a
      skipped step, so the first forecasts of a generation may come one step later.

    Method: ``method`` "taylorseer" (default: order 2) | "foca" | "reuse" ("fora") | "rfc" | "fitted" |
      "duca" (the names of foca_kernels/registry.py, which parses ``method_options`` once, on
      creation: :attr:`method_spec`, :attr:`parsed_options`; or a :class:`foca_kernels.Method`),
      ``method_options`` e.g. ``{"order": 1}`` (TaylorSeer) or
      ``{"reading": "r7"}`` (FoCa: "calibrated" (FoCa's default) | "r7" | "r3" | "r0", see
      docs/method.md; ``{"reading": "r0", "anchor": "bdf2"}``; the study readings r4 and r6 only as a
      Method, ``method=make_foca(reading="r6")``). TaylorSeer-2 is the default because it
      has the best worst case over the models, step counts and intervals measured (docs/fidelity.md,
      "The default by its worst case"); FoCa calibrated is better on some of them and up to 1.8 dB
      worse on others.
      ``state_dtype`` stores the cached tensors in another precision (e.g. torch.bfloat16
      for an fp32 model); None keeps the features' dtype. torch.float8_e4m3fn (closed-form
      methods: TaylorSeer, FoCa r3 / r7) keeps a 16-bit anchor and e4m3 increments with
      per-token scales (docs/method.md, "fp8 state").

    What is cached:
      granularity "module" (paper: attention and feed-forward outputs of each block; FLUX:
          image and text streams of the double blocks, and the single blocks) or "block" (each
          block's output or residual, see ``block_cache``).
      targets: regexes (``re.fullmatch`` on names from ``model.named_modules()``) replacing the
          model-family defaults; an entry may be ``(regex, "output" | "residual")``. Plain
          strings cache the module's output at "module" granularity and follow
          ``block_cache`` at "block" granularity. Needed for models the package does not know.
      block_cache: "residual" (output minus the matching input, re-added on skipped steps)
          or "output" (the block output itself).
      compute_blocks: k, or (k, j): the first k (and last j) blocks of each block list are
          computed at every step, as cache-dit's DBCache Fn (and Bn) compute blocks: cached
          targets inside them (modules at "module" granularity, the blocks at "block") are
          not cached. A block list is the outermost nn.ModuleList / nn.Sequential on a
          target's path (``transformer_blocks``; FLUX: ``transformer_blocks`` and
          ``single_transformer_blocks``, each counted separately). 0 (default): none. An
          int is stored as (k, 0). Refused when no target lies in a block list or when it
          would leave nothing to cache.

    Time:
      time "step": h = 1 per step (every public implementation; the paper's h);
          "timesteps": h = |t_k - t_(k-1)| from the ``timestep`` argument the model receives;
          "sigmas": h = |sigma_k - sigma_(k-1)| from the diffusers cache context's ``sigma``,
          else from the pipeline scheduler's ``sigmas`` (needs a pipeline).
      timestep_arg: name (or positional index) of the model's timestep argument.
      num_inference_steps: steps per generation if known in advance.
      detect_new_generation: start over when a model call starts a new generation (a
          sampling run). Two generations are never joined: the boundary comes from facts the
          host has for free where they exist (an explicit :func:`~foca_kernels.new_generation`
          or ``with generation(model):``; the pipeline's call and its scheduler's new
          timesteps; a step index from ``cache_context``; the step count reaching
          ``num_inference_steps``), and from the timesteps: the first one seen again, or
          timesteps turning back, or jumping far ahead of their spacing. A timestep is read
          where that is free (CPU tensors, numbers); see ``sync`` for GPU tensors.
      sync: whether the hooks may read a GPU timestep tensor as a number (one host-device sync
          per model call). None (default): only when nothing free tells generations apart (a
          bare model with no num_inference_steps and no new_generation/generation()) or
          time="timesteps" has no other source; it then warns once, naming the cheaper
          options. True: read every call. False: never; a bare model's generations are then
          found only from num_inference_steps or explicit calls (warned once otherwise).

    Non-finite outputs: ``check_finite=True`` checks every computed output that would feed a
      cache (one reduction and host sync per output) and, when it holds nan/inf, resets that
      module's cache instead of feeding it (warning once), so no later forecast inherits the
      value. Off by default: FoCa would otherwise carry it to the end of the generation.

    Adaptive schedule: ``schedule="rcs"`` (relational cache scheduling, docs/hooks.md) decides
      each model call at its first cached module from the relative error of a forecast of that
      module's input: full when it exceeds ``rcs_threshold`` or after ``rcs_max_gap`` steps
      (``warmup`` and ``final`` still apply; ``interval`` and ``mask`` do not). One host read of
      one scalar per decided step. Under torch.distributed the estimate is all-reduced
      (``rcs_reduce`` "max": data parallel; "sum": token shards) in ``rcs_group``.

    Buffers: ``reuse_output_buffers`` writes forecasts into one preallocated tensor per
      cached output (no allocation per step; a value returned on a skipped step is
      overwritten at the next skipped step of the same module). False allocates each time.
      ``max_pending_bytes``: a full step's module outputs are kept until the end of the model
      call and then written into their states together (one grouped update, a fixed number of
      launches whatever the number of modules); when the kept outputs exceed this many bytes
      they are written at once (more groups per step, less memory). 0 writes each module's
      outputs when it returns. Residuals (the stream's own scratch) count only when
      ``reuse_output_buffers`` is False.
    """

    interval: int = 3
    warmup: int = 2
    final: int = 0
    method: Union[str, Method] = "taylorseer"
    method_options: Dict[str, Any] = field(default_factory=dict)
    state_dtype: Optional[torch.dtype] = None
    granularity: str = "module"
    targets: Optional[Sequence[Target]] = None
    block_cache: str = "residual"
    compute_blocks: Union[int, Tuple[int, int]] = 0  # first k (and last j) blocks always computed
    mask: Optional[Mask] = None
    time: str = "step"
    timestep_arg: Union[str, int] = "timestep"
    num_inference_steps: Optional[int] = None
    detect_new_generation: bool = True
    reuse_output_buffers: bool = True
    max_pending_bytes: int = 256 << 20  # full-step outputs kept for the call's grouped update
    default_context: str = "default"
    backend: Optional[str] = None  # force "triton" / "torch" for the fused ops; None = auto
    check_finite: bool = False  # reset a module's cache when its computed output holds nan/inf
    sync: Optional[bool] = None  # read GPU timestep tensors: None only when needed (warned), True always, False never
    # ---- schedule "rcs" (relational cache scheduling, hooks/rcs.py) ----
    schedule: str = "fixed"  # "fixed" (interval/warmup/final/mask) | "rcs" (adaptive, per model call)
    rcs_threshold: float = 0.05  # compute fully when the input-forecast relative error exceeds this
    rcs_max_gap: int = 10  # ... or when this many steps passed since the last full compute
    rcs_accumulate: bool = True  # compare the sum of the estimates since the last full step
    rcs_reduce: str = "max"  # across ranks: "max" (data parallel) | "sum" (sequence-sharded tokens)
    rcs_group: Any = None  # torch.distributed process group (None: the default group)

    def __post_init__(self):
        for name in ("interval", "warmup", "final"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first step has nothing to forecast from), got {self.warmup}")
        if self.final < 0:
            raise ValueError(f"final must be >= 0, got {self.final}")
        self.method_options = dict(self.method_options or {})
        self._parse_method()  # validates method + options now rather than at the first step
        if is_fp8(self.state_dtype):  # anchor + e4m3 increments: closed-form methods only (foca_kernels/fp8.py)
            if self.method_spec is not None and self.method_spec.hook_level:
                raise ValueError(f"fp8 state storage applies to closed-form methods (taylorseer, foca reading r3 / "
                                 f"r7); method {self.method_spec.name!r} rewrites token rows of its stored value; "
                                 "use state_dtype=torch.bfloat16")
            check_fp8_method(self.make_method())
        elif self.state_dtype is not None and self.state_dtype not in STORAGE_DTYPES:
            raise TypeError(f"state_dtype must be None or one of {STORAGE_DTYPES + FP8_DTYPES}, got {self.state_dtype}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.block_cache not in CACHE_MODES:
            raise ValueError(f"block_cache must be one of {CACHE_MODES}, got {self.block_cache!r}")
        cb = self.compute_blocks
        cb = (cb, 0) if isinstance(cb, int) and not isinstance(cb, bool) else cb
        if not (isinstance(cb, (tuple, list)) and len(cb) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cb)):
            raise ValueError(f"compute_blocks must be an int k >= 0 or a pair (k, j) of ints >= 0, "
                             f"got {self.compute_blocks!r}")
        self.compute_blocks = (int(cb[0]), int(cb[1]))
        if self.time not in TIME_SOURCES:
            raise ValueError(f"time must be one of {TIME_SOURCES}, got {self.time!r}")
        if self.targets is not None:
            if isinstance(self.targets, (str, bytes)):
                self.targets = [self.targets]
            for t in self.targets:
                if isinstance(t, tuple):
                    if len(t) != 2 or not isinstance(t[0], str) or t[1] not in CACHE_MODES:
                        raise ValueError(f"a target is a regex or (regex, one of {CACHE_MODES}), got {t!r}")
                elif not isinstance(t, str):
                    raise TypeError(f"a target is a regex string, got {type(t).__name__}")
            if not self.targets:
                raise ValueError("targets is empty; use None for the model family's defaults")
        if self.mask is not None and not callable(self.mask):
            self.mask = tuple(bool(m) for m in self.mask)
            if not self.mask:
                raise ValueError("mask is empty")
            if not self.mask[0]:
                warnings.warn("mask[0] is False: the first step is always computed", FocaCacheWarning, stacklevel=3)
        if self.num_inference_steps is not None and (
            isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int)
            or self.num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive int or None, got {self.num_inference_steps!r}")
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(self.check_finite).__name__}")
        m = self.max_pending_bytes
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"max_pending_bytes must be an int >= 0, got {m!r}")
        if self.sync is not None and not isinstance(self.sync, bool):
            raise TypeError(f"sync must be None or a bool, got {type(self.sync).__name__}")
        if not isinstance(self.timestep_arg, (str, int)):
            raise TypeError("timestep_arg must be an argument name or a positional index")
        self._check_rcs()

    def _check_rcs(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        t = self.rcs_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"rcs_threshold must be a finite number >= 0, got {t!r}")
        g = self.rcs_max_gap
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"rcs_max_gap must be an int >= 1, got {g!r}")
        if not isinstance(self.rcs_accumulate, bool):
            raise TypeError(f"rcs_accumulate must be a bool, got {type(self.rcs_accumulate).__name__}")
        if self.rcs_reduce not in RCS_REDUCE:
            raise ValueError(f"rcs_reduce must be one of {RCS_REDUCE}, got {self.rcs_reduce!r}")
        if self.schedule == "rcs":
            if self.mask is not None:
                raise ValueError("schedule='rcs' decides every step itself: it takes no mask")
            if self.method_spec is not None and self.method_spec.hook_level:
                raise ValueError(f"schedule='rcs' is not available with method {self.method_spec.name!r} "
                                 "(its phases follow the fixed schedule)")

    @classmethod
    def build(cls, config: Optional["CacheConfig"] = None, **options) -> "CacheConfig":
        """``config`` (or the defaults) with ``options`` applied: CacheConfig fields, and any other
        keyword as a method option (``anchor="bdf2"``, ``order=2``), as :func:`foca_kernels.allocate`
        takes them; they are merged into ``method_options``."""
        if config is not None and not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in options.items() if k not in names}
        fields = {k: v for k, v in options.items() if k in names}
        if extra:
            base = fields.get("method_options", config.method_options if config is not None else {})
            fields["method_options"] = {**(base or {}), **extra}
        try:
            return dataclasses.replace(config, **fields) if config is not None else cls(**fields)
        except TypeError as e:
            if not extra:
                raise
            method = fields.get("method", config.method if config is not None else cls.method)
            raise TypeError(
                f"unknown option(s) {sorted(extra)}: neither CacheConfig fields nor options of method {method!r} ({e})"
            ) from None

    def _parse_method(self) -> None:
        """The method's registry entry and its options, parsed once (foca_kernels/registry.py)."""
        if isinstance(self.method, Method):
            if self.method_options:
                raise TypeError("method_options given together with a Method instance")
            spec, parsed = None, None
        else:
            spec = method_spec(self.method)
            parsed = spec.parse(self.method_options)
        self._parsed_from = (self.method, self.method_options)
        self._spec, self._parsed = spec, parsed

    def _parsed_now(self):
        """(registry entry, parsed options), parsed again if ``method`` or ``method_options`` was
        assigned since (options changed in place are not seen: assign a new dict)."""
        if self._parsed_from[0] is not self.method or self._parsed_from[1] is not self.method_options:
            self.method_options = dict(self.method_options or {})
            self._parse_method()
        return self._spec, self._parsed

    @property
    def method_spec(self) -> Optional[MethodSpec]:
        """The registry entry of ``method`` (None when ``method`` is a Method instance)."""
        return self._parsed_now()[0]

    @property
    def parsed_options(self) -> Any:
        """``method_options`` as the registry parsed them (once; e.g. a DucaOptions for "duca";
        None when ``method`` is a Method instance)."""
        return self._parsed_now()[1]

    def make_method(self) -> Method:
        """A fresh :class:`~foca_kernels.Method` for this configuration (for a hook-level method
        such as "duca", the state method of its cached streams)."""
        spec, parsed = self._parsed_now()
        return self.method if spec is None else spec.build(parsed)

    def pattern(self, num_steps: int) -> str:
        """The planned schedule as a string, 'F' computed and 's' skipped, e.g. 'FFssFssF'.

        Modules whose method is not ready yet are computed on an 's' step (see the class
        docstring), so the realised pattern can differ in the first steps."""
        from .schedule import Schedule

        return Schedule.from_config(self).pattern(num_steps)
