"""Decoder likelihoods in numpy: shared by evaluation (training/) and Score (service/).

Both compute from the decoder's data-space output, so a run evaluated through
torch and a bundle served through ONNX Runtime give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-7


def target_of(x: np.ndarray, likelihood: str) -> np.ndarray:
    """What the decoder reconstructs: the data, or word proportions for documents."""
    if likelihood == "multinomial":
        return x / np.maximum(x.sum(-1, keepdims=True), EPS)
    return x


def log_likelihood(x: np.ndarray, x_hat: np.ndarray, likelihood: str, out_logvar=None) -> np.ndarray:
    """log p(x | z) per row, in float64, from the decoder's output in data space."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    if likelihood == "bernoulli":
        p = np.clip(x_hat, EPS, 1 - EPS)
        return (x * np.log(p) + (1 - x) * np.log1p(-p)).sum(-1)
    if likelihood == "multinomial":
        return (x * np.log(np.clip(x_hat, EPS, 1.0))).sum(-1)
    lv = np.zeros(x.shape[-1]) if out_logvar is None else np.asarray(out_logvar, np.float64)
    return -0.5 * (((x - x_hat) ** 2) * np.exp(-lv) + lv + math.log(2 * math.pi)).sum(-1)


def kl_standard_normal(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(μ, σ²) ‖ N(0, I)) per row, closed form."""
    mean, logvar = mean.astype(np.float64), logvar.astype(np.float64)
    return 0.5 * (-logvar + mean**2 + np.exp(logvar) - 1.0).sum(-1)
