"""The training loop: read it top to bottom.

A run directory holds everything needed to evaluate, resume or export:
  run.json        config, data description, the fitted feature transform
  metrics.jsonl   one line per epoch (train and validation figures)
  last.pt         model + optimiser + schedule state, for --resume
  best.pt         the weights with the lowest validation loss
  *.png           loss curves, reconstructions, samples, latent map
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from zspace.data import Dataset, load_dataset, validation_split
from zspace.errors import UserError
from zspace.progress import Progress
from zspace.training.models import KINDS, LIKELIHOODS, ModelConfig, build_model, reconstruction_target
from zspace.transforms import transform_from_dict


@dataclass
class TrainConfig:
    data: str = "digits"
    model: str = "vae"
    latent_dim: int = 2
    hidden: tuple[int, ...] = (1000, 500, 250)
    activation: str = "relu"
    likelihood: str = "auto"  # auto: bernoulli for images, multinomial for texts, gaussian otherwise
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    binarize: bool = False  # train on Bernoulli samples of [0,1] data (binarised MNIST protocol)
    augment_shift: int = 0  # images: shift each training image by up to this many pixels (0: off)
    beta: float = 1.0
    capacity_max: float | None = None
    capacity_gamma: float = 100.0
    capacity_ramp_steps: int = 10000
    vocab_size: int = 2000
    weighting: str = "log1p"
    threads: int = 0  # torch CPU threads; 0 = torch's default


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


def check_config(cfg: TrainConfig, ds: Dataset) -> ModelConfig:
    """Validate options against the data and build the model config."""
    if cfg.model not in KINDS:
        raise UserError(f"--model: expected one of pca, ae, vae, beta-vae, got {cfg.model!r}")
    if not 1 <= cfg.latent_dim < ds.dim:
        raise UserError(f"--latent-dim: must be between 1 and {ds.dim - 1} (the input has {ds.dim} features), got {cfg.latent_dim}")
    if any(h < 1 for h in cfg.hidden):
        raise UserError(f"--hidden: layer sizes must be positive, got {list(cfg.hidden)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
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
    return ModelConfig(
        kind=cfg.model, input_dim=ds.dim, latent_dim=cfg.latent_dim, hidden=tuple(cfg.hidden),
        activation=cfg.activation, likelihood=likelihood,
        beta=cfg.beta if cfg.model == "beta_vae" else 1.0,
        capacity_max=cfg.capacity_max if cfg.model == "beta_vae" else None,
        capacity_gamma=cfg.capacity_gamma, capacity_ramp_steps=cfg.capacity_ramp_steps,
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


def load_run_data(run: Path, spec: str | None = None) -> Dataset:
    """The run's data set (or SPEC) through the run's own fitted transform."""
    info = read_run(run)
    transform = transform_from_dict(info["transform"])
    return load_dataset(spec or info["config"]["data"], transform=transform)


def read_run(run: Path) -> dict:
    path = Path(run) / "run.json"
    if not path.is_file():
        raise UserError(f"{run}: not a training run (no run.json)")
    return json.loads(path.read_text())


def load_model(run: Path, which: str = "best.pt"):
    """(model, run info) from a run directory, on the CPU, in eval mode."""
    info = read_run(run)
    known = {f.name for f in fields(ModelConfig)}  # runs written by other versions may carry more keys
    mcfg = ModelConfig(**{**{k: v for k, v in info["model"].items() if k in known}, "hidden": tuple(info["model"]["hidden"])})
    model = build_model(mcfg)
    ckpt_path = Path(run) / which
    if not ckpt_path.is_file():
        raise UserError(f"{run}: no {which}; the run has not finished an epoch")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), info


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


def train(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False,
          stop_after: int | None = None, time_limit_s: float | None = None) -> Path:
    """Train into OUT. The schedule always spans cfg.epochs; `stop_after` (an epoch
    number) and `time_limit_s` end this call early, leaving a run that --resume
    continues exactly where it stopped."""
    out = Path(out)
    started = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    # ---- data: the run's own transform when resuming, a fresh fit otherwise
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: {out} has no last.pt to resume from")
        ds = load_run_data(out)
    else:
        if (out / "last.pt").exists():
            raise UserError(f"--out: {out} already holds a run; pass --resume to continue it or pick another folder")
        ds = load_dataset(cfg.data, vocab_size=cfg.vocab_size, weighting=cfg.weighting)
    mcfg = check_config(cfg, ds)
    tr_idx, val_idx = validation_split(len(ds.x_train), cfg.val_fraction)
    x_train = torch.from_numpy(ds.x_train[tr_idx]).to(device)
    x_val = torch.from_numpy(ds.x_train[val_idx] if len(val_idx) else ds.x_test).to(device)
    if cfg.binarize:
        x_val = torch.bernoulli(x_val, generator=torch.Generator(device).manual_seed(1))

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "config": {**asdict(cfg), "hidden": list(cfg.hidden)},
        "model": {**asdict(mcfg), "hidden": list(mcfg.hidden)},
        "data": ds.describe(),
        "transform": ds.transform.to_dict(),
        "device": str(device),
        "n_fit": len(tr_idx),
        "n_val": len(val_idx),
    }
    if not resume:
        (out / "run.json").write_text(json.dumps(info, indent=1))
    log = lambda msg: None if quiet else print(msg, flush=True)  # noqa: E731
    log(f"train: {cfg.model} on {ds.name} ({len(tr_idx)} fit / {len(val_idx)} val / {len(ds.x_test)} test, "
        f"{ds.dim}-d -> {cfg.latent_dim}-d, {mcfg.likelihood}) on {device}")

    if cfg.model == "pca":
        return _fit_pca(model, x_train, x_val, out)

    # ---- optimiser and state (fresh or resumed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    start_epoch, step, best = 0, 0, float("inf")
    if resume:
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        log(f"train: resuming after epoch {start_epoch} (best validation loss {best:.4f})")
    metrics_file = open(out / "metrics.jsonl", "a" if resume else "w")

    # ---- the loop
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.monotonic()
        # Seed per epoch: the shuffle and the VAE noise are the same with or without a resume.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(x_train), device=device)
        bar = None if quiet else Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        running = 0.0
        for i in range(0, len(x_train), cfg.batch_size):
            xb = x_train[perm[i : i + cfg.batch_size]]
            if cfg.augment_shift:
                xb = random_shift(xb, ds.transform.shape, cfg.augment_shift)
            if cfg.binarize:
                xb = torch.bernoulli(xb)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            loss, _ = model.loss(xb, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += loss.item() * len(xb)
            if bar:
                bar.update(1, f"loss {loss.item():.3f}")
        train_loss = running / len(x_train)
        val = evaluate_split(model, x_val)
        val_loss = selection_loss(val)
        improved = val_loss < best
        if improved:
            best = val_loss
            torch.save({"model": model.state_dict(), "epoch": epoch + 1, "val_loss": val_loss}, out / "best.pt")
        row = {"epoch": epoch + 1, "step": step, "lr": lr_at(step - 1, total_steps, cfg), "train_loss": train_loss,
               "val_loss": val_loss, **{f"val_{k}": v for k, v in val.items()}, "seconds": time.monotonic() - t0}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1,
                      "step": step, "best": best}, out / "last.pt")
        if bar:
            bar.close(f"train {train_loss:.3f} val {val_loss:.3f} sq_err {val['sq_error']:.3f}{' *' if improved else ''}")
        if stop_after is not None and epoch + 1 >= stop_after:
            break
        if time_limit_s is not None and time.monotonic() - started > time_limit_s and epoch + 1 < cfg.epochs:
            log(f"train: time limit of {time_limit_s:.0f}s reached after epoch {epoch + 1}; --resume continues")
            break
    metrics_file.close()
    return out


def _fit_pca(model, x_train, x_val, out: Path) -> Path:
    t0 = time.monotonic()
    model.fit(x_train)
    val = evaluate_split(model, x_val)
    row = {"epoch": 1, "step": 0, "train_loss": float(model.loss(x_train)[0]), "val_loss": selection_loss(val),
           **{f"val_{k}": v for k, v in val.items()}, "seconds": time.monotonic() - t0}
    (out / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    state = {"model": model.state_dict(), "epoch": 1, "step": 0, "best": row["val_loss"]}
    torch.save(state, out / "best.pt")
    _save_atomic(state, out / "last.pt")
    print(f"pca: fitted in {row['seconds']:.2f}s, validation squared error {val['sq_error']:.3f}", flush=True)
    return out


def _save_atomic(obj, path: Path) -> None:
    """A checkpoint is either the old one or the new one, never half of each."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def codes_of(model, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Posterior means (or codes) of x as float32, on the CPU."""
    with torch.no_grad():
        return np.concatenate([model.encode(torch.from_numpy(x[i : i + batch_size]))[0].numpy()
                               for i in range(0, len(x), batch_size)] or [np.zeros((0, model.cfg.latent_dim), np.float32)])
