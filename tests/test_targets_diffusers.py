"""Default targets cover the attention and feed-forward modules of every block of every
transformer class diffusers exports.

Each class is built on the "meta" device (structure only, no memory, no weights) from its
default config with the layer counts cut to 2, plus the few kwargs some classes need. The
test names attention and feed-forward modules its own way (diffusers' base classes, and
class names for the families that define their own) and checks that each lies at or under a
cached module. A block whose MLP is inline (plain Linear layers, FLUX-style single blocks)
must be cached whole. Every target, at both granularities, lies in a block list, so
``compute_blocks`` means the same on every class.
"""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch.nn as nn

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import AttentionModuleMixin, FeedForward  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from foca_kernels.hooks import CacheConfig  # noqa: E402
from foca_kernels.hooks.targets import block_position, select_sites  # noqa: E402

# kwargs a class needs beyond cutting its layer counts
EXTRA = {
    "WanVACETransformer3DModel": dict(vace_layers=[0, 1]),
}
# classes whose default config cannot be built at all (required dimensions default to None)
CANNOT_BUILD = {
    "DreamLiteTransformer2DModel": "default config has 4 channels with 32 norm groups",
    "EasyAnimateTransformer3DModel": "default config leaves sample sizes None",
    "HiDreamImageTransformer2DModel": "default config leaves a dimension None",
    "LatteTransformer3DModel": "default config leaves sample sizes None",
    "OmniGenTransformer2DModel": "default config leaves a dimension None",
    "Transformer2DModel": "default config sets no input kind (in_channels None); its DiT/PixArt uses run in "
                          "test_hooks_models",
    "TransformerTemporalModel": "default config has 4 channels with 32 norm groups (UNet temporal layers)",
}
# feed-forward modules that are plain nn.Sequential (no class name to go by), per class
SEQUENTIAL_FF = {
    "WanAnimate2Transformer3DModel": "ffn",
}
LAYER_ARG = re.compile(r"num_(\w+_)?layers|num_(\w+_)?blocks|depth")
FF_CLASS = re.compile(r".*(FeedForward|MLP|Mlp|SwiGLU|GLUMB\w*)")

CLASSES = sorted(n for n in dir(diffusers) if "Transformer" in n and n.endswith("Model"))


def build(name):
    cls = getattr(diffusers, name)
    kw = {}
    for p, v in inspect.signature(cls.__init__).parameters.items():
        if LAYER_ARG.fullmatch(p) and isinstance(v.default, int) and v.default > 2:
            kw[p] = 2
    kw.update(EXTRA.get(name, {}))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(**kw)


def is_attention(m):
    return isinstance(m, (Attention, AttentionModuleMixin)) or type(m).__name__.endswith("Attention")


def is_feed_forward(m):
    return isinstance(m, FeedForward) or bool(FF_CLASS.fullmatch(type(m).__name__))


def topmost(block, prefix, pred):
    """Names of modules in ``block`` satisfying ``pred``, not descending into a match."""
    found = []

    def walk(mod, path):
        for attr, child in mod.named_children():
            if pred(child):
                found.append(path + attr)
            else:
                walk(child, path + attr + ".")

    walk(block, prefix + ".")
    return found


@pytest.mark.parametrize("name", sorted(CANNOT_BUILD))
def test_cannot_build_list_is_honest(name):
    """A class is only left out while its default config really does not build."""
    if name not in CLASSES:
        pytest.skip(f"{name} is not exported by this diffusers version")
    with pytest.raises((TypeError, ValueError)):
        build(name)


@pytest.mark.parametrize("name", [c for c in CLASSES if c not in CANNOT_BUILD])
def test_default_targets_cover_every_block(name):
    try:
        model = build(name)
    except Exception as e:  # a class new in this diffusers version
        pytest.fail(f"{name} does not build from its default config ({type(e).__name__}: {e}); give it kwargs "
                    "in EXTRA, or name it in CANNOT_BUILD with the reason")
    sites = {s.name for s in select_sites(model, CacheConfig())}

    def covered(n):
        return any(n == s or n.startswith(s + ".") for s in sites)

    blocks = [
        (f"{lname}.{i}", block)
        for lname, lst in model.named_children() if isinstance(lst, nn.ModuleList)
        for i, block in enumerate(lst)
        if any(is_attention(m) for m in block.modules())
    ]
    assert blocks, f"{name}: no block list found by the test"
    for bname, block in blocks:
        attn = topmost(block, bname, is_attention)
        ff = topmost(block, bname, is_feed_forward)
        if name in SEQUENTIAL_FF:
            ff.append(f"{bname}.{SEQUENTIAL_FF[name]}")
        missing = [n for n in attn + ff if not covered(n)]
        assert not missing, f"{name}: not cached: {missing}"
        if not ff:  # inline MLP: only the whole block holds it
            assert covered(bname), f"{name}: block {bname} has no feed-forward module and is not cached whole"
    _check_compute_blocks(name, model)


