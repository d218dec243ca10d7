"""The model families in one file: PCA, the deep autoencoder, the VAE and β-VAE, and semantic hashing.

Every model has the same surface, which export, evaluation and training use:
  encode(x)        -> (mean [N, K], logvar [N, K] or None)
  decode_raw(z)    -> the decoder's raw output (logits, or the Gaussian mean)
  decode(z)        -> reconstruction in data space (probabilities or values)
  loss(x, step)    -> (scalar loss, dict of named parts per example)

References
- PCA: the linear baseline of Hinton & Salakhutdinov (Science 2006).
- AE: their deep autoencoder, e.g. 784-1000-500-250-30 with a mirrored decoder
  and a linear code layer. We train it end to end with Adam and ReLU-family
  units instead of RBM pretraining; see README for the recipe and figures.
- VAE: Kingma & Welling (2013), Gaussian q(z|x) with mean and log-variance
  heads, reparameterised sample, analytic KL(N(μ, σ²) ‖ N(0, I)) =
  ½ Σ(−log σ² + μ² + σ² − 1).
- β-VAE: Higgins et al. (2017) weight the KL by β; Burgess et al. (2018)
  instead pull the KL towards a capacity C that grows linearly to C_max:
  loss = recon + γ |KL − C|.
- hash: semantic hashing (Salakhutdinov & Hinton 2009): an autoencoder whose
  code layer is a sigmoid, driven to 0/1 by Gaussian noise added to its input
  while training (the paper's "deterministic noise"; here N(0, hash_noise²),
  4 by default): to carry information through the noise the net must push the
  sigmoid's input far from 0, so thresholding at ½ loses little. The code is
  the probabilities; the bundle's encoder also gives the bits, packed.

Architectures (`arch`): mlp, fully connected layers as above, or conv for
images: stride-2 3×3 convolutions halving the image until it is at most 4×4
(channels 32, 64, 128, 256, ...), a linear code layer, and the mirror image
with transposed convolutions, in the style of PyTorch-VAE (without batch
norm: it would tie a code to its batch). Both take and give flat rows, so the
bundle, the service and the index see no difference.

Likelihoods (the decoder's output distribution):
- bernoulli: data in [0, 1]; logits out, sigmoid in data space.
- gaussian: any real data; per-feature learned variance.
- multinomial: documents; softmax over words, the target is the weighted
  word-count vector (the 2006 paper's softmax over word counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("pca", "ae", "vae", "beta_vae", "hash")
ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian", "multinomial")
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
LOG_2PI = math.log(2 * math.pi)


@dataclass
class ModelConfig:
    kind: str
    input_dim: int
    latent_dim: int
    hidden: tuple[int, ...] = (1000, 500, 250)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    beta: float = 1.0  # β-VAE: weight of the KL term (1.0 = plain VAE)
    capacity_max: float | None = None  # Burgess: C_max in nats; None = β form
    capacity_gamma: float = 100.0
    capacity_ramp_steps: int = 10000
    kl_warmup_steps: int = 0  # VAE kinds: the KL weight rises linearly from 0 over these steps (0: off)
    iw_samples: int = 1       # VAE: importance samples of the training bound; >1 is IWAE (Burda et al. 2015)
    arch: str = "mlp"         # mlp, or conv (images: needs input_shape)
    input_shape: tuple[int, int, int] | None = None  # [C, H, W] of image inputs
    channels: tuple[int, ...] = (32, 64, 128, 256)   # conv: channels of the stride-2 layers, as many as needed
    hash_noise: float = 4.0   # hash: std of the noise added to the code layer's input while training


def mlp(dims: list[int], activation: str) -> nn.Sequential:
    """Linear layers with an activation between them and none after the last."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def reconstruction_nll(raw: torch.Tensor, x: torch.Tensor, likelihood: str, logvar: torch.Tensor | None) -> torch.Tensor:
    """−log p(x | z) per example, summed over features."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").sum(-1)
    if likelihood == "gaussian":
        return 0.5 * (((x - raw) ** 2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)
    if likelihood == "multinomial":
        return -(x * F.log_softmax(raw, dim=-1)).sum(-1)
    raise ValueError(likelihood)


def to_data_space(raw: torch.Tensor, likelihood: str) -> torch.Tensor:
    if likelihood == "bernoulli":
        return torch.sigmoid(raw)
    if likelihood == "multinomial":
        return torch.softmax(raw, dim=-1)
    return raw


def reconstruction_target(x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """What decode() approximates: the data itself, or word proportions for documents."""
    return x / x.sum(-1, keepdim=True).clamp_min(1e-7) if likelihood == "multinomial" else x


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per example, in closed form."""
    return 0.5 * (-logvar + mu.pow(2) + logvar.exp() - 1.0).sum(-1)


