"""A small real DiT for measuring forecast fidelity: a class-conditional diffusers
``DiTTransformer2DModel`` trained on scikit-learn's 8x8 handwritten digits, its sampler, a
digits classifier, and metrics. Needs the ``demo`` extra (diffusers, safetensors,
scikit-learn, pillow); nothing here is imported by ``foca_kernels`` itself.

    from foca_kernels.demo import load_digits_dit, load_digits_classifier, sample
    model = load_digits_dit()
    images = sample(model, labels=[0, 1, 2], seed=0)      # 50 Euler steps, CFG 1.5
    load_digits_classifier().predict(images)               # tensor([0, 1, 2])

Modules: ``digits`` (data, grids), ``model`` (architecture, loading), ``sampler``,
``classifier``, ``metrics``, ``train`` (``python -m foca_kernels.demo.train``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_digits": "digits", "class_labels": "digits", "save_grid": "digits", "image_grid": "digits",
    "DIT_CONFIG": "model", "NULL_CLASS": "model", "build_digits_dit": "model", "load_digits_dit": "model",
    "load_dit_meta": "model",
    "sample": "sampler", "StepInfo": "sampler", "initial_noise": "sampler", "make_scheduler": "sampler",
    "timesteps_and_sigmas": "sampler", "DEFAULT_GUIDANCE_SCALE": "sampler", "DEFAULT_NUM_STEPS": "sampler",
    "transformer_calls_per_step": "sampler",
    "DigitsClassifier": "classifier", "load_digits_classifier": "classifier",
    "psnr": "metrics", "relative_l2": "metrics", "classifier_accuracy": "metrics", "classifier_fid": "metrics",
    "frechet_distance": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy: importing the package costs nothing until a name is used
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
