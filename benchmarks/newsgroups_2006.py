"""Hinton & Salakhutdinov (2006), documents: 20 Newsgroups, 2000-word input,
10-d autoencoder codes against LSA with 10 and 50 dimensions.

Each test post queries the training posts by cosine similarity of codes;
relevant = same newsgroup. We report precision of the top 1, 10 and 100.

    python -m benchmarks.newsgroups_2006 --data ../shared/datasets/20newsgroups/20news-bydate.tar.gz
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.harness import SHARED, machine, table, write_json
from zspace.data import load_dataset
from zspace.training.evaluate import retrieval
from zspace.training.run import load_model
from zspace.training.train import TrainConfig, codes_of, train

CUTS = (1, 10, 100)


def lsa_codes(x_train: np.ndarray, x_test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Latent semantic analysis: a truncated SVD of the (uncentred) document-term matrix."""
    _, _, vt = np.linalg.svd(x_train.astype(np.float64), full_matrices=False)
    v = vt[:k].T
    return (x_train @ v).astype(np.float32), (x_test @ v).astype(np.float32)


@click.command()
@click.option("--data", default=str(SHARED / "20newsgroups" / "20news-bydate.tar.gz"), help="The bydate archive or its folders.")
@click.option("--epochs", default=40, help="Autoencoder training epochs.")
@click.option("--weighting", default="log1p", help="Word weighting of the 2000-word input.")
@click.option("--workdir", default="benchmarks/results/newsgroups_run", help="Run folder (replaced).")
@click.option("--json", "json_path", default="benchmarks/results/newsgroups_2006.json", help="Where the figures go.")
@click.option("--threads", default=2, help="torch CPU threads.")
def main(data, epochs, weighting, workdir, json_path, threads):
    torch.set_num_threads(threads)
    spec = f"20newsgroups:{data}"
    t0 = time.monotonic()
    ds = load_dataset(spec, vocab_size=2000, weighting=weighting)
    print(f"loaded {len(ds.x_train)} train / {len(ds.x_test)} test posts, {ds.dim} words ({time.monotonic() - t0:.0f}s)", flush=True)

    rows = []
    for k in (10, 50):
        tr, te = lsa_codes(ds.x_train, ds.x_test, k)
        rows.append({"method": f"LSA-{k}", **retrieval(te, ds.y_test, tr, ds.y_train, "cosine", at=CUTS)})
        print(rows[-1], flush=True)
    rows.append({"method": "raw 2000-d", **retrieval(ds.x_test, ds.y_test, ds.x_train, ds.y_train, "cosine", at=CUTS)})

    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    cfg = TrainConfig(data=spec, model="ae", latent_dim=10, hidden=(500, 250, 125), epochs=epochs, batch_size=128,
                      lr=1e-3, weighting=weighting, vocab_size=2000, seed=0, threads=threads)
    t1 = time.monotonic()
    train(cfg, Path(workdir))
    train_s = time.monotonic() - t1
    model, _ = load_model(Path(workdir))
    tr, te = codes_of(model, ds.x_train), codes_of(model, ds.x_test)
    rows.insert(0, {"method": "AE 2000-500-250-125-10", **retrieval(te, ds.y_test, tr, ds.y_train, "cosine", at=CUTS),
                    "train_s": train_s})

    columns = ["method", *(f"precision@{c}" for c in CUTS), "mAP", "5nn_accuracy"]
    print(table(rows, columns, "20 Newsgroups: test posts -> training posts, cosine, relevant = same group"))
    beats = all(rows[0][f"precision@{c}"] > next(r for r in rows if r["method"] == "LSA-10")[f"precision@{c}"] for c in CUTS)
    print(f"AE-10 beats LSA-10 at every cut-off: {beats}")
    write_json(Path(json_path), {"benchmark": "newsgroups_2006", "data": spec, "weighting": weighting, "epochs": epochs,
                                 "rows": rows, "ae10_beats_lsa10": beats, "machine": machine()})


if __name__ == "__main__":
    main()
