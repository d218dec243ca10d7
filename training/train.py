"""The training loop: read `train` top to bottom; setup, resume and one epoch are its three steps.

What a run leaves on disk (run.json, metrics.jsonl, last.pt, best.pt) is described
and handled in run.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from zspace.data import Dataset, load_dataset, validation_split
from zspace.errors import UserError
from zspace.progress import Progress
from zspace.training.config import TrainConfig
from zspace.training.models import ARCHS, KINDS, LIKELIHOODS, ModelConfig, build_model, reconstruction_target
from zspace.training.run import (
    BEST,
    LAST,
    METRICS,
    append_metrics,
    load_checkpoint,
    load_run_data,
    read_run,
    save_checkpoint,
    write_run,
)

CONV_FROM = 16  # arch auto: conv for images at least this big a side (room for two stride-2 layers); README has why


def resolve_arch(cfg: TrainConfig, ds: Dataset) -> str:
    """mlp or conv: what --arch asks for, checked against the data."""
    if cfg.arch not in ("auto", *ARCHS):
        raise UserError(f"--arch: expected auto, mlp or conv, got {cfg.arch!r}")
    image = ds.modality == "image"
    if cfg.arch == "conv" and (not image or cfg.model == "pca"):
        raise UserError(f"--arch conv: for image data and neural models; {ds.name} holds {ds.modality}s"
                        if not image else "--arch conv: PCA is linear; use --model ae, vae, beta-vae or hash")
    if cfg.arch == "auto":
        return "conv" if image and cfg.model != "pca" and min(ds.transform.shape[1:]) >= CONV_FROM else "mlp"
    return cfg.arch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch on this machine")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def default_likelihood(ds: Dataset) -> str:
    if ds.modality == "text":
        return "multinomial"
    in_unit = float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    return "bernoulli" if ds.modality == "image" and in_unit else "gaussian"


def check_config(cfg: TrainConfig, ds: Dataset) -> tuple[TrainConfig, ModelConfig]:
    """Validate options against the data: the config as it will run (a hash model's latent_dim is its bits),
    and the model config. The given config is left as it was."""
    if cfg.model not in KINDS:
        raise UserError(f"--model: expected one of pca, ae, vae, beta-vae, hash, got {cfg.model!r}")
    if cfg.model == "hash":
        if cfg.bits < 8 or cfg.bits % 8:
            raise UserError(f"--bits: a hash model's code is whole bytes: a positive multiple of 8 (32, 64, 128), got {cfg.bits}")
        cfg = replace(cfg, latent_dim=cfg.bits)
    elif cfg.bits:
        raise UserError(f"--bits: only for --model hash; --model {cfg.model.replace('_', '-')} takes --latent-dim")
    arch = resolve_arch(cfg, ds)
    if not 1 <= cfg.latent_dim < ds.dim:
        raise UserError(f"--latent-dim: must be between 1 and {ds.dim - 1} (the input has {ds.dim} features), got {cfg.latent_dim}")
    if any(h < 1 for h in cfg.hidden):
        raise UserError(f"--hidden: layer sizes must be positive, got {list(cfg.hidden)}")
    if not cfg.channels or any(c < 1 for c in cfg.channels):
        raise UserError(f"--channels: conv channels must be positive, got {list(cfg.channels)}")
    if cfg.epochs < 0 or cfg.batch_size < 0:
        raise UserError("--epochs and --batch-size must be 0 (auto) or positive")
    if cfg.iw_samples < 1 or cfg.kl_warmup_steps < 0:
        raise UserError("--iw-samples must be at least 1 and --kl-warmup-steps at least 0")
    if cfg.iw_samples > 1 and (cfg.model != "vae"):
        raise UserError(f"--iw-samples: the importance-weighted bound is for --model vae, not {cfg.model.replace('_', '-')}")
    if cfg.augment_shift and ds.modality != "image":
        raise UserError(f"--augment-shift: only for image data, and {ds.name} holds {ds.modality}s")
    likelihood = default_likelihood(ds) if cfg.likelihood == "auto" else cfg.likelihood
    if cfg.model == "pca":
        likelihood = "gaussian"  # PCA reconstructs the data itself, linearly: the Gaussian case
    if likelihood not in LIKELIHOODS:
        raise UserError(f"--likelihood: expected auto or one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if likelihood == "bernoulli" and (ds.x_train.min() < 0 or ds.x_train.max() > 1):
        raise UserError("--likelihood bernoulli needs data in [0, 1]; use gaussian")
    if likelihood == "multinomial" and ds.x_train.min() < 0:
        raise UserError("--likelihood multinomial needs non-negative features (word weights)")
    return cfg, ModelConfig(
        kind=cfg.model, input_dim=ds.dim, latent_dim=cfg.latent_dim, hidden=tuple(cfg.hidden),
        activation=cfg.activation, likelihood=likelihood,
        beta=cfg.beta if cfg.model == "beta_vae" else 1.0,
        capacity_max=cfg.capacity_max if cfg.model == "beta_vae" else None,
        capacity_gamma=cfg.capacity_gamma, capacity_ramp_steps=cfg.capacity_ramp_steps,
        kl_warmup_steps=cfg.kl_warmup_steps if cfg.model in ("vae", "beta_vae") else 0,
        iw_samples=cfg.iw_samples, arch=arch, channels=tuple(cfg.channels), hash_noise=cfg.hash_noise,
        input_shape=tuple(ds.transform.shape) if ds.modality == "image" else None,
    )


def random_shift(x: torch.Tensor, shape: tuple[int, int, int], max_shift: int) -> torch.Tensor:
    """Translate each flattened image by its own random offset in [-max_shift, max_shift]².

    Regularises MNIST-sized autoencoders, whose test error otherwise stalls far
    above their training error (see README, benchmarks).
    """
    c, h, w = shape
    n, a = len(x), max_shift
    padded = torch.nn.functional.pad(x.view(n, c, h, w), (a, a, a, a))
    dy = torch.randint(0, 2 * a + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * a + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols].reshape(n, c * h * w)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = max(1, int(total * cfg.warmup_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate_split(model, x: torch.Tensor, batch_size: int = 1024, seed: int = 0) -> dict:
    """Mean loss parts and squared error per example on a split (fixed noise seed)."""
    model.eval()
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        _, parts = model.loss(xb)
        mu, _ = model.encode(xb)
        target = reconstruction_target(xb, model.cfg.likelihood)
        parts = {**parts, "sq_error": ((model.decode(mu) - target) ** 2).sum(-1)}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {k: v / len(x) for k, v in sums.items()}


def selection_loss(parts: dict) -> float:
    """What 'best' means: the negative ELBO for VAE kinds, the reconstruction NLL otherwise."""
    return parts.get("neg_elbo", parts.get("recon", parts.get("sq_error")))


@dataclass
class Session:
    """What one call of `train` works with: the data on the device, the model, its optimiser and where it stands."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    ds: Dataset
    model: torch.nn.Module
    x_train: torch.Tensor
    x_val: torch.Tensor
    opt: torch.optim.Optimizer | None = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    start_epoch: int = 0
    step: int = 0
    best: float = float("inf")
    rank: int = 0          # data-parallel: this process's rank among `world` (distributed.py)
    world: int = 1
    step_module: torch.nn.Module | None = None  # what a step calls: the model's loss, or DDP around it

    @property
    def lead(self) -> bool:
        """Rank 0 (or the only process): it alone validates and writes the run folder."""
        return self.rank == 0


MIN_STEPS = 3000  # optimisation steps an auto-sized run takes at least


def sized_for(cfg: TrainConfig, n_fit: int) -> tuple[TrainConfig, str | None]:
    """Fill in an auto batch size and epoch count (0) for `n_fit` training rows; a line saying what was chosen.

    Why: on a small data set a batch of 128 makes a handful of steps an epoch, and a VAE
    trained for a few hundred steps collapses (benchmarks/README.md, "Auto batch size and
    epochs", has the figures). So the batch shrinks with the data (a 32nd of it, 16 to 128
    rows) and the epochs grow until the run takes at least MIN_STEPS steps (30 at the
    least). The one place "auto" (0) is resolved, for the command line and Python alike."""
    if cfg.batch_size and cfg.epochs:
        return cfg, None
    batch = cfg.batch_size or min(128, max(16, n_fit // 32))
    steps = math.ceil(n_fit / batch)
    epochs = cfg.epochs or max(30, math.ceil(MIN_STEPS / steps))
    said = [f"batch {batch}" + (" (auto: a 32nd of the rows, 16 to 128)" if not cfg.batch_size else ""),
            f"{epochs} epochs" + (f" (auto: at least 30 and {MIN_STEPS} steps)" if not cfg.epochs else "")]
    return replace(cfg, batch_size=batch, epochs=epochs), f"train: {n_fit} rows: {', '.join(said)}, {steps} steps an epoch"


# What a resumed run may change: how long it trains and where; everything else is the run's own.
RESUMABLE = ("epochs", "device", "threads")


def resumed_config(cfg: TrainConfig, out: Path, given: set[str] | None = None) -> TrainConfig:
    """The run's own config for --resume, with only RESUMABLE settings taken from `cfg`.

    `given` names the settings the caller chose (the command line's explicit options); by default
    every one that differs from TrainConfig's default. One of them that disagrees with the run is
    refused by name: a run continued with another --data or --latent-dim would be neither run."""
    try:
        stored = read_run(out)["config"]
    except (OSError, KeyError, ValueError):
        raise UserError(f"--resume: {out} has no readable run.json to resume from") from None
    defaults = TrainConfig()
    names = {f.name for f in fields(TrainConfig)}
    run_cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in names})
    if given is None:
        given = {n for n in names if getattr(cfg, n) != getattr(defaults, n)}
    for name in sorted(given - set(RESUMABLE)):
        mine, theirs = getattr(cfg, name), getattr(run_cfg, name)
        mine = tuple(mine) if isinstance(mine, list) else mine  # a config built from JSON holds lists
        if name == "latent_dim" and run_cfg.model == "hash":
            continue  # a hash model's latent_dim is its bits, resolved when the run began
        if mine != theirs:
            option = "--" + name.replace("_", "-")
            shown = [",".join(map(str, v)) if isinstance(v, tuple) else v for v in (mine, theirs)]
            raise UserError(f"{option} {shown[0]}: the run in {out} was trained with {shown[1]}; --resume continues "
                            f"a run with its own settings (only {', '.join('--' + r for r in RESUMABLE)} may change): "
                            f"drop {option}, or train into a new --out")
    return replace(run_cfg, **{name: getattr(cfg, name) for name in RESUMABLE if name in given})


def setup(cfg: TrainConfig, out: Path, resume: bool, log, rank: int = 0, world: int = 1) -> Session:
    """Data (the run's own transform when resuming, a fresh fit otherwise), model and run folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    if resume:
        if not (out / LAST).is_file():
            raise UserError(f"--resume: {out} has no {LAST} to resume from")
        cfg = resumed_config(cfg, out)
        ds = load_run_data(out)
    else:
        if (out / LAST).exists():
            raise UserError(f"--out: {out} already holds a run; pass --resume to continue it or pick another folder")
        ds = load_dataset(cfg.data, vocab_size=cfg.vocab_size, weighting=cfg.weighting)
    tr_idx, val_idx = validation_split(len(ds.x_train), cfg.val_fraction)
    cfg, note = sized_for(cfg, len(tr_idx))
    cfg, mcfg = check_config(cfg, ds)
    x_train = torch.from_numpy(ds.x_train[tr_idx]).to(device)
    x_val = torch.from_numpy(ds.x_train[val_idx] if len(val_idx) else ds.x_test).to(device)
    if cfg.binarize:
        x_val = torch.bernoulli(x_val, generator=torch.Generator(device).manual_seed(1))
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and rank == 0:
        write_run(out, {"config": {**asdict(cfg), "hidden": list(cfg.hidden)}, "model": {**asdict(mcfg), "hidden": list(mcfg.hidden)},
                        "data": ds.describe(), "transform": ds.transform.to_dict(), "device": str(device),
                        "n_fit": len(tr_idx), "n_val": len(val_idx), "processes": world})
        (out / METRICS).write_text("")
    log(f"train: {cfg.model} on {ds.name} ({len(tr_idx)} fit / {len(val_idx)} val / {len(ds.x_test)} test, "
        f"{ds.dim}-d -> {cfg.latent_dim}-d, {mcfg.likelihood}) on {device}")
    if mcfg.arch == "conv":
        log(f"train: convolutional ({'--arch ' + cfg.arch if cfg.arch == 'conv' else 'auto: images of 16x16 and up'}), "
            f"channels {','.join(map(str, mcfg.channels))}; --hidden is not used")
    if note:
        log(note)
    return Session(cfg=cfg, out=out, device=device, ds=ds, model=model, x_train=x_train, x_val=x_val, rank=rank, world=world)


def restore(s: Session, log) -> None:
    """The optimiser, and on --resume the model, optimiser and schedule position of last.pt."""
    s.opt = torch.optim.AdamW(s.model.parameters(), lr=s.cfg.lr, weight_decay=s.cfg.weight_decay)
    s.steps_per_epoch = math.ceil(len(s.x_train) / s.cfg.batch_size)
    s.total_steps = s.cfg.epochs * s.steps_per_epoch
    if (s.out / LAST).is_file():
        ckpt = load_checkpoint(s.out / LAST, s.device)
        s.model.load_state_dict(ckpt["model"])
        s.opt.load_state_dict(ckpt["opt"])
        s.start_epoch, s.step, s.best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        log(f"train: resuming after epoch {s.start_epoch} (best validation loss {s.best:.4f})")


class LossOf(torch.nn.Module):
    """The model's training loss as a forward pass: what DistributedDataParallel wraps (its gradient
    all-reduce hooks into forward), since the models' own forward is not their loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, step: int):
        return self.model.loss(x, step)


