"""The shipped digits DiT and classifier (foca_kernels.demo): they load, the DiT draws the
requested digits, the classifier is accurate, and the metrics are right on known inputs.
Needs the ``demo`` extra; skipped without it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from foca_kernels.demo import classifier as demo_classifier  # noqa: E402
from foca_kernels.demo import digits, metrics, model as demo_model, sampler  # noqa: E402


@pytest.fixture(scope="module")
def dit():
    return demo_model.load_digits_dit()


@pytest.fixture(scope="module")
def clf():
    return demo_classifier.load_digits_classifier()


@pytest.fixture(scope="module")
def test_split():
    return digits.load_digits("test")


# ---------------------------------------------------------------- data


def test_digits_split_is_fixed_disjoint_and_scaled():
    x_tr, y_tr = digits.load_digits("train")
    x_te, y_te = digits.load_digits("test")
    x_all, _ = digits.load_digits("all")
    assert x_tr.shape == (1438, 1, 8, 8) and x_te.shape == (359, 1, 8, 8) and x_all.shape[0] == 1797
    assert x_tr.dtype == torch.float32 and float(x_all.min()) == -1.0 and float(x_all.max()) == 1.0
    assert torch.bincount(y_te, minlength=10).min() >= 35  # stratified
    tr, te = digits.split_indices(np.arange(10).repeat(10))
    assert set(tr.tolist()).isdisjoint(te.tolist())
    x_tr2, y_tr2 = digits.load_digits("train")
    assert torch.equal(x_tr, x_tr2) and torch.equal(y_tr, y_tr2)
    assert digits.load_digits("test", size=16)[0].shape == (359, 1, 16, 16)


# ---------------------------------------------------------------- shipped weights


def test_shipped_dit_loads_with_the_documented_architecture(dit):
    from diffusers import DiTTransformer2DModel

    assert isinstance(dit, DiTTransformer2DModel)
    assert not dit.training
    assert next(dit.parameters()).dtype == torch.float32
    cfg = dit.config
    assert (cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.num_embeds_ada_norm) == (8, 1, 1, 10)
    assert len(dit.transformer_blocks) == cfg.num_layers
    # the null class row used by classifier-free guidance exists in every block's label table
    emb = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert emb.num_embeddings == demo_model.NULL_CLASS + 1
    meta = demo_model.load_dit_meta()
    assert meta["config"] == {k: cfg[k] for k in meta["config"]}
    assert meta["parameters"] == demo_model.count_parameters(dit)
    assert all(torch.isfinite(p).all() for p in dit.parameters())


def test_shipped_classifier_is_accurate_on_held_out_digits(clf, test_split):
    x, y = test_split
    assert metrics.classifier_accuracy(clf, x, y) >= 0.97
    f = clf.features(x[:7])
    assert f.shape == (7, demo_classifier.FEATURE_DIM) and f.dtype == torch.float32
    assert clf.predict(x[:7]).dtype == torch.int64
    # 16x16 inputs are resized to 8x8
    big = torch.nn.functional.interpolate(x[:20], size=16, mode="nearest")
    assert torch.equal(clf.predict(big), clf.predict(x[:20]))


CLASSES = list(range(10))


def test_fixed_seed_samples_are_the_requested_digits(dit, clf):
    labels = torch.tensor(CLASSES)
    imgs = sampler.sample(dit, labels, seed=0)  # the real setting: 50 steps, default CFG
    assert imgs.shape == (len(CLASSES), 1, 8, 8)
    assert float(imgs.min()) >= -1.0 and float(imgs.max()) <= 1.0
    assert clf.predict(imgs).tolist() == CLASSES


def test_sampler_is_deterministic_and_per_sample_seeded(dit):
    a = sampler.sample(dit, [2, 5], seed=11, num_steps=4)
    b = sampler.sample(dit, [2, 5], seed=11, num_steps=4)
    assert torch.equal(a, b)
    # sample i depends on seed + i and its own label only, not on the batch around it
    c = sampler.sample(dit, [5], seed=12, num_steps=4)
    torch.testing.assert_close(c[0], a[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(a, sampler.sample(dit, [2, 5], seed=12, num_steps=4))


def test_sampler_calls_the_transformer_once_per_step_and_reports_steps(dit):
    calls, seen = [], []
    handle = dit.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]),
                                           with_kwargs=True)
    try:
        sampler.sample(dit, [1, 2, 3], seed=0, num_steps=6, callback=lambda info: seen.append(info))
        assert calls == [6] * 6  # batched CFG: one call of batch 2B per step
        calls.clear()
        sampler.sample(dit, [1, 2, 3], seed=0, num_steps=6, guidance_scale=1.0)
        assert calls == [3] * 6
        calls.clear()
        sampler.sample(dit, [1, 2, 3], seed=0, num_steps=6, cfg="separate")
        assert calls == [3] * 12
    finally:
        handle.remove()
    assert [s.step for s in seen] == list(range(6))
    assert seen[0].sigma == pytest.approx(1.0) and seen[-1].sigma_next == 0.0
    assert all(s.timestep == pytest.approx(1000 * s.sigma, rel=1e-5) for s in seen)
    assert sampler.transformer_calls_per_step(cfg="separate") == 2


def test_batched_and_separate_cfg_agree(dit):
    a = sampler.sample(dit, [6, 9], seed=3, num_steps=5, cfg="batched")
    b = sampler.sample(dit, [6, 9], seed=3, num_steps=5, cfg="separate")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sampler_passes_context_names(dit):
    names = []

    class Ctx:
        def __init__(self, name, **info):
            names.append((name, info["step_index"]))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    sampler.sample(dit, [1], seed=0, num_steps=2, context=Ctx)
    sampler.sample(dit, [1], seed=0, num_steps=1, context=Ctx, cfg="separate")
    sampler.sample(dit, [1], seed=0, num_steps=1, context=Ctx, guidance_scale=1)
    assert names == [("cond_uncond", 0), ("cond_uncond", 1), ("cond", 0), ("uncond", 0), ("cond", 0)]


def test_sampler_rejects_bad_arguments(dit):
    with pytest.raises(ValueError):
        sampler.sample(dit, [10], num_steps=1)
    with pytest.raises(ValueError):
        sampler.sample(dit, [1], num_steps=1, cfg="bogus")
    with pytest.raises(ValueError):
        sampler.sample(dit, [1, 2], num_steps=1, noise=torch.zeros(3, 1, 8, 8))


# ---------------------------------------------------------------- metrics on known inputs


def test_psnr_and_relative_l2_on_known_inputs():
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    assert metrics.psnr(x, x) == math.inf
    assert metrics.psnr(x, x, max_db=100.0) == 100.0
    assert metrics.relative_l2(x, x) == 0.0
    # a constant error e everywhere: MSE e^2, PSNR = 10 log10(4 / e^2)
    e = 0.1
    assert metrics.psnr(x + e, x) == pytest.approx(10 * math.log10(4 / e ** 2), rel=1e-9)
    per = metrics.psnr(torch.cat([x[:1], x[1:] + e]), x, reduction="none")
    assert per[0] == math.inf and per[1:].tolist() == pytest.approx([20 * math.log10(2 / e)] * 3)
    ref = torch.ones(2, 1, 8, 8)
    assert metrics.relative_l2(ref * 1.5, ref) == pytest.approx(0.5)
    assert metrics.relative_l2(ref * 0.0, ref, reduction="none").tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError):
        metrics.psnr(x, x[:2])


def test_frechet_distance_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # pure mean shift: distance = ||shift||^2 exactly (same covariance)
    shift = torch.full((16,), 0.5, dtype=torch.float64)
    assert metrics.frechet_distance(a + shift, a) == pytest.approx(16 * 0.25, rel=1e-8)
    d = [metrics.frechet_distance(a + s, a) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]
    # known Gaussians: N(0, I) vs N(0, 4I) in D dims -> D (1 + 4 - 2*2) = D
    i = torch.eye(3, dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64)
    assert metrics.frechet_distance_from_stats(mu, i, mu, 4 * i) == pytest.approx(3.0, rel=1e-10)
    # non-commuting covariances against the textbook formula, checked via eigendecompositions
    s1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    r = metrics.sqrtm_psd(s1)
    assert torch.allclose(r @ r, s1, atol=1e-12)
    w = torch.linalg.eigvals(s1 @ s2)  # eigenvalues of S1 S2 are real and >= 0
    expected = float(torch.trace(s1 + s2) - 2 * w.real.clamp_min(0).sqrt().sum())
    assert metrics.frechet_distance_from_stats(mu[:2], s1, mu[:2], s2) == pytest.approx(expected, rel=1e-10)


def test_classifier_fid_is_small_for_real_digits_and_grows_with_a_shift(clf, test_split):
    x, _ = test_split
    assert metrics.classifier_fid(clf, x, x) == pytest.approx(0.0, abs=1e-6)
    train_x, _ = digits.load_digits("train")
    real = metrics.classifier_fid(clf, train_x, x)
    shifted = [metrics.classifier_fid(clf, (x + s).clamp(-1, 1), x) for s in (0.2, 0.5)]
    assert real < shifted[0] < shifted[1]


def test_grid_png_is_written(tmp_path):
    pytest.importorskip("PIL")
    x, _ = digits.load_digits("test")
    path = digits.save_grid(x[:20], tmp_path / "g.png", nrow=10, upscale=2, rows=[x[20:40]])
    from PIL import Image

    img = Image.open(path)
    assert img.size == (10 * (16 + 1) + 1, 2 * (2 * (16 + 1) + 1) + 4)
