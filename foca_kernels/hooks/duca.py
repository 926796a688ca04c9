"""DuCa through the hooks: which cached modules are recomputed token-wise, where their token
scores come from, and the conservative call itself.

Per model (one :class:`DucaRuntime`, owned by the controller):
  * partial sites: cached modules matching the ``partial`` regexes (default: the feed-forward
    of each block; FLUX/SD3 ``ff`` is the image stream, ``ff_context`` the text stream, which is
    therefore reused like attention). On a conservative step such a module runs on the
    selected tokens only; every other cached module (attention, cross-attention, text
    streams, FLUX single blocks) is reused, as on aggressive steps.
  * v-norm scores: the value projection ``to_v`` of the block's attention is wrapped; on full
    steps its output gives each token's score (DuCa's V-caching). Nothing else is recorded.
  * one selection per (module, call, step), shared by every context: a CFG pipeline calling
    the model twice ("cond", then "uncond") refreshes the same tokens in both; a batched CFG
    call scores one half and applies the choice to both halves.
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from ..duca.options import DucaOptions
from ..duca.phases import phase
from ..duca.select import (
    add_spatial_bonus_, add_staleness_, fresh_ratio, random_score, square_grid, top_k, v_norm_score,
)
from ..duca.tokens import TokenCache, flat_rows, refresh_tokens_
from .config import FocaCacheWarning
from .wrap import AttributePatch, _skip_for_dynamo

_ATTENTION_NAMES = ("attn1", "attn", "self_attn")


def _hidden(args, kwargs):
    """(value, setter) of a module call's token input: ``hidden_states`` or the first argument."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda v: (args, {**kwargs, "hidden_states": v})
    if args:
        return args[0], lambda v: ((v,) + tuple(args[1:]), kwargs)
    return None, None


