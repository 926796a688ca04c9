"""Non-finite features (policy in docs/method.md, "Non-finite features").

By default a nan/inf in a computed feature is stored like any other value: the kernels do
not look at the data (a check costs a reduction and a host sync per call). Methods whose
state is rebuilt from computed values only forget it once it has left their history; FoCa
carries its last forecast into the next window (F_prev at the first skip), so on a periodic
schedule the value never leaves. Opt-in checks: ``update_(check_finite=True)`` refuses the
feature (tests/test_refusals.py); ``CacheConfig(check_finite=True)`` resets that module's
cache instead of feeding it, after which every method recovers.
"""

from __future__ import annotations

import pytest
import torch

import foca_kernels as fk
from foca_kernels.hooks import cache_info, disable_cache, enable_cache
from test_hooks_plain import TIMESTEPS, toy

SHAPE = (4, 8)
INTERVAL = 3
# method, options, full steps after the bad one until forecasts are finite again (None: never)
RECOVERY = [
    ("reuse", {}, 1),
    ("taylorseer", {"order": 1}, 2),
    ("taylorseer", {"order": 2}, 3),
    ("taylorseer", {"order": 3}, 4),
    ("foca", {"anchor": "secant"}, None),
    ("foca", {"anchor": "bdf2"}, None),
]


def _forecasts_after_bad_full_step(method, opts, backend, windows=8):
    """Periodic schedule F F s s F s s F ...; one nan in the feature of the third full step.
    Returns, per window after it, whether that window's forecasts were all finite."""
    g = torch.Generator().manual_seed(0)
    buf = fk.allocate(torch.zeros(SHAPE), method, **opts)
    finite = []
    for k in range(3 + windows):
        x = torch.randn(SHAPE, generator=g)
        if k == 2:
            x[1, 3] = float("nan")
        fk.update_(buf, x, backend=backend)
        if k < 1:
            continue
        ys = [fk.forecast(buf, backend=backend) for _ in range(INTERVAL - 1)]
        if k >= 2:
            finite.append(all(bool(torch.isfinite(y).all()) for y in ys))
    return finite


@pytest.mark.parametrize("method,opts,after", RECOVERY, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o, _ in RECOVERY])
def test_which_methods_forget_a_nan(method, opts, after, backend):
    finite = _forecasts_after_bad_full_step(method, opts, backend)
    assert finite[0] is False  # the window right after the bad step forecasts from it
    if after is None:
        assert not any(finite), "FoCa carries the value into every later window (documented)"
    else:
        # window w follows full step 2 + w: finite once `after` clean full steps were taken
        assert finite == [w >= after for w in range(len(finite))]


@pytest.mark.parametrize("method", ["foca", "taylorseer", "reuse"])
def test_hooks_check_finite_resets_the_module_and_recovers(method):
    """A module whose computed output holds a nan at one computed step (step 4 of F F s s F ...)
    is reset instead of fed; with check_finite=False FoCa's later forecasts would keep the nan."""
    m = toy()
    attn = m.layers[0].attn

    def poison(mod, args):
        if ctl.current.step == 4:
            assert ctl.current.full
            x = args[0].clone()
            x[0, 0, 0] = float("nan")
            return (x,)
        return None

    outs = []
    enable_cache(m, method=method, interval=3, warmup=2, check_finite=True, targets=[r"layers\.\d+\.(attn|mlp)"])
    ctl = m.__dict__["_foca_cache"]
    handle = attn.register_forward_pre_hook(poison)
    recorder = attn.register_forward_hook(lambda mod, a, o: outs.append((ctl.current.step, o.clone())))
    timesteps = torch.linspace(999, 0, 30)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(fk.hooks.FocaCacheWarning, match=r"non-finite .*reset"):
        with torch.no_grad():
            for t in timesteps:
                x = x - 0.05 * torch.nan_to_num(m(x, timestep=t.expand(2)))
    handle.remove()
    recorder.remove()
    assert cache_info(m).calls_forecast > 0
    bad_step = next(s for s, o in outs if not torch.isfinite(o).all())
    later = [o for s, o in outs if s > bad_step + 1]
    assert later and all(torch.isfinite(o).all() for o in later), "a forecast still carries the nan"
    disable_cache(m)
