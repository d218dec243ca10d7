"""Hinton & Salakhutdinov (Science 2006), images: MNIST with 30-d codes.

Rows: PCA-30 (closed form), the deep autoencoder 784-1000-500-250-30 trained
for 200 epochs (about 25 minutes on 2 cores; or under a wall-clock budget with
--ae-epochs 0 --minutes M), and a VAE of the same shape on binarised MNIST with
its importance-sampled test NLL. Test error = mean over
test images of the squared error summed over the 784 pixels (the paper's 3.00
for the deep AE, 13.87 for PCA).

    python -m benchmarks.mnist_2006 --data ../shared/datasets/mnist
    python -m benchmarks.mnist_2006 --ae-epochs 0 --minutes 20   # the AE under a budget instead
    python -m benchmarks.mnist_2006 --reuse-runs                # evaluate the run folders already there
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import click
import torch

from benchmarks.harness import SHARED, machine, table, write_json
from benchmarks.targets import check
from zspace.data import load_dataset, validation_split
from zspace.training.evaluate import coder_from_run, evaluate_coder
from zspace.training.models import ModelConfig, build_model
from zspace.training.run import read_metrics
from zspace.training.train import TrainConfig, train

PAPER = {"pca_30": 13.87, "deep_ae_30": 3.00}


def epochs_for_budget(cfg: TrainConfig, n_fit: int, input_dim: int, budget_s: float) -> int:
    """Plan the schedule to fit the budget: time a few real steps, leave room for validation."""
    model = build_model(ModelConfig(kind=cfg.model, input_dim=input_dim, latent_dim=cfg.latent_dim,
                                    hidden=cfg.hidden, activation=cfg.activation))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(cfg.batch_size, input_dim)
    for i in range(25):
        if i == 5:
            t0 = time.monotonic()
        loss, _ = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = (time.monotonic() - t0) / 20
    epoch_s = step_s * math.ceil(n_fit / cfg.batch_size) * 1.08  # + shuffling, augmentation, validation
    return max(1, int(budget_s / epoch_s))


def run_model(cfg: TrainConfig, out: Path, budget_s: float, n_fit: int, dim: int, epochs: int | None = None,
              reuse: bool = False) -> tuple[Path, float]:
    """Train (a fixed number of epochs, or as many as fit the budget), or reuse the run already in `out`."""
    if reuse and (out / "best.pt").is_file():
        seconds = sum(row.get("seconds", 0.0) for row in read_metrics(out))
        print(f"{cfg.model}: reusing {out} ({len(read_metrics(out))} epochs, {seconds / 60:.1f} min of training)", flush=True)
        return out, seconds
    shutil.rmtree(out, ignore_errors=True)
    if epochs:
        cfg.epochs = epochs
        print(f"{cfg.model}: {cfg.epochs} epochs", flush=True)
    else:
        cfg.epochs = epochs_for_budget(cfg, n_fit, dim, budget_s)
        print(f"{cfg.model}: planned {cfg.epochs} epochs for a {budget_s / 60:.1f}-minute budget", flush=True)
    t0 = time.monotonic()
    train(cfg, out, time_limit_s=None if epochs else budget_s)
    return out, time.monotonic() - t0


def run_config(run: Path) -> dict:
    """The configuration a run was trained with (its own record, also when reused)."""
    return json.loads((run / "run.json").read_text())["config"]


@click.command()
@click.option("--data", default=str(SHARED / "mnist"), help="Folder with the four MNIST IDX files.")
@click.option("--minutes", default=20.0, help="Training budget of the deep autoencoder with --ae-epochs 0.")
@click.option("--vae-minutes", default=10.0, help="Training budget of the VAE (wall clock).")
@click.option("--augment-shift", default=2, help="AE recipe: random shifts of up to N pixels (0: off).")
@click.option("--activation", default="relu", help="AE/VAE hidden unit.")
@click.option("--lr", default=2e-3, help="Peak learning rate.")
@click.option("--batch-size", default=256, help="Batch size.")
@click.option("--k", default=1000, help="Importance samples per test image for the VAE NLL.")
@click.option("--nll-examples", default=2000, help="Test images for the IS-NLL (the first N).")
@click.option("--skip-vae", is_flag=True, help="Only PCA and the deep AE.")
@click.option("--ae-epochs", default=200, help="AE epochs (a fixed schedule); 0: as many as fit --minutes.")
@click.option("--reuse-runs", is_flag=True, help="Evaluate the AE/VAE runs already in --workdir instead of training.")
@click.option("--workdir", default="benchmarks/results/mnist_runs", help="Run folders (replaced).")
@click.option("--json", "json_path", default="benchmarks/results/mnist_2006.json", help="Where the figures go.")
@click.option("--threads", default=2, help="torch CPU threads.")
def main(data, minutes, vae_minutes, augment_shift, activation, lr, batch_size, k, nll_examples, skip_vae,
         ae_epochs, reuse_runs, workdir, json_path, threads):
    torch.set_num_threads(threads)
    spec, work = f"mnist:{data}", Path(workdir)
    ds = load_dataset(spec)
    val_fraction = 5000 / len(ds.x_train)
    n_fit = len(validation_split(len(ds.x_train), val_fraction)[0])
    common = dict(data=spec, latent_dim=30, hidden=(1000, 500, 250), activation=activation, batch_size=batch_size,
                  lr=lr, seed=0, threads=threads, val_fraction=val_fraction, arch="mlp")  # the 2006 paper's nets
    rows, record = [], {"benchmark": "mnist_2006", "data": spec, "paper": PAPER, "machine": machine()}

    shutil.rmtree(work / "pca", ignore_errors=True)
    pca_run = train(TrainConfig(model="pca", **common), work / "pca")
    pca = evaluate_coder(coder_from_run(pca_run), ds, k=0, at=(10,), baselines=("pca", "raw"), map_queries=None, progress=False)
    rows.append({"model": "PCA-30", "test_sq_error": pca["model"]["sq_error"], "paper": PAPER["pca_30"],
                 "precision@10": pca["model"]["precision@10"], "mAP": pca["model"]["mAP"],
                 "5nn_accuracy": pca["model"]["5nn_accuracy"]})
    rows.append({"model": "raw pixels", **{m: pca["raw"][m] for m in ("precision@10", "mAP", "5nn_accuracy")}})

    ae_cfg = TrainConfig(model="ae", augment_shift=augment_shift, **common)
    ae_run, ae_s = run_model(ae_cfg, work / "ae", minutes * 60, n_fit, ds.dim, ae_epochs, reuse_runs)
    ae = evaluate_coder(coder_from_run(ae_run), ds, k=0, at=(10,), baselines=("pca",), map_queries=None, progress=False)
    rows.insert(1, {"model": "deep AE 784-1000-500-250-30", "test_sq_error": ae["model"]["sq_error"],
                    "paper": PAPER["deep_ae_30"], "train_minutes": ae_s / 60,
                    **{m: ae["model"][m] for m in ("precision@10", "mAP", "5nn_accuracy")}})
    record["ae"] = {"config": run_config(ae_run), "epochs_run": len(read_metrics(ae_run)), "train_s": ae_s, "report": ae}

    if not skip_vae:
        vae_cfg = TrainConfig(model="vae", binarize=True, **common)
        vae_run, vae_s = run_model(vae_cfg, work / "vae", vae_minutes * 60, n_fit, ds.dim, reuse=reuse_runs)
        vae = evaluate_coder(coder_from_run(vae_run), ds, k=k, nll_examples=nll_examples, at=(10,), baselines=("pca",), map_queries=None)
        rows.append({"model": "VAE 784-1000-500-250-30 (binarised)", "nll_is": vae["model"]["nll_is"],
                     "neg_elbo": vae["model"]["neg_elbo"], "train_minutes": vae_s / 60,
                     "test_sq_error": vae["model"]["sq_error"],
                     **{m: vae["model"][m] for m in ("precision@10", "mAP", "5nn_accuracy")}})
        record["vae"] = {"config": run_config(vae_run), "epochs_run": len(read_metrics(vae_run)), "train_s": vae_s,
                         "report": vae, "nll_reference_nats": [86.8, 89.9]}

    record["rows"] = rows
    cols = ["model", "test_sq_error", "paper", "nll_is", "neg_elbo", "precision@10", "mAP", "5nn_accuracy", "train_minutes"]
    print(table(rows, cols, f"MNIST 60k/10k, 30-d codes (IS-NLL: k={k} on the first {nll_examples} binarised test images)"))
    ae_err = rows[1]["test_sq_error"]
    print(f"deep AE: {ae_s / 60:.1f} minutes of training")
    record["targets"] = check("mnist_2006", {"ae_test_sq_error": ae_err, "ae_beats_pca": ae_err - rows[0]["test_sq_error"]})
    write_json(Path(json_path), record)


if __name__ == "__main__":
    main()
