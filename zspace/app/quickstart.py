"""The main job on the built-in digits, end to end: train a VAE, evaluate it, export it,
serve it on a loopback port, call it, stop it, and say where everything is.

This is the composition root (like the CLI): it may use every part, so the
parts themselves stay independent of one another.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zspace.files import write_atomic

MODEL_NAME = "digits"


def quickstart(workdir: Path, epochs: int = 300) -> dict:
    from zspace.training.evaluate import evaluate, format_table, write_json
    from zspace.training.export import export_run
    from zspace.training.plots import run_plots
    from zspace.training.train import TrainConfig, train

    workdir = Path(workdir)
    run = workdir / "runs" / "quickstart-digits-vae"
    if run.exists():
        shutil.rmtree(run)  # the quickstart owns this folder; each call starts clean
    # 1.4k small images: many short epochs. This beats PCA-8 on squared error and precision@10.
    cfg = TrainConfig(data="digits", model="vae", latent_dim=8, hidden=(256, 128), epochs=epochs,
                      batch_size=32, lr=1e-3, seed=0)
    train(cfg, run)
    pngs = run_plots(run)
    report = evaluate(run, k=1000)
    print(format_table(report), flush=True)
    write_json(report, run / "evaluation.json")
    bundle = export_run(run, workdir / "models", MODEL_NAME)
    print(f"quickstart: bundle {bundle}", flush=True)
    index_dir = workdir / "indexes" / MODEL_NAME
    if index_dir.exists():
        shutil.rmtree(index_dir)  # the quickstart owns it; its codes belonged to the previous version
    from zspace.index.build import build_index

    build_index(bundle, "digits", index_dir).close()
    print(f"quickstart: index {index_dir}", flush=True)
    served = serve_and_call(workdir / "models", workdir / "indexes", run)
    summary = {
        "run": str(run),
        "bundle": str(bundle),
        "evaluation": str(run / "evaluation.json"),
        "index": str(index_dir),
        "pictures": [str(p) for p in pngs] + [served.pop("samples_png"), served.pop("neighbours_png")],
        "test_sq_error": report["model"]["sq_error"],
        "test_nll_is": report["model"].get("nll_is"),
        "pca_sq_error": report["pca"]["sq_error"],
        "served": served,
        "summary_json": str(run / "quickstart.json"),
    }
    write_atomic(run / "quickstart.json", json.dumps(summary, indent=1) + "\n")
    return summary


def serve_and_call(models: Path, indexes: Path, out: Path) -> dict:
    """Start the real gRPC server on a free loopback port, call it as a client would, stop it."""
    import numpy as np

    from zspace.data import load_dataset
    from zspace.index.build import parse_dataset_key
    from zspace.service.background import BackgroundServer
    from zspace.service.client import ZSpaceClient
    from zspace.service.config import ServeConfig
    from zspace.training.plots import image_grid
    from zspace.transforms import ImageTransform

    digits = load_dataset("digits")
    x = digits.x_test[:8]
    with BackgroundServer(ServeConfig(models=models, indexes=indexes, port=0, metrics_port=0, poll_s=0)) as server:
        with ZSpaceClient(server.target) as client:
            info = client.get_model(MODEL_NAME)
            mean, _ = client.encode(MODEL_NAME, x)
            recon = client.reconstruct(MODEL_NAME, x)
            samples = client.generate(MODEL_NAME, count=16, seed=0)
            hits = client.search(MODEL_NAME, x[:6], k=8)
            health = client.health()
    t = ImageTransform((1, 8, 8))
    grid = image_grid([t.to_uint8(x), t.to_uint8(recon.x), t.to_uint8(samples.x[:8]), t.to_uint8(samples.x[8:])],
                      out / "served.png")
    # Each row: a test digit, then the 8 nearest training digits Search found (keys are digits/train/<row>).
    rows = [t.to_uint8(np.stack([x[i]] + [digits.x_train[parse_dataset_key(h.key)[2]] for h in row]))
            for i, row in enumerate(hits)]
    near = image_grid(rows, out / "neighbours.png")
    labels = [[h.payload["label"] for h in row] for row in hits]
    print(f"quickstart: served {MODEL_NAME}/{info.version} on {server.target} ({info.execution_provider}); "
          f"Encode {list(mean.shape)}, Reconstruct, Generate 16 -> {grid}; Search -> {near}", flush=True)
    return {"target": server.target, "health": health, "version": info.version, "provider": info.execution_provider,
            "encode_shape": list(mean.shape), "reconstruct_sq_error": float(((recon.x - x) ** 2).sum(1).mean()),
            "samples_png": str(grid), "generated": int(len(samples.x)), "codes_finite": bool(np.isfinite(mean).all()),
            "neighbours_png": str(near), "neighbour_labels": labels,
            "query_labels": [str(v) for v in digits.y_test[:6]]}
