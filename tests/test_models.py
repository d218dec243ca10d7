"""Models: shapes, the closed-form KL, PCA against numpy, and a loss that falls."""

import numpy as np
import pytest
import torch

from zspace.training.models import ModelConfig, build_model, gaussian_kl


@pytest.mark.parametrize("kind", ["pca", "ae", "vae", "beta_vae"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "multinomial"])
def test_shapes(kind, likelihood):
    m = build_model(ModelConfig(kind=kind, input_dim=20, latent_dim=3, hidden=(16, 8), likelihood=likelihood))
    x = torch.rand(5, 20)
    mu, logvar = m.encode(x)
    assert mu.shape == (5, 3)
    assert (logvar is not None) == (kind in ("vae", "beta_vae"))
    out = m.decode(mu)
    assert out.shape == (5, 20)
    if likelihood == "multinomial" and kind != "pca":
        assert torch.allclose(out.sum(1), torch.ones(5), atol=1e-5)
    loss, parts = m.loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[-0.7, 0.3]])
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(200_000, 2)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert float(gaussian_kl(mu, logvar)) == pytest.approx(float((log_q - log_p).mean()), abs=0.01)


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))).astype(np.float32)
    m = build_model(ModelConfig(kind="pca", input_dim=6, latent_dim=2)).fit(torch.from_numpy(x))
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T @ vt[:2] + x.mean(0)
    got = m.decode(m.encode(torch.from_numpy(x))[0]).numpy()
    assert np.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_loss_falls_in_a_few_steps(kind):
    from zspace.data import load_dataset

    torch.manual_seed(0)
    x = torch.from_numpy(load_dataset("digits").x_train[:256])
    m = build_model(ModelConfig(kind=kind, input_dim=64, latent_dim=4, hidden=(64, 32)))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(m.loss(x)[0].detach())
    for _ in range(30):
        loss, _ = m.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m.loss(x)[0].detach()) < 0.8 * first


def test_capacity_ramps_to_c_max():
    m = build_model(ModelConfig(kind="beta_vae", input_dim=8, latent_dim=2, hidden=(8,),
                                capacity_max=25.0, capacity_ramp_steps=100))
    assert m.capacity(0) == 0.0 and m.capacity(50) == pytest.approx(12.5) and m.capacity(1000) == 25.0
    m_beta = build_model(ModelConfig(kind="beta_vae", input_dim=8, latent_dim=2, hidden=(8,), beta=4.0))
    x = torch.rand(4, 8)
    torch.manual_seed(0)
    _, parts = m_beta.loss(x)
    torch.manual_seed(0)
    loss, _ = m_beta.loss(x)
    assert float(loss.detach()) == pytest.approx(float((parts["recon"] + 4.0 * parts["kl"]).mean().detach()), rel=1e-5)


def test_random_shift_moves_pixels_within_bounds():
    from zspace.training.train import random_shift

    x = torch.zeros(200, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0  # one lit pixel in the centre
    torch.manual_seed(0)
    out = random_shift(x.view(200, 25), (1, 5, 5), 1).view(200, 5, 5)
    assert torch.all(out.sum((1, 2)) == 1.0), "a shift by one keeps the centre pixel inside"
    ys, xs = torch.nonzero(out, as_tuple=True)[1:]
    assert set(ys.tolist()) == {1, 2, 3} and set(xs.tolist()) == {1, 2, 3}, "all nine offsets occur"


def test_kl_warm_up_and_the_importance_weighted_bound():
    import torch

    from zspace.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="vae", input_dim=20, latent_dim=3, hidden=(16,), kl_warmup_steps=100,
                                    iw_samples=50))
    model.train()
    assert [model.kl_weight(s) for s in (0, 49, 99, 500)] == [0.01, 0.5, 1.0, 1.0]
    model.eval()
    assert model.kl_weight(0) == 1.0, "evaluation always weighs the KL fully"
    x = (torch.rand(64, 20) > 0.5).float()
    model.train()
    with torch.no_grad():
        _, parts = model.loss(x, step=1000)
    # The IWAE bound with 50 samples is tighter than the ELBO (Burda et al.): -log p(x) <= neg_iwae <= neg_elbo on average.
    assert float(parts["neg_iwae"].mean()) < float(parts["neg_elbo"].mean())
