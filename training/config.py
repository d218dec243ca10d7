"""The training settings, in a module of their own: the command line builds its options from them without
importing torch (`zspace --help` stays instant; a serving-only install has no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting with its one default: `zspace train`'s options are built from these fields
    (zspace.app.cli.train_options), so the command line and Python callers get the same run.
    0 for epochs and batch_size means auto, resolved in one place (`sized_for`)."""

    data: str = "digits"
    model: str = "vae"
    latent_dim: int = 2
    hidden: tuple[int, ...] = (1000, 500, 250)
    activation: str = "relu"
    likelihood: str = "auto"  # auto: bernoulli for images, multinomial for texts, gaussian otherwise
    epochs: int = 0       # 0: auto (sized_for)
    batch_size: int = 0   # 0: auto (sized_for)
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    binarize: bool = False  # train on Bernoulli samples of [0,1] data (binarised MNIST protocol)
    augment_shift: int = 0  # images: shift each training image by up to this many pixels (0: off)
    beta: float = 4.0     # beta_vae only (Higgins et al.'s weight of the KL term); other kinds use 1
    capacity_max: float | None = None
    capacity_gamma: float = 100.0
    capacity_ramp_steps: int = 10000
    kl_warmup_steps: int = 0  # VAE kinds: KL weight from 0 to 1 over these steps
    iw_samples: int = 1       # VAE: importance samples of the training bound (>1: IWAE)
    vocab_size: int = 2000
    weighting: str = "log1p"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    arch: str = "auto"        # mlp | conv | auto (conv for images of at least CONV_FROM pixels a side)
    channels: tuple[int, ...] = (32, 64, 128, 256)  # conv: channels of the stride-2 layers
    bits: int = 0             # hash: code bits (a multiple of 8); the latent dimension of a hash model
    hash_noise: float = 4.0   # hash: std of the noise before the code sigmoid while training
