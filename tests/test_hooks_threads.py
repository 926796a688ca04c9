"""One cached model serves one caller at a time (a cache holds one generation's history).
A call from a second thread while the first is inside a model call, or in the middle of the
first thread's generation, is refused with an error that says so."""

from __future__ import annotations

import threading

import pytest
import torch

from foca_kernels.hooks import disable_cache, enable_cache, reset_cache
from test_hooks_plain import TIMESTEPS, sample, toy

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def test_second_thread_during_a_model_call_is_refused():
    m = toy()
    ref = sample(m)
    enable_cache(m, interval=3)
    inside, release = threading.Event(), threading.Event()
    calls = {"n": 0}

    def hold(mod, args):  # the first call of step 3 waits inside the model
        calls["n"] += 1
        if calls["n"] == 4:
            inside.set()
            release.wait(30)

    handle = m.layers[0].norm.register_forward_pre_hook(hold)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("x", sample(m)))
    worker.start()
    assert inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match=r"called from two threads at once.*not supported"):
            with torch.no_grad():
                m(X, timestep=TIMESTEPS[0].expand(2))
    finally:
        release.set()
        worker.join(30)
    handle.remove()
    disable_cache(m)
    enable_cache(m, interval=3)
    assert torch.equal(result["x"], sample(m)), "the refused call disturbed the first thread's generation"
    disable_cache(m)
    assert torch.equal(sample(m), ref)


def test_second_thread_in_the_middle_of_a_generation_is_refused():
    m = toy()
    enable_cache(m, interval=3)
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            m(X, timestep=t.expand(2))
        err = {}

        def other():
            try:
                m(X, timestep=TIMESTEPS[4].expand(2))
            except RuntimeError as e:
                err["e"] = e

        th = threading.Thread(target=other)
        th.start()
        th.join(30)
        assert "e" in err and "another thread" in str(err["e"]) and "not supported" in str(err["e"])
        m(X, timestep=TIMESTEPS[4].expand(2))  # the first thread goes on
        reset_cache(m)  # a finished (or abandoned) generation frees the model for any thread
        err.clear()
        th = threading.Thread(target=other)
        th.start()
        th.join(30)
        assert not err, "a new generation from another thread must be allowed"
    disable_cache(m)