class DucaRuntime:
    def __init__(self, config):
        self.config = config
        self.opts: DucaOptions = config.parsed_options  # parsed once, by the registry (CacheConfig)
        self.partial_rx = [re.compile(p) for p in self.opts.partial]
        self.partial_sites: Dict[str, int] = {}  # name -> position (seeds the random score)
        self.vnorm: Dict[Tuple[str, str], torch.Tensor] = {}  # (context, site) -> (B, N) score
        self.ages: Dict[object, torch.Tensor] = {}  # stream group -> (B, N) int32 counters
        self.shared: Dict[Tuple[str, int], tuple] = {}  # (site, call) -> (generation, step, index)
        self.tokens_computed = 0  # token rows the partial modules computed on conservative steps
        self.tokens_total = 0  # token rows they would have computed in full
        self._warned: set = set()

    def _warn_once(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"foca cache (duca): {message}", FocaCacheWarning, stacklevel=5)

    # ---- set-up ------------------------------------------------------------------------
    def install(self, ctl, model, sites) -> List[AttributePatch]:
        """Mark the partial sites and wrap the value projections their scores come from."""
        patches = []
        for pos, site in enumerate(sites):
            if site.mode != "output" or not any(rx.fullmatch(site.name) for rx in self.partial_rx):
                continue
            self.partial_sites[site.name] = pos
            if self.opts.score != "v-norm":
                continue
            attn = self._attention_of(model, site.name)
            if attn is None:
                self._warn_once(("noattn", site.name),
                                f"no attention with to_v/heads next to {site.name!r}: its tokens are scored at random")
                continue
            patches.append(AttributePatch(attn.to_v, "forward", self._v_recorder(ctl, site.name, int(attn.heads)),
                                          skip_dynamo=True))
        if not self.partial_sites:
            self._warn_once("nopartial", f"no cached module matches the partial regexes {self.opts.partial}: "
                                         "every skipped step reuses")
        return patches

    @staticmethod
    def _attention_of(model, name: str):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        try:
            block = model.get_submodule(parent)
        except AttributeError:
            return None
        for a in _ATTENTION_NAMES:
            attn = getattr(block, a, None)
            if attn is not None and isinstance(getattr(attn, "to_v", None), torch.nn.Module) and hasattr(attn, "heads"):
                return attn
        return None

    def _v_recorder(self, ctl, site_name: str, heads: int):
        def make(orig):
            def forward(*args, **kwargs):
                out = orig(*args, **kwargs)
                step = ctl.current
                if ctl.active and step is not None and step.full and isinstance(out, torch.Tensor) and out.dim() == 3:
                    self.vnorm[(step.ctx.name, site_name)] = v_norm_score(out, heads)
                return out

            return forward

        return make

    # ---- per step ----------------------------------------------------------------------
    def phase(self, schedule, step: int, num_steps) -> str:
        return phase(schedule, step, num_steps, self.opts.phase_order)

    def cfg_batched(self, args, kwargs):
        """Whether this model call holds two CFG halves of the same latents: a bool when the
        options or the batch size decide it, else a 0-d bool tensor left on the device (reading
        it would sync every conservative step; :meth:`select` chooses with ``torch.where``)."""
        if self.opts.cfg_batched is not None:
            return self.opts.cfg_batched
        x, _ = _hidden(args, kwargs)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            return False
        h = x.shape[0] // 2
        return (x[:h] == x[h:]).all()

    def on_full(self, group) -> None:
        age = self.ages.get(group)
        if age is not None:
            age.zero_()

    def partial(self, ctl, group, site, idx: int, args, kwargs) -> Optional["PartialCall"]:
        """The conservative call of a partial site, or None to reuse it instead."""
        if site.name not in self.partial_sites:
            return None
        if len(group.streams) != 1 or group.template is None or group.template[0] is not None:
            self._warn_once(("multi", site.name),
                            f"{site.name!r} returns more than one tensor: reused, not recomputed token-wise")
            return None
        st = group.streams[0].state
        x, _ = _hidden(args, kwargs)
        if (st is None or len(st.shape) != 3 or not isinstance(x, torch.Tensor) or x.dim() != 3
                or x.shape[:2] != st.shape[:2]):
            self._warn_once(("shape", site.name),
                            f"{site.name!r}: input and output are not (batch, tokens, channels) alike: reused")
            return None
        return PartialCall(self, ctl, group, site, idx)

    def select(self, ctl, group, site, idx: int, x: torch.Tensor) -> torch.Tensor:
        step = ctl.current
        ctx = step.ctx
        b, n = x.shape[:2]
        key = (site.name, idx)
        hit = self.shared.get(key)
        if (hit is not None and hit[0] == ctx.generations and hit[1] == step.step and hit[2].shape[0] == b
                and hit[3] == n):
            return hit[2]  # chosen by another context (the other CFG call) at this step
        o = self.opts
        ratio = fresh_ratio(step.step, ctx.num_steps, o.fresh_ratio, o.ratio_schedule, o.ratio_weight)
        if o.ratio_schedule != "constant" and not ctx.num_steps:
            self._warn_once("nsteps",
                            f"ratio_schedule={o.ratio_schedule!r} needs the number of steps; using the constant ratio")
        score = None
        if o.score == "v-norm":
            score = self.vnorm.get((ctx.name, site.name))
            if score is None or score.shape != (b, n):
                self._warn_once(("vnorm", site.name),
                                f"no value norms of {n} tokens for {site.name!r}: scored at random")
                score = None
        if score is None:
            seed = (o.seed * 1_000_003 + step.step * 1_009 + self.partial_sites[site.name] * 31 + idx) % (2**63)
            score = random_score(b, n, x.device, seed)
        score = score.to(x.device, torch.float32).clone()
        add_staleness_(score, self.age_of(group, b, n, x.device), o.staleness_weight, self.config.interval)
        grid = o.grid or square_grid(n)
        if o.spatial_bonus and grid is not None and grid[0] * grid[1] == n:
            add_spatial_bonus_(score, grid, o.spatial_bonus, o.spatial_size)
        elif o.spatial_bonus:
            self._warn_once(("grid", site.name),
                            f"{n} tokens of {site.name!r} form no known grid: no spatial bonus (pass grid=(h, w))")
        cfg = step.cfg_batched
        if cfg is False:
            index = top_k(score, ratio)
        else:  # one half scored, its choice applied to both halves
            h = b // 2
            half = top_k(score[o.cfg_half * h:(o.cfg_half + 1) * h], ratio)
            index = torch.cat([half, half])
            if cfg is not True:  # detected on the device: both choices formed, one kept there
                index = torch.where(cfg, index, top_k(score, ratio))
        self.shared[key] = (ctx.generations, step.step, index, n)
        return index

    def age_of(self, group, b: int, n: int, device) -> torch.Tensor:
        age = self.ages.get(group)
        if age is None or age.shape != (b, n) or age.device != device:
            age = self.ages[group] = torch.zeros(b, n, dtype=torch.int32, device=device)
        return age

    def clear(self) -> None:
        self.vnorm.clear()
        self.ages.clear()
        self.shared.clear()