def run_epoch(s: Session, epoch: int, quiet: bool) -> dict | None:
    """One pass over the training rows, then validation; saves best.pt on improvement and last.pt always.

    Data-parallel (s.world > 1): every rank draws the same permutation, so the global batches
    are the single-process ones, and takes its slice of each; DDP averages the gradients, and
    each rank's loss is weighted by its share of the batch, so a step equals the single-process
    step on the same global batch. Noise (VAE samples, binarisation, shifts) is seeded per rank.
    Only rank 0 validates and writes; the others return None."""
    cfg, model = s.cfg, s.model
    model.train()
    t0 = time.monotonic()
    # Seed per epoch: the shuffle and the VAE noise are the same with or without a resume.
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(len(s.x_train), device=s.device)
    if s.world > 1:
        torch.manual_seed(cfg.seed * 100_003 + epoch + 7_919 * s.rank)
    bar = None if quiet or not s.lead else Progress(s.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
    running = torch.zeros((), dtype=torch.float64, device=s.device)
    for i in range(0, len(s.x_train), cfg.batch_size):
        batch = perm[i : i + cfg.batch_size]
        xb = s.x_train[batch.tensor_split(s.world)[s.rank]] if s.world > 1 else s.x_train[batch]
        if cfg.augment_shift:
            xb = random_shift(xb, s.ds.transform.shape, cfg.augment_shift)
        if cfg.binarize:
            xb = torch.bernoulli(xb)
        for group in s.opt.param_groups:
            group["lr"] = lr_at(s.step, s.total_steps, cfg)
        loss, _ = s.step_module(xb, s.step)
        share = len(xb) * s.world / len(batch)  # DDP divides by world: weight each rank by its rows
        s.opt.zero_grad(set_to_none=True)
        (loss * share).backward()
        s.opt.step()
        s.step += 1
        running += loss.detach().double() * len(xb)
        if bar:
            bar.update(1, f"loss {loss.item():.3f}")
    if s.world > 1:
        import torch.distributed as dist

        dist.all_reduce(running)
    train_loss = float(running) / len(s.x_train)
    if not s.lead:
        return None
    val = evaluate_split(model, s.x_val)
    val_loss = selection_loss(val)
    improved = val_loss < s.best
    if improved:
        s.best = val_loss
        save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "val_loss": val_loss}, s.out / BEST)
    row = {"epoch": epoch + 1, "step": s.step, "lr": lr_at(s.step - 1, s.total_steps, cfg), "train_loss": train_loss,
           "val_loss": val_loss, **{f"val_{k}": v for k, v in val.items()}, "seconds": time.monotonic() - t0}
    append_metrics(s.out, row)
    save_checkpoint({"model": model.state_dict(), "opt": s.opt.state_dict(), "epoch": epoch + 1,
                     "step": s.step, "best": s.best}, s.out / LAST)
    if bar:
        bar.close(f"train {train_loss:.3f} val {val_loss:.3f} sq_err {val['sq_error']:.3f}{' *' if improved else ''}")
    return row


