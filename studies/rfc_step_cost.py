"""What an RFE (method="rfc") skipped step costs, against FoCa r3's grouped skipped step.

    OMP_NUM_THREADS=1 python studies/rfc_step_cost.py            # CPU: counts and host time
    python studies/rfc_step_cost.py --size 2 4096 3072           # one module at a real size (bytes)

Model (as bench/bench_host.py): diffusers' DiTTransformer2DModel with DiT-XL/2's depth (28 blocks,
56 cached modules: attn1 and ff of every block), tiny width (2 heads x 8, 4 tokens, batch 2),
so a step's time is host work. For one skipped model call it reports
  launches  kernel launches of foca_kernels' code: one per fused lincomb (the Triton kernel on a
            GPU) plus one per other aten op dispatched from foca_kernels (sub, norms, scale, ...)
  tensors   full-size tensors read + written per cached module (output- or input-sized)
  host      process CPU time of the skipped call, 10th percentile and median over the skipped
            steps of 6 generations of 50 steps (interval 5, warm-up 2); the stub row replaces
            attn1/ff by free stubs (a zero-cost cache, the floor)
and the bytes one module's skipped step moves at ``--size`` (bf16), from the same counts.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foca_kernels.group import StateGroup
from foca_kernels.hooks import CacheConfig, enable_cache

LAYERS, STEPS, INTERVAL, WARMUP, GENS = 28, 50, 5, 2, 6


def _model():
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=LAYERS,
        sample_size=4, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    ).eval()


def _skipped(s: int) -> bool:
    return s >= WARMUP and (s - WARMUP) % INTERVAL != 0


class Count(TorchDispatchMode):
    """aten ops dispatched from foca_kernels frames, outside the fused lincomb; plus its launches
    and the full-size tensors each touches (inputs + outputs of numel >= ``big``)."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.ops, self.tensors, self.inside, self.lincombs, self.lincomb_tensors = big, 0, 0, 0, 0, 0
        self.names: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            return out
        f = sys._getframe(1)  # the nearest frame outside torch: foca_kernels' own op, or model code
        while f is not None and f.f_globals.get("__name__", "").split(".")[0] in ("torch", "__main__", "contextlib"):
            f = f.f_back
        if f is None or not f.f_globals.get("__name__", "").startswith("foca_kernels"):
            return out
        name = func.__name__
        no_kernel = name.startswith(("empty", "detach", "alias", "_to_copy")) or name == "lift_fresh.default"
        if getattr(func, "is_view", False) or no_kernel:
            return out  # no kernel: views and allocations
        self.ops += 1
        self.names[name] = self.names.get(name, 0) + 1
        flat = [a for a in list(args) + list((kwargs or {}).values()) + [out] if isinstance(a, torch.Tensor)]
        self.tensors += sum(1 for t in flat if t.numel() >= self.big)
        return out


def measure(method: str) -> Dict[str, float]:
    from foca_kernels import step as step_mod

    base = _model()
    model = copy.deepcopy(base)
    if method == "stub":
        for blk in model.transformer_blocks:
            for name in ("attn1", "ff"):
                o = torch.zeros(2, 4, 16)
                getattr(blk, name).forward = (lambda o: (lambda *a, **k: o))(o)
    else:
        enable_cache(model, CacheConfig(interval=INTERVAL, warmup=WARMUP, method=method, num_inference_steps=STEPS))
    times: List[float] = []
    counts = {}
    x = torch.randn(2, 4, 4, 4)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        for g in range(GENS):
            for s, t in enumerate(torch.linspace(999, 0, STEPS).round().long().tolist()):
                ts = torch.full((2,), t)
                if g == 0 and s == WARMUP + INTERVAL + 1 and method != "stub":  # one skipped step, counted
                    mode = Count(big=2 * 4 * 16)
                    real = step_mod.run_lincomb_checked  # a single state's eager launch

                    def counted(slots, feature, out, numel, reads, writes, coef, backend):
                        mode.lincombs += 1
                        mode.lincomb_tensors += len(reads) + len(writes) + (feature is not None) + (out is not None)
                        mode.inside += 1
                        try:
                            return real(slots, feature, out, numel, reads, writes, coef, backend)
                        finally:
                            mode.inside -= 1

                    real_group = StateGroup._run

                    def counted_group(self, launch, members, backend):
                        before = self.launches
                        mode.inside += 1
                        try:
                            return real_group(self, launch, members, backend)
                        finally:
                            mode.inside -= 1
                            mode.lincombs += self.launches - before
                            mode.lincomb_tensors += launch.tensors_moved * len(members)

                    step_mod.run_lincomb_checked = counted
                    StateGroup._run = counted_group
                    try:
                        with mode:
                            model(x, timestep=ts, class_labels=labels)
                    finally:
                        step_mod.run_lincomb_checked = real
                        StateGroup._run = real_group
                    counts = dict(launches=mode.lincombs + mode.ops, lincombs=mode.lincombs, other_ops=mode.ops,
                                  tensors_per_module=(mode.lincomb_tensors + mode.tensors) / (2 * LAYERS),
                                  fused_tensors=mode.lincomb_tensors / (2 * LAYERS), names=mode.names)
                    continue
                t0 = time.process_time()
                model(x, timestep=ts, class_labels=labels)
                if _skipped(s):
                    times.append(time.process_time() - t0)
    times.sort()
    return dict(counts, p10=times[len(times) // 10] * 1e3, median=times[len(times) // 2] * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[2, 4096, 3072], help="one module output's shape (bf16)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    numel = 1
    for n in a.size:
        numel *= n
    rows = {m: measure(m) for m in ("stub", "foca", "rfc")}
    print(f"one skipped model call, {2 * LAYERS} cached modules, CPU, torch {torch.__version__}")
    print("| row | launches (fused + other) | full-size tensors per module | bytes per module at "
          f"{tuple(a.size)} bf16 | host ms p10 | host ms median |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        if m != "stub":
            print(f"  {m}: fused tensors per module {r['fused_tensors']:.1f}; other ops per step {r['names']}")
    for m, r in rows.items():
        if m == "stub":
            print(f"| stub | - | - | - | {r['p10']:.2f} | {r['median']:.2f} |")
            continue
        mb = r["tensors_per_module"] * numel * 2 / 1e6
        print(f"| fk-{m} | {r['launches']} ({r['lincombs']} + {r['other_ops']}) | {r['tensors_per_module']:.1f} | "
              f"{mb:.0f} MB | {r['p10']:.2f} | {r['median']:.2f} |")


if __name__ == "__main__":
    main()
