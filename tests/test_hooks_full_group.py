"""Full steps through the hooks: each computed module's output is recorded at after_module and
every recorded update of the model call runs as ONE ``update_group_shared_`` (update_group_ without its
per-pair checks) at its end (hooks/pending.py).

* launches per full step do not grow with the number of cached modules (a toy with 2 and with
  8 blocks: 4 and 16 streams), for the default reading and a closed form;
* the grouped full steps give the same samples, bit for bit, as per-module updates
  (``max_pending_bytes=0``), in output and residual mode, on both backends;
* a module output changed in place after its module returned is never cached with the change:
  the module's history is reset (warned once) and it updates at once from then on;
* an aborted model call drops its recorded updates and leaves every state as it was;
* ``max_pending_bytes`` bounds what the recorded outputs keep alive (earlier, smaller groups);
* inference tensors (no version counter), method "rfc" and DuCa take the per-module path.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import foca_kernels as fk
from foca_kernels.hooks import FocaCacheWarning, cache_info, disable_cache, enable_cache
from foca_kernels.hooks import pending as pending_mod
from foca_kernels.hooks.apply import _controller

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D = 16
TARGETS = [r"layers\.\d+\.(attn|mlp)"]
TIMESTEPS = torch.tensor([999.0, 950.0, 850.0, 700.0, 560.0, 400.0, 300.0, 150.0, 60.0, 10.0])
# F F s s F s s F s s: full steps 0, 1, 4, 7 (FoCa calibrated: its fit)
SCHEDULE = dict(interval=3, warmup=2, method="foca")
FULL = [0, 1, 4, 7]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.inplace = False  # scale the attention output in place after it returned
        self.fail = False  # raise after the attention ran

    def forward(self, x, temb):
        a = self.attn(self.norm(x) * (1 + temb))
        if self.inplace:
            a.mul_(0.5)
        if self.fail:
            raise RuntimeError("model failed")
        x = x + a
        return x + self.mlp(self.norm(x))


class Toy(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.temb = nn.Linear(1, D)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(D, D)

    def forward(self, x, timestep):
        temb = torch.sin(self.temb(timestep.reshape(-1, 1, 1).float() / 1000))
        for layer in self.layers:
            x = layer(x, temb)
        return self.head(x)


def toy(n=2):
    torch.manual_seed(0)
    return Toy(n).eval()


def sample(model, steps=len(TIMESTEPS), inference=False, each=None):
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode() if inference else torch.no_grad():
        for i, t in enumerate(TIMESTEPS[:steps]):
            x = x - 0.05 * model(x, timestep=t.expand(2))
            if each is not None:
                each(i)
    return x


def groups_of(model):
    ctx = next(iter(_controller(model).contexts.values()))
    return ctx.groups


# ---- launches per full step ---------------------------------------------------------------------------
class _Counted:
    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def _launches_per_call(n_blocks, method_options, monkeypatch):
    from foca_kernels.ops import triton_fit, triton_group, triton_lincomb

    counts: dict = {}
    for mod, name in ((triton_group, "_group_kernel"), (triton_fit, "_fit_dots_kernel"),
                      (triton_fit, "_fit_sum_kernel"), (triton_lincomb, "_lincomb_kernel")):
        monkeypatch.setattr(mod, name, _Counted(getattr(mod, name), counts, name))
    m = toy(n_blocks)
    enable_cache(m, targets=TARGETS, backend="triton", method_options=method_options, **SCHEDULE)
    per_call = []

    def each(i):
        per_call.append(dict(counts))
        counts.clear()

    sample(m, each=each)
    streams = cache_info(m).streams
    disable_cache(m)
    return per_call, streams


@pytest.mark.parametrize("method_options", [{}, {"reading": "r7"}], ids=["foca-calibrated", "foca-r7"])
def test_launches_per_full_step_do_not_grow_with_the_modules(method_options, monkeypatch):
    if fk.get_backend("cpu") != "triton":
        pytest.skip("needs the Triton interpreter")
    small, n_small = _launches_per_call(2, method_options, monkeypatch)
    large, n_large = _launches_per_call(8, method_options, monkeypatch)
    assert (n_small, n_large) == (4, 16)
    assert small == large  # every model call: the same launches for 4 and for 16 cached outputs
    for i in FULL:
        assert "_lincomb_kernel" not in small[i]  # no per-stream launch
    fitted = {"_group_kernel": 1, "_fit_dots_kernel": 1, "_fit_sum_kernel": 1}
    if method_options:  # a closed form: the feature copy of every stream, one launch
        assert [small[i] for i in FULL] == [{"_group_kernel": 1}] * 4
    else:  # copy; r7's slope (twice, until four values exist); then the fit: pass 1, sums, pass 2 + copy
        assert [small[i] for i in FULL] == [{"_group_kernel": 1}] * 3 + [fitted]
    assert all(small[i] == {"_group_kernel": 1} for i in range(10) if i not in FULL)  # skipped: one launch


# ---- same results as per-module updates -------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("method_options", [{}, {"reading": "r7"}], ids=["foca-calibrated", "foca-r7"])
def test_grouped_full_steps_equal_per_module_updates(granularity, method_options, backend, monkeypatch):
    calls = []
    real = pending_mod.update_group_shared_
    monkeypatch.setattr(pending_mod, "update_group_shared_",
                        lambda s, *a, **k: (calls.append(len(s)), real(s, *a, **k)))
    targets = TARGETS if granularity == "module" else None
    out = {}
    for limit in (0, 256 << 20):
        m = toy()
        enable_cache(m, targets=targets, granularity=granularity, backend=backend, method_options=method_options,
                     max_pending_bytes=limit, **SCHEDULE)
        out[limit] = sample(m)
        streams = cache_info(m).streams
        disable_cache(m)
        if limit == 0:
            assert not calls
    assert torch.equal(out[0], out[256 << 20])
    assert calls == [streams] * len(FULL)


def test_block_granularity_caches_residuals_through_the_grouped_update(monkeypatch):
    """Block granularity caches output minus input into each stream's own scratch; those are
    recorded (owned: no version check) and grouped like module outputs."""
    recorded = []
    real = pending_mod.PendingUpdates.record

    def spy(self, group, prev, stream, feature, h, owned):
        recorded.append((owned, feature is stream.buffer))
        return real(self, group, prev, stream, feature, h, owned)

    monkeypatch.setattr(pending_mod.PendingUpdates, "record", spy)
    m = toy()
    enable_cache(m, granularity="block", **SCHEDULE)
    sample(m)
    groups = groups_of(m)
    assert groups and all(g.mode == "residual" for g in groups.values())
    assert recorded and all(owned and scratch for owned, scratch in recorded)
    disable_cache(m)


# ---- outputs changed in place ----------------------------------------------------------------------------------
def test_output_changed_in_place_is_never_cached_changed():
    m = toy()
    m.layers[0].inplace = True  # layers.0.attn's output is halved in place after it returned
    seen = {}
    m.layers[0].attn.register_forward_hook(lambda mod, a, out: seen.__setitem__("attn0", out.detach().clone()))
    enable_cache(m, targets=TARGETS, **SCHEDULE)
    stored = []

    def each(i):
        st = groups_of(m)[("layers.0.attn", 0)].streams[0].state
        if i in FULL and st.n_steps:  # what the state holds as its newest computed value
            stored.append((i, st.n_full, torch.equal(st.role("X0"), seen["attn0"])))

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sample(m, each=each)
    inplace = [x for x in w if issubclass(x.category, FocaCacheWarning) and "modified in place" in str(x.message)]
    assert len(inplace) == 1 and "layers.0.attn" in str(inplace[0].message)
    g = groups_of(m)[("layers.0.attn", 0)]
    assert g.immediate
    # step 0: detected, reset (nothing stored); from step 1 on: the module's output as it returned
    assert [i for i, _, _ in stored] == [1, 4, 7] and all(ok for _, _, ok in stored), stored
    assert stored[0][1] == 1 and stored[-1][1] > stored[1][1] > 1
    other = groups_of(m)[("layers.0.mlp", 0)].streams[0].state
    assert other.n_full == 4 and not groups_of(m)[("layers.0.mlp", 0)].immediate
    disable_cache(m)


# ---- an aborted model call --------------------------------------------------------------------------------------
def test_aborted_call_drops_its_updates():
    m = toy()
    enable_cache(m, targets=TARGETS, **SCHEDULE)
    sample(m, steps=4)  # F F s s: the next call is the full step 4
    groups = groups_of(m)
    before = {k: (g.last_tau, [copy.deepcopy((s.state.slots.clone(), s.state.t, s.state.n_full, s.state._slot_of))
                               for s in g.streams]) for k, g in groups.items()}
    m.layers[1].fail = True  # layers.0.attn/mlp and layers.1.attn have run and recorded their updates
    x = torch.randn(2, 5, D)
    with pytest.raises(RuntimeError, match="model failed"), torch.no_grad():
        m(x, timestep=TIMESTEPS[4].expand(2))
    assert _controller(m).current is None
    for k, g in groups.items():
        tau, streams = before[k]
        assert g.last_tau == tau, k
        for s, (slots, t, n_full, slot_of) in zip(g.streams, streams):
            assert torch.equal(s.state.slots, slots) and (s.state.t, s.state.n_full, s.state._slot_of) == (
                t, n_full, slot_of), k
    m.layers[1].fail = False
    with torch.no_grad():
        m(x, timestep=TIMESTEPS[5].expand(2))  # goes on
    disable_cache(m)


# ---- memory bound -----------------------------------------------------------------------------------------------
def test_max_pending_bytes_flushes_early(monkeypatch):
    sizes = []
    real = pending_mod.update_group_shared_
    monkeypatch.setattr(pending_mod, "update_group_shared_",
                        lambda s, *a, **k: (sizes.append(len(s)), real(s, *a, **k)))
    held = []
    real_record = pending_mod.PendingUpdates.record

    def spy(self, *a, **k):
        real_record(self, *a, **k)
        held.append(self.nbytes)

    monkeypatch.setattr(pending_mod.PendingUpdates, "record", spy)
    one = 2 * 5 * D * 4  # one module output, fp32
    out = {}
    for limit in (256 << 20, 2 * one):
        sizes.clear()
        held.clear()
        m = toy()
        enable_cache(m, targets=TARGETS, max_pending_bytes=limit, **SCHEDULE)
        out[limit] = sample(m)
        disable_cache(m)
        if limit == 2 * one:  # flushed as soon as more than two outputs are held: groups of 3, then 1
            assert sizes == [3, 1] * len(FULL) and max(held) == 3 * one
        else:
            assert sizes == [4] * len(FULL)
    assert torch.equal(out[256 << 20], out[2 * one])


def test_max_pending_bytes_refused():
    with pytest.raises(ValueError, match="max_pending_bytes"):
        fk.CacheConfig(max_pending_bytes=-1)
    with pytest.raises(ValueError, match="max_pending_bytes"):
        fk.CacheConfig(max_pending_bytes=True)


# ---- what keeps the per-module path -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["inference-output", "inference-residual", "rfc"])
def test_per_module_path(case, monkeypatch):
    calls = []
    real = pending_mod.update_group_shared_
    monkeypatch.setattr(pending_mod, "update_group_shared_",
                        lambda s, *a, **k: (calls.append(len(s)), real(s, *a, **k)))
    cfg = dict(targets=TARGETS, **SCHEDULE)
    if case == "inference-residual":
        cfg = dict(granularity="block", **SCHEDULE)
    if case == "rfc":
        cfg["method"] = "rfc"
    m = toy()
    enable_cache(m, **cfg)
    ref = sample(m)
    disable_cache(m)
    calls.clear()
    m = toy()
    enable_cache(m, **cfg)
    got = sample(m, inference=case.startswith("inference"))
    disable_cache(m)
    assert torch.equal(got, ref)
    if case == "inference-residual":  # residuals are the cache's own tensors: grouped
        assert calls == [2] * len(FULL)
    else:  # inference outputs keep no version counter; rfc needs each module's input
        assert not calls
