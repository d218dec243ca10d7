"""Convolutional against fully connected autoencoders on images, side by side.

    python -m benchmarks.conv --data mnist  --epochs 10     # 28x28 grey, 30-d codes
    python -m benchmarks.conv --data shapes --epochs 40     # 64x64 RGB (benchmarks.shapes draws them), 16-d codes

For each model kind (AE, VAE) both architectures train with the same code size,
epochs, batch and learning rate, and are compared on the test split: squared error
per image of the reconstruction from the code (the mean, for VAEs), precision@10 of
the codes (test -> train, L2, same class = relevant), parameters and training time.
Each run folder keeps its plots (reconstructions, loss curves) as PNGs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import torch

from benchmarks.harness import SHARED, machine, table, write_json
from benchmarks.shapes import write_shapes
from zspace.data import load_dataset
from zspace.training.evaluate import retrieval
from zspace.training.plots import run_plots
from zspace.training.run import load_model
from zspace.training.train import TrainConfig, codes_of, train

SETS = {
    "mnist": {"latent": 30, "hidden": (1000, 500, 250), "channels": (32, 64, 128), "batch": 128, "lr": 1e-3},
    "shapes": {"latent": 16, "hidden": (1000, 500, 250), "channels": (32, 64, 128, 256), "batch": 64, "lr": 1e-3},
}


def spec_of(which: str, shapes_dir: Path) -> str:
    if which == "mnist":
        return f"mnist:{SHARED / 'mnist'}"
    if not (shapes_dir / "circle").is_dir():
        write_shapes(shapes_dir, per_class=1000)
    return f"images:{shapes_dir}"


def test_figures(run: Path, ds) -> dict:
    model, _ = load_model(run)
    with torch.no_grad():
        codes = torch.from_numpy(codes_of(model, ds.x_test))
        recon = model.decode(codes).numpy()
    sq = float(((recon - ds.x_test) ** 2).sum(1).mean())
    r = retrieval(codes.numpy(), ds.y_test, codes_of(model, ds.x_train), ds.y_train, "l2", at=(10,), map_queries=200)
    return {"test_sq_error": sq, "precision@10": r["precision@10"],
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


@click.command()
@click.option("--data", "which", type=click.Choice(list(SETS)), default="shapes", help="Data set.")
@click.option("--epochs", default=20, help="Training epochs of every model.")
@click.option("--kinds", default="ae,vae", help="Model kinds, comma-separated.")
@click.option("--shapes-dir", default="benchmarks/results/shapes64", help="Where the 64x64 shapes are (drawn if missing).")
@click.option("--workdir", default="benchmarks/results/conv_runs", help="Run folders (replaced).")
@click.option("--json", "json_path", default=None, help="Where the figures go (default benchmarks/results/conv_DATA.json).")
@click.option("--threads", default=2, help="torch CPU threads.")
def main(which, epochs, kinds, shapes_dir, workdir, json_path, threads):
    torch.set_num_threads(threads)
    s = SETS[which]
    spec = spec_of(which, Path(shapes_dir))
    ds = load_dataset(spec)
    print(f"{ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test, shape {ds.transform.shape}", flush=True)
    rows = []
    for kind in kinds.split(","):
        for arch in ("mlp", "conv"):
            run = Path(workdir) / which / f"{kind}-{arch}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = TrainConfig(data=spec, model=kind, latent_dim=s["latent"], hidden=s["hidden"], channels=s["channels"],
                              arch=arch, epochs=epochs, batch_size=s["batch"], lr=s["lr"], seed=0, threads=threads)
            t0 = time.monotonic()
            train(cfg, run)
            secs = time.monotonic() - t0
            run_plots(run)
            rows.append({"kind": kind, "arch": arch, **test_figures(run, ds), "train_s": secs})
            print(rows[-1], flush=True)
    print(table(rows, ["kind", "arch", "params", "test_sq_error", "precision@10", "train_s"],
                f"{ds.name} {ds.transform.shape}: {epochs} epochs, {s['latent']}-d codes, test split"))
    write_json(Path(json_path or f"benchmarks/results/conv_{which}.json"),
               {"benchmark": "conv", "data": spec, "epochs": epochs, "settings": {**s}, "rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