class Codec(nn.Module):
    """Shared decoder-side behaviour: output head, likelihood and its variance."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Per-feature log-variance of the Gaussian likelihood (unused otherwise).
        self.out_logvar = nn.Parameter(torch.zeros(cfg.input_dim), requires_grad=cfg.likelihood == "gaussian")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return to_data_space(self.decode_raw(z), self.cfg.likelihood)

    def recon_nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return reconstruction_nll(self.decode_raw(z), x, self.cfg.likelihood, self.out_logvar)


class PCA(Codec):
    """Principal components, fitted in closed form; the linear baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("mean", torch.zeros(cfg.input_dim))
        self.register_buffer("components", torch.zeros(cfg.input_dim, cfg.latent_dim))
        self.register_buffer("explained_variance", torch.zeros(cfg.latent_dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> PCA:
        x = x.double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.cfg.latent_dim]
        comps = evecs[:, order]
        # Fix each component's sign (largest entry positive) so fits are reproducible.
        signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        self.mean.copy_(mean.float())
        self.components.copy_((comps * signs).float())
        self.explained_variance.copy_(evals[order].clamp_min(0).float())
        return self

    def encode(self, x: torch.Tensor):
        return (x - self.mean) @ self.components, None

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components.T + self.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(z)  # linear in data space, as the published baseline

    def loss(self, x: torch.Tensor, step: int = 0):
        err = ((self.decode(self.encode(x)[0]) - x) ** 2).sum(-1)
        return err.mean(), {"sq_error": err}


class ConvEncoder(nn.Module):
    """Flat image rows -> features: stride-2 3x3 convolutions until the image is at most 4x4, flattened.

    `sizes` keeps each layer's (H, W), from the input down, so the decoder can retrace them exactly
    for any image size (odd sizes included: 28 -> 14 -> 7 -> 4 and back)."""

    def __init__(self, shape: tuple[int, int, int], channels: tuple[int, ...], activation: str):
        super().__init__()
        c, h, w = shape
        self.shape, self.sizes, layers = tuple(shape), [(h, w)], []
        for out in channels:
            if max(h, w) <= 4:
                break
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), ACTIVATIONS[activation]()]
            c, h, w = out, (h + 1) // 2, (w + 1) // 2
            self.sizes.append((h, w))
        self.net = nn.Sequential(*layers)
        self.out_channels, self.out_dim = c, c * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, *self.shape)).flatten(1)


class ConvDecoder(nn.Module):
    """Codes -> flat image rows: a linear layer to the encoder's last feature map, then transposed
    convolutions retracing its sizes (output_padding picks the odd or even size), the last one linear."""

    def __init__(self, latent_dim: int, enc: ConvEncoder, channels: tuple[int, ...], activation: str):
        super().__init__()
        (h, w), c = enc.sizes[-1], enc.out_channels
        self.start = (c, h, w)
        self.fc = nn.Sequential(nn.Linear(latent_dim, c * h * w), ACTIVATIONS[activation]())
        outs = [*reversed(channels[: len(enc.sizes) - 2]), enc.shape[0]]
        layers: list[nn.Module] = []
        for i, ((th, tw), (sh, sw), out) in enumerate(zip(reversed(enc.sizes[:-1]), reversed(enc.sizes[1:]), outs)):
            pad = (th - (2 * sh - 1), tw - (2 * sw - 1))  # 0 or 1: a 3x3 stride-2 transpose gives 2n-1 (+1)
            layers.append(nn.ConvTranspose2d(c, out, 3, stride=2, padding=1, output_padding=pad))
            if i < len(outs) - 1:
                layers.append(ACTIVATIONS[activation]())
            c = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.start)).flatten(1)


def encoder_trunk(cfg: ModelConfig, out_dim: int | None) -> tuple[nn.Module, int]:
    """The input side of an encoder: (module, width of what it gives). With out_dim, an mlp ends in a
    linear layer of that width (the code itself); a conv trunk is followed by a linear layer to it."""
    if cfg.arch == "conv":
        trunk = ConvEncoder(cfg.input_shape, cfg.channels, cfg.activation)
        if out_dim is None:
            return trunk, trunk.out_dim
        return nn.Sequential(trunk, nn.Linear(trunk.out_dim, out_dim)), out_dim
    dims = [cfg.input_dim, *cfg.hidden]
    if out_dim is None:
        net = mlp(dims, cfg.activation)
        net.append(ACTIVATIONS[cfg.activation]())
        return net, dims[-1]
    return mlp([*dims, out_dim], cfg.activation), out_dim


def decoder_net(cfg: ModelConfig) -> nn.Module:
    """Codes [N, K] -> the raw output [N, input_dim]: the mirror image of the encoder."""
    if cfg.arch == "conv":
        enc = ConvEncoder(cfg.input_shape, cfg.channels, cfg.activation)  # only its sizes are used
        return ConvDecoder(cfg.latent_dim, enc, cfg.channels, cfg.activation)
    return mlp([cfg.latent_dim, *reversed([cfg.input_dim, *cfg.hidden])], cfg.activation)


