"""Schedule decisions across processes (gloo, 2 CPU processes via torch.multiprocessing.spawn).

(a) data parallel: ranks sampling different images take identical RCS decisions (the estimate
    is all-reduced with MAX), although alone they would decide differently;
(b) sequence parallel: a run with the tokens split across the two ranks (a manual split: the
    cached attention gathers every rank's keys/values with a collective, so ranks that skipped
    different steps would hang) gives the same samples and decisions as the unsharded run, for
    fixed schedules (foca, rfc) and for RCS (rcs_reduce="sum": each row's sums over the shards);
    FoCa's default reading fits its weights on the whole tensor, so it takes ``sharded=True``
    (its dot products summed over the ranks), and differs without it (the control).
Skipped only where torch.distributed is unavailable."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.nn as nn

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is unavailable", allow_module_level=True)

WORLD, B, T, D, STEPS = 2, 2, 8, 16, 14


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.sharded = False

    def forward(self, hidden_states):
        q, k, v = self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)
        if self.sharded:  # the sequence is split over the ranks: gather every shard's k, v
            ks = [torch.empty_like(k) for _ in range(WORLD)]
            vs = [torch.empty_like(v) for _ in range(WORLD)]
            dist.all_gather(ks, k.contiguous())
            dist.all_gather(vs, v.contiguous())
            k, v = torch.cat(ks, 1), torch.cat(vs, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, -1)
        return a @ v


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attn()
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, h):
        h = h + self.attn(self.n1(h))
        return h + self.ff(self.n2(h))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.temb = nn.Linear(1, D)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.out = nn.Linear(D, D)

    def shard(self, on: bool):
        for b in self.blocks:
            b.attn.sharded = on

    def forward(self, hidden_states, timestep):
        h = hidden_states + self.temb(timestep.reshape(1, 1, 1).to(hidden_states.dtype))
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def make_net():
    torch.manual_seed(0)
    return Net().eval()


@torch.no_grad()
def sample(net, x):
    for i in range(STEPS):
        t = torch.tensor(1.0 - i / STEPS)
        x = x - net(x, t) / STEPS
    return x


def latents(seed):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def cached_run(net, x, **cfg):
    import foca_kernels as fk

    config = fk.CacheConfig(targets=[r"blocks\.\d+\.(attn|ff)"], num_inference_steps=STEPS, **cfg)
    with fk.cached(net, config):
        y = sample(net, x)
        info = fk.cache_info(net)
    return y, info.pattern or config.pattern(STEPS)


SHARDED_FOCA = {"sharded": True}  # the default reading fits its weights over the whole tensor: sum over shards
RUNS = {  # name -> CacheConfig fields
    "foca-fixed": dict(method="foca", method_options=SHARDED_FOCA, interval=3),
    "foca-r7-fixed": dict(method="foca", method_options={"reading": "r7"}, interval=3),  # closed form: shard-local
    "rfc-fixed": dict(method="rfc", method_options={"norm": "token"}, interval=4),  # token norms: shard-local
    # the default per-sample norms, all-reduced over the token shards
    "rfc-sample-fixed": dict(method="rfc", method_options={"sharded": True}, interval=4),
    "foca-rcs": dict(method="foca", method_options=SHARDED_FOCA, schedule="rcs", rcs_threshold=0.05, rcs_max_gap=6,
                     rcs_reduce="sum"),
    "rfc-rcs": dict(method="rfc", method_options={"norm": "token"}, schedule="rcs", rcs_threshold=0.05, rcs_max_gap=6,
                    rcs_reduce="sum"),
}
# the control: without sharded=True each shard fits its own weights, so the sharded run differs
CONTROLS = {"foca-fit-per-shard": dict(method="foca", interval=3)}
DP = dict(method="foca", schedule="rcs", rcs_threshold=0.05, rcs_max_gap=6, rcs_reduce="max")


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    net = make_net()
    res = {"unsharded": {}, "sharded": {}}
    # unsharded references and data-parallel decisions alone, before any process group exists
    x = latents(0)
    for name, cfg in {**RUNS, **CONTROLS}.items():
        res["unsharded"][name] = cached_run(net, x, **cfg)
    res["dp_alone"] = cached_run(net, latents(100 + rank), **DP)[1]

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res["dp"] = cached_run(net, latents(100 + rank), **DP)[1]
        shard = slice(rank * T // WORLD, (rank + 1) * T // WORLD)
        net.shard(True)
        for name, cfg in {**RUNS, **CONTROLS}.items():
            y, pattern = cached_run(net, x[:, shard].contiguous(), **cfg)
            ys = [torch.empty_like(y) for _ in range(WORLD)]
            dist.all_gather(ys, y)
            res["sharded"][name] = (torch.cat(ys, 1), pattern)
        net.shard(False)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_data_parallel_ranks_take_identical_decisions(results):
    alone = [r["dp_alone"] for r in results]
    together = [r["dp"] for r in results]
    assert alone[0] != alone[1], "the ranks' samples should decide differently alone (else this test shows nothing)"
    assert together[0] == together[1]
    assert "s" in together[0]
    # the shared decision computes every step either rank computes alone... up to the first difference
    first = next(i for i, (a, b) in enumerate(zip(*alone)) if a != b)
    either = "".join("F" if "F" in (a, b) else "s" for a, b in zip(alone[0], alone[1]))
    assert together[0][: first + 1] == either[: first + 1]


@pytest.mark.parametrize("name", list(RUNS))
def test_sequence_sharded_run_equals_unsharded(results, name):
    y_ref, p_ref = results[0]["unsharded"][name]
    for r in results:
        y, p = r["sharded"][name]
        assert p == p_ref
        assert "s" in p
        assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5), (name, (y - y_ref).abs().max())


def test_calibrated_fit_per_shard_differs_without_sharded(results):
    """The control for foca-fixed above: the same run without ``sharded=True`` fits (phi, theta)
    on each rank's tokens alone, and its samples differ from the unsharded run's."""
    y_ref, p_ref = results[0]["unsharded"]["foca-fit-per-shard"]
    y, p = results[0]["sharded"]["foca-fit-per-shard"]
    assert p == p_ref
    assert (y - y_ref).abs().max() > 1e-4