def train(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False,
          stop_after: int | None = None, time_limit_s: float | None = None, rank: int = 0, world: int = 1) -> Path:
    """Train into OUT. The schedule always spans cfg.epochs; `stop_after` (an epoch
    number) and `time_limit_s` end this call early, leaving a run that --resume
    continues exactly where it stopped. rank/world: one process of a data-parallel
    run (distributed.py starts them; torch.distributed is initialised)."""
    out, started = Path(out), time.monotonic()
    log = (lambda msg: None) if quiet or rank else (lambda msg: print(msg, flush=True))
    s = setup(cfg, out, resume, log, rank, world)
    cfg = s.cfg  # with an auto batch size and epoch count filled in
    if cfg.model == "pca":
        if world > 1:
            raise UserError("--nproc: PCA is fitted in one step; train it with --nproc 1")
        return _fit_pca(s.model, s.x_train, s.x_val, out)
    restore(s, log)
    s.step_module = LossOf(s.model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        s.step_module = DistributedDataParallel(s.step_module, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    for epoch in range(s.start_epoch, cfg.epochs):
        epoch_started = time.monotonic()
        run_epoch(s, epoch, quiet)
        if epoch == s.start_epoch and epoch + 1 < cfg.epochs:  # the pace of this machine, said once
            left = (time.monotonic() - epoch_started) * (cfg.epochs - epoch - 1)
            log(f"train: about {left / 60:.1f} more minutes for the other {cfg.epochs - epoch - 1} epochs at this pace "
                f"(first epoch {time.monotonic() - epoch_started:.1f}s)")
        stop = stop_after is not None and epoch + 1 >= stop_after
        if time_limit_s is not None and time.monotonic() - started > time_limit_s and epoch + 1 < cfg.epochs:
            log(f"train: time limit of {time_limit_s:.0f}s reached after epoch {epoch + 1}; --resume continues")
            stop = True
        if world > 1:  # every rank stops after the same epoch: rank 0's clock decides
            import torch.distributed as dist

            flag = torch.tensor([1.0 if stop else 0.0], device=s.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    return out


def _fit_pca(model, x_train, x_val, out: Path) -> Path:
    t0 = time.monotonic()
    model.fit(x_train)
    val = evaluate_split(model, x_val)
    row = {"epoch": 1, "step": 0, "train_loss": float(model.loss(x_train)[0]), "val_loss": selection_loss(val),
           **{f"val_{k}": v for k, v in val.items()}, "seconds": time.monotonic() - t0}
    append_metrics(out, row)
    state = {"model": model.state_dict(), "epoch": 1, "step": 0, "best": row["val_loss"]}
    save_checkpoint(state, out / BEST)
    save_checkpoint(state, out / LAST)
    print(f"pca: fitted in {row['seconds']:.2f}s, validation squared error {val['sq_error']:.3f}", flush=True)
    return out


def codes_of(model, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Posterior means (or codes) of x as float32, on the CPU."""
    with torch.no_grad():
        return np.concatenate([model.encode(torch.from_numpy(x[i : i + batch_size]))[0].numpy()
                               for i in range(0, len(x), batch_size)] or [np.zeros((0, model.cfg.latent_dim), np.float32)])
