"""The main job on the built-in digits: train a VAE, evaluate it, export it, show where it all is."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.evaluate import evaluate, format_table, write_json
from training.export import export_run
from training.plots import run_plots
from training.train import TrainConfig, train

MODEL_NAME = "digits"


def quickstart(workdir: Path, epochs: int = 60) -> dict:
    workdir = Path(workdir)
    run = workdir / "runs" / "quickstart-digits-vae"
    if run.exists():
        shutil.rmtree(run)  # the quickstart owns this folder; each call starts clean
    cfg = TrainConfig(data="digits", model="vae", latent_dim=8, hidden=(256, 128), epochs=epochs,
                      batch_size=64, lr=2e-3, seed=0)
    train(cfg, run)
    pngs = run_plots(run)
    report = evaluate(run, k=1000)
    print(format_table(report), flush=True)
    write_json(report, run / "evaluation.json")
    bundle = export_run(run, workdir / "models", MODEL_NAME)
    print(f"quickstart: bundle {bundle}", flush=True)
    return {
        "run": str(run),
        "bundle": str(bundle),
        "evaluation": str(run / "evaluation.json"),
        "pictures": [str(p) for p in pngs],
        "test_sq_error": report["model"]["sq_error"],
        "test_nll_is": report["model"].get("nll_is"),
        "pca_sq_error": report["pca"]["sq_error"],
    }
