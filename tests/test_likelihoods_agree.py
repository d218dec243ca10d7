"""The likelihood and KL maths exist twice, by necessity: in torch (training/models.py, differentiated while
training) and in numpy (zspace/likelihood.py, evaluation and the Score RPC, with no torch). They must agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zspace.likelihood import kl_standard_normal, log_likelihood, target_of
from zspace.training.models import gaussian_kl, reconstruction_nll, reconstruction_target, to_data_space


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "multinomial"])
def test_reconstruction_likelihoods_agree(likelihood):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((16, 12)).astype(np.float32)  # the decoder's output before its data-space head
    if likelihood == "bernoulli":
        x = rng.random((16, 12)).astype(np.float32)
    elif likelihood == "multinomial":
        x = rng.poisson(2.0, (16, 12)).astype(np.float32)
    else:
        x = rng.standard_normal((16, 12)).astype(np.float32)
    logvar = rng.normal(0, 0.5, 12).astype(np.float32)
    torch_nll = reconstruction_nll(torch.from_numpy(raw), torch.from_numpy(x), likelihood,
                                   torch.from_numpy(logvar) if likelihood == "gaussian" else None).numpy()
    x_hat = to_data_space(torch.from_numpy(raw), likelihood).numpy()
    numpy_ll = log_likelihood(x, x_hat, likelihood, logvar if likelihood == "gaussian" else None)
    np.testing.assert_allclose(-numpy_ll, torch_nll, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(target_of(x, likelihood), reconstruction_target(torch.from_numpy(x), likelihood).numpy(),
                               rtol=1e-6)


def test_kl_agrees():
    rng = np.random.default_rng(1)
    mean, logvar = rng.standard_normal((16, 8)).astype(np.float32), rng.normal(0, 1, (16, 8)).astype(np.float32)
    np.testing.assert_allclose(kl_standard_normal(mean, logvar),
                               gaussian_kl(torch.from_numpy(mean), torch.from_numpy(logvar)).numpy(), rtol=1e-5, atol=1e-5)