class PartialCall:
    """A conservative call: the module runs on the selected tokens; their rows are scattered
    into the cache and into the returned output (one fused launch).

    Under torch.compile the frame of :meth:`run` is skipped (only the module call inside it is
    traced) and the bookkeeping around the module call runs eagerly (compiler-disabled)."""

    def __init__(self, rt: DucaRuntime, ctl, group, site, idx: int):
        self.rt, self.ctl, self.group, self.site, self.idx = rt, ctl, group, site, idx

    def run(self, orig, args, kwargs):
        a2, kw2, index = self._prepare(args, kwargs)
        fresh = orig(*a2, **kw2) if index.shape[1] else None  # a ratio of 0 runs nothing
        return self._finish(fresh, index)

    def _prepare(self, args, kwargs):
        """Select the tokens and gather their input rows: (args, kwargs, index)."""
        x, replace = _hidden(args, kwargs)
        index = self.rt.select(self.ctl, self.group, self.site, self.idx, x)
        xs = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        a2, kw2 = replace(xs)
        return a2, kw2, index

    def _finish(self, fresh, index):
        rt, ctl, group = self.rt, self.ctl, self.group
        step = ctl.current
        stream = group.streams[0]
        st = stream.state
        b, n, c = st.shape
        k = index.shape[1]
        if fresh is None:
            fresh = torch.empty((b, 0, c), dtype=st.io_dtype, device=st.device)
        if not isinstance(fresh, torch.Tensor) or tuple(fresh.shape) != (b, k, c) or fresh.dtype != st.io_dtype:
            raise RuntimeError(
                f"foca cache (duca): {self.site.name!r} is not token-wise: given {k} of {n} tokens it returned "
                f"{tuple(fresh.shape) if isinstance(fresh, torch.Tensor) else type(fresh).__name__}, "
                f"expected {(b, k, c)}; "
                "leave it out of method_options['partial']"
            )
        cfg = ctl.config
        if rt.opts.forecast is not None:  # fresh rows on top of the forecast; the state keeps full steps only
            out = stream.forecast(step.tau - group.last_tau, cfg)
            rows = flat_rows(index, n)
            out.view(b * n, c).index_copy_(0, rows, fresh.reshape(-1, c))
            age = rt.age_of(group, b, n, st.device)
            age.add_(1).view(-1).index_fill_(0, rows, 0)
            return self._done(out, step, b, k, n)
        if cfg.reuse_output_buffers:
            out = stream.buffer
            if out is None or out.shape != st.shape or out.dtype != st.io_dtype or out.device != st.device:
                out = stream.buffer = torch.empty(st.shape, dtype=st.io_dtype, device=st.device)
        else:
            out = torch.empty(st.shape, dtype=st.io_dtype, device=st.device)
        cache = TokenCache(st.role("D0"), st.io_dtype, age=rt.age_of(group, b, n, st.device))
        refresh_tokens_(cache, out, fresh.contiguous(), index, backend=cfg.backend, check_indices=False)
        return self._done(out, step, b, k, n)

    def _done(self, out, step, b, k, n):
        self.group.last_tau = step.tau
        step.written.append(out)
        self.rt.tokens_computed += b * k
        self.rt.tokens_total += b * n
        return out


_skip_for_dynamo(PartialCall.run)
PartialCall._prepare = torch.compiler.disable(PartialCall._prepare)
PartialCall._finish = torch.compiler.disable(PartialCall._finish)
