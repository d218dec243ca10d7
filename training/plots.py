"""PNGs a person looks at after a run: loss curves, reconstructions, samples, latent map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zspace.bundle import VAE_KINDS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    if all("train_loss" in r for r in rows):
        ax.plot(epochs, [r["train_loss"] for r in rows], "o-" if len(rows) < 3 else "-", label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in rows], "o-" if len(rows) < 3 else "-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per example (nats, or squared error for PCA)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def image_grid(rows_of_images: list[np.ndarray], path: Path, titles: list[str] | None = None) -> Path:
    """Rows of uint8 images ([n, H, W] or [n, H, W, 3]) tiled into one PNG."""
    from PIL import Image

    n_rows = len(rows_of_images)
    n_cols = max(len(r) for r in rows_of_images)
    h, w = rows_of_images[0].shape[1:3]
    rgb = rows_of_images[0].ndim == 4
    pad = 2
    canvas = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad) + ((3,) if rgb else ()), 255, np.uint8)
    for i, row in enumerate(rows_of_images):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    scale = max(1, 256 // max(h, w))
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    return path


def across_classes(y: np.ndarray | None, count: int, n: int, seed: int = 0) -> np.ndarray:
    """Rows to show: `n` drawn with a fixed seed, taking the classes in turn when the data has labels.

    A folder of images is read class by class, so its first rows are all of the first class;
    the picture should show what the model makes of every class."""
    rng = np.random.default_rng(seed)
    if y is None or len(y) != count:
        return np.sort(rng.permutation(count)[: min(n, count)])
    pools = [rng.permutation(np.flatnonzero(y == c)).tolist() for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < min(n, count):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return np.array(picked)


@torch.no_grad()
def reconstructions(model, x: np.ndarray, transform, path: Path, n: int = 16, y: np.ndarray | None = None) -> Path:
    """Inputs (top row) above their reconstructions (bottom row), across the classes when there are labels."""
    rows = x[across_classes(y, len(x), n)]
    recon = model.decode(model.encode(torch.from_numpy(rows))[0]).numpy()
    return image_grid([transform.to_uint8(rows), transform.to_uint8(recon)], path)


@torch.no_grad()
def samples(model, transform, path: Path, n: int = 64, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.cfg.latent_dim, generator=g)
    imgs = transform.to_uint8(model.decode(z).numpy())
    cols = 8
    return image_grid([imgs[i : i + cols] for i in range(0, n, cols)], path)


def latent_map(codes: np.ndarray, labels: np.ndarray | None, classes: list[str] | None, path: Path) -> Path:
    """Test codes in 2-D (the first two principal axes when K > 2), coloured by label."""
    plt = _plt()
    xy = codes
    title = "latent codes"
    if codes.shape[1] > 2:
        centred = codes - codes.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        title = f"latent codes ({codes.shape[1]}-d, first two principal axes)"
    elif codes.shape[1] == 1:
        xy = np.stack([codes[:, 0], np.zeros(len(codes))], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab20" if labels.max() >= 10 else "tab10")
        for c in np.unique(labels):
            m = labels == c
            name = classes[c] if classes and c < len(classes) else str(c)
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.6, color=cmap(int(c) % cmap.N), label=name)
        ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2 if labels.max() >= 10 else 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_plots(run: Path) -> list[Path]:
    """All the pictures a finished run deserves, written into the run folder."""
    from zspace.training.run import load_model, load_run_data, read_metrics
    from zspace.training.train import codes_of

    run = Path(run)
    model, info = load_model(run)
    ds = load_run_data(run)
    written = [loss_curves(read_metrics(run), run / "loss_curves.png")]
    if ds.modality == "image":
        written.append(reconstructions(model, ds.x_test, ds.transform, run / "reconstructions.png", y=ds.y_test))
        if model.cfg.kind in VAE_KINDS:
            written.append(samples(model, ds.transform, run / "samples.png"))
    written.append(latent_map(codes_of(model, ds.x_test), ds.y_test, ds.classes, run / "latent_map.png"))
    return written