def _check_compute_blocks(name, model):
    """Every default target, at both granularities, lies in a block list, and ``compute_blocks=1``
    drops exactly those in block 0 of each list (the first block of every list is computed)."""
    for granularity in ("module", "block"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            every = [s.name for s in select_sites(model, CacheConfig(granularity=granularity))]
            where = {n: block_position(model, n) for n in every}
            outside = [n for n, p in where.items() if not p]
            assert not outside, f"{name} ({granularity}): outside any block list: {outside}"
            kept = [n for n in every if where[n][1] >= 1]
            if kept:
                got = [s.name for s in select_sites(model, CacheConfig(granularity=granularity, compute_blocks=1))]
                assert got == kept, f"{name} ({granularity})"
            else:
                with pytest.raises(ValueError, match="nothing is left"):
                    select_sites(model, CacheConfig(granularity=granularity, compute_blocks=1))


# ---- the structural defaults at work: families without a table, tiny and on CPU ----------
def _gen(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


RUNS = {
    "AuraFlowTransformer2DModel": (
        dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
             out_channels=4, pos_embed_max_size=16),
        lambda t: dict(hidden_states=_gen(1, 1, 4, 8, 8), encoder_hidden_states=_gen(2, 1, 3, 16), timestep=t),
        ["joint_transformer_blocks.0.ff", "joint_transformer_blocks.0.ff_context", "single_transformer_blocks.0.ff"],
    ),
    "Lumina2Transformer2DModel": (
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
             num_attention_heads=2, num_kv_heads=2, multiple_of=16, cap_feat_dim=16, axes_dim_rope=(4, 6, 6),
             axes_lens=(32, 32, 32)),
        lambda t: dict(hidden_states=_gen(1, 1, 4, 8, 8), encoder_hidden_states=_gen(2, 1, 3, 16),
                       encoder_attention_mask=torch.ones(1, 3, dtype=torch.bool), timestep=t),
        ["layers.0.feed_forward", "noise_refiner.0.feed_forward"],
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_structural_defaults_run_cached(name):
    from foca_kernels.hooks import cache_info, disable_cache, enable_cache

    kwargs, inputs, expected = RUNS[name]
    torch.manual_seed(0)
    m = getattr(diffusers, name)(**kwargs).eval()

    def run():
        with torch.no_grad():
            return [m(**inputs(torch.tensor([1000.0 * s]))).sample for s in torch.linspace(1.0, 0.05, 7)]

    ref = run()
    enable_cache(m, interval=3, method="reuse")
    sites = {s.name for s in m.__dict__["_foca_cache"].sites}
    got = run()
    info = cache_info(m)
    disable_cache(m)
    assert set(expected) <= sites
    assert info.calls_forecast > 0
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])  # warm-up steps are computed
    assert all(torch.isfinite(g).all() for g in got)


# ---- compute_blocks on the tiny diffusers models (tests/hooks_tiny.py) ----------------------
@pytest.mark.parametrize("granularity,compute_blocks,expected", [
    ("module", 1, ["single_transformer_blocks.1"]),
    ("block", 1, ["single_transformer_blocks.1"]),
    ("block", (0, 1), ["single_transformer_blocks.0"]),
])
def test_compute_blocks_counts_each_block_list(granularity, compute_blocks, expected):
    """FLUX has two block lists (1 double block, 2 single blocks here): each is counted on its own."""
    import hooks_tiny as T

    m = T.flux()
    cfg = CacheConfig(granularity=granularity, compute_blocks=compute_blocks)
    assert [s.name for s in select_sites(m, cfg)] == expected


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_compute_blocks_on_dit_equals_explicit_targets(granularity):
    import hooks_tiny as T
    from foca_kernels.hooks import cache_info, cached

    case, m = T.CASES["dit"], T.dit()
    with cached(m, interval=3, granularity=granularity, compute_blocks=1):
        got = T.sample(case, m, steps=8, cfg="batched")
        info = cache_info(m)
    assert info.calls_forecast > 0 and torch.isfinite(got).all()
    assert info.modules == (2 if granularity == "module" else 1)  # block 1 only
    regex = r"transformer_blocks\.1\.(attn1|ff)" if granularity == "module" else r"transformer_blocks\.1"
    with cached(m, interval=3, granularity=granularity, targets=[regex]):
        assert torch.equal(T.sample(case, m, steps=8, cfg="batched"), got)