class AE(Codec):
    """Deterministic deep autoencoder with a linear code layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder, _ = encoder_trunk(cfg, cfg.latent_dim)
        self.decoder = decoder_net(cfg)

    def encode(self, x: torch.Tensor):
        return self.encoder(x), None

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, step: int = 0):
        nll = self.recon_nll(x, self.encode(x)[0])
        return nll.mean(), {"recon": nll}


class VAE(Codec):
    """Kingma & Welling's VAE; with beta or capacity set, the β-VAE of Higgins / Burgess."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.trunk, width = encoder_trunk(cfg, None)
        self.mean_head = nn.Linear(width, cfg.latent_dim)
        self.logvar_head = nn.Linear(width, cfg.latent_dim)
        self.decoder = decoder_net(cfg)

    def encode(self, x: torch.Tensor):
        h = self.trunk(x)
        return self.mean_head(h), self.logvar_head(h).clamp(-20.0, 10.0)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def capacity(self, step: int) -> float:
        c = self.cfg
        return c.capacity_max * min(1.0, step / max(c.capacity_ramp_steps, 1)) if c.capacity_max is not None else 0.0

    def kl_weight(self, step: int) -> float:
        """KL warm-up (Sønderby et al. 2016): the weight rises from 0 to 1 over kl_warmup_steps, so the
        decoder learns to use the code before the KL term can switch latent units off."""
        warm = self.cfg.kl_warmup_steps
        return min(1.0, (step + 1) / warm) if warm and self.training else 1.0

    def loss(self, x: torch.Tensor, step: int = 0):
        mu, logvar = self.encode(x)
        k = self.cfg.iw_samples if self.training else 1
        if k > 1:
            return self._iwae_loss(x, mu, logvar, k, step)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        nll = self.recon_nll(x, z)
        kl = gaussian_kl(mu, logvar)
        if self.cfg.capacity_max is not None:
            total = nll + self.cfg.capacity_gamma * (kl - self.capacity(step)).abs()
        else:
            total = nll + self.cfg.beta * self.kl_weight(step) * kl
        return total.mean(), {"recon": nll, "kl": kl, "neg_elbo": nll + kl}

    def _iwae_loss(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int, step: int):
        """−log (1/k Σ w_i), w_i = p(x, z_i) / q(z_i | x): the importance-weighted bound, tighter than the
        ELBO for k > 1. During warm-up the prior and posterior terms of log w are scaled like the KL."""
        eps = torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps                               # [k, b, K]
        nll = self.recon_nll(x.expand(k, *x.shape).reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])).view(k, -1)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)
        log_w = -nll + self.kl_weight(step) * (log_pz - log_qz)
        bound = -(torch.logsumexp(log_w, 0) - math.log(k))
        kl = gaussian_kl(mu, logvar)
        return bound.mean(), {"recon": nll.mean(0), "kl": kl, "neg_elbo": nll.mean(0) + kl, "neg_iwae": bound}


class Hash(AE):
    """Semantic hashing: the code is sigmoid(a) for the code layer's input a, noisy while training.

    encode() gives the probabilities (the float code); bits() thresholds them at ½, and the bundle's
    encoder packs them 8 to a byte (numpy's packbits order: the first bit is the high bit)."""

    def encode(self, x: torch.Tensor):
        a = self.encoder(x)
        if self.training and self.cfg.hash_noise > 0:
            a = a + self.cfg.hash_noise * torch.randn_like(a)
        return torch.sigmoid(a), None

    def loss(self, x: torch.Tensor, step: int = 0):
        p = self.encode(x)[0]
        nll = self.recon_nll(x, p)
        # How far from binary the codes are (0: all 0 or 1): a figure to watch, not a term of the loss.
        return nll.mean(), {"recon": nll, "code_entropy": binary_entropy(p.detach())}


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy in bits of each code unit's Bernoulli(p), per example."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p)).mean(-1)


def pack_bits(p: torch.Tensor) -> torch.Tensor:
    """Probabilities [N, B] (B a multiple of 8) -> bits thresholded at ½, packed [N, B/8] uint8, high bit first."""
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.float32, device=p.device)
    bits = (p > 0.5).to(torch.float32).reshape(p.shape[0], -1, 8)
    return (bits * weights).sum(-1).to(torch.uint8)


def build_model(cfg: ModelConfig) -> Codec:
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown model kind {cfg.kind!r}")
    if cfg.likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {cfg.likelihood!r}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown architecture {cfg.arch!r}")
    if cfg.arch == "conv" and (cfg.kind == "pca" or cfg.input_shape is None):
        raise ValueError("arch conv needs image inputs (input_shape) and a neural model")
    return {"pca": PCA, "ae": AE, "vae": VAE, "beta_vae": VAE, "hash": Hash}[cfg.kind](cfg)
