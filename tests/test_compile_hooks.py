"""torch.compile over a whole cached model: a 50-step generation compiles its frames on the
first steps and never again (no recompile per step or per step pattern), and gives the same
latents as the uncompiled cached model (issue 8, item 2, the CPU half).

The model is the tiny random diffusers DiT of ``hooks_tiny`` with
``enable_cache(model, interval=5)`` (FoCa, module granularity, warm-up 2: pattern
``FFssssFssss...``), sampled with DDIM and classifier-free guidance batched in one call, as
``DiTPipeline`` does. Compilations are counted with dynamo's ``CompileCounterWithBackend``
(one count per compiled frame, whatever the reason: a first compile or a recompile after a
failed guard), and ``error_on_recompile`` turns any recompile into an error naming the
failed guard from the step after the first full and the first skipped step on (on the first
step the frames of the blocks are compiled, and recompiled once: the graph break at each
cached module makes every block's forward a frame of its own, and block 0 is called with the
patch embedding's transposed output, the later blocks with contiguous tensors, so dynamo's
stride guard of block 0's compile fails once for block 1; that is diffusers' layout, the
same for every step, not the cache). ``backend="eager"`` and ``"aot_eager"`` trace exactly what inductor would be
given, without inductor's C++ compile (seconds on this CPU, not minutes).

If this test starts failing with a recompile, run it with ``TORCH_LOGS=recompiles`` to see
which guard failed (a Python float or int of the hooks' state machine that dynamo
specialised on is the usual suspect).
"""

from __future__ import annotations

from typing import List

import pytest
import torch

pytest.importorskip("torch._dynamo")
import torch._dynamo  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from foca_kernels.hooks import CacheConfig, cache_info, disable_cache, enable_cache, reset_cache  # noqa: E402
from hooks_tiny import CASES, sample  # noqa: E402

STEPS, INTERVAL = 50, 5
CASE = CASES["dit"]


class _Counting:
    """Calls the (compiled) model, records the compiled-frame count after each call, and
    from call ``strict_from`` on makes any recompile an error (dynamo then names the guard
    that failed)."""

    def __init__(self, model, counter, strict_from: int):
        self.model, self.counter, self.strict_from, self.frames = model, counter, strict_from, []
        self.n = 0

    def __call__(self, *args, **kwargs):
        with torch._dynamo.config.patch(error_on_recompile=self.n >= self.strict_from):
            out = self.model(*args, **kwargs)
        self.n += 1
        self.frames.append(self.counter.frame_count)
        return out


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_torch_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_cached_model_does_not_recompile(backend):
    pattern = CacheConfig(interval=INTERVAL).pattern(STEPS)
    first_full, first_skip = pattern.index("F"), pattern.index("s")
    assert pattern.count("s") > 30  # a real cached generation: most steps skipped

    model = CASE.make()
    enable_cache(model, interval=INTERVAL)
    latents, conds = CASE.latents(2), CASE.conds(2)
    eager = sample(CASE, model, steps=STEPS, cfg="batched", latents=latents, conds=conds)
    reset_cache(model, clear_stats=True)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    settle = max(first_full, first_skip)  # the first full and the first skipped step have run
    calls = _Counting(compiled, counter, strict_from=settle + 1)
    first = sample(CASE, calls, steps=STEPS, cfg="batched", latents=latents, conds=conds)
    frames_first: List[int] = list(calls.frames)
    calls.frames.clear()
    second = sample(CASE, calls, steps=STEPS, cfg="batched", latents=latents, conds=conds)
    frames_second: List[int] = list(calls.frames)

    # compiled once: by the end of the first full and the first skipped step every frame
    # that will ever run is compiled, and nothing is compiled afterwards
    settled = frames_first[settle]
    assert settled > 0, "nothing was compiled: the test does not test torch.compile"
    late = [(i, pattern[i], n) for i, n in enumerate(frames_first) if n != settled and i > settle]
    assert not late, f"compiled frames grew after step {settle} (step, kind, count): {late}"
    assert set(frames_second) == {settled}, f"the second generation compiled again: {frames_second}"

    # the compiled model computes what the uncompiled cached model computes, bit for bit
    assert torch.equal(first, eager), f"compiled vs eager: max |diff| {(first - eager).abs().max().item()}"
    assert torch.equal(second, eager)
    info = cache_info(compiled)
    assert info.generations == 2
    assert info.steps_skipped == 2 * pattern.count("s")
    assert info.calls_forecast == info.steps_skipped * info.modules
    disable_cache(model)
