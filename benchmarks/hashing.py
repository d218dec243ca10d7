"""Semantic hashing (Salakhutdinov & Hinton 2009): binary codes against real-valued ones.

    python -m benchmarks.hashing --data news     # 20 Newsgroups: hash 32/64/128 bits vs AE-10 and LSA-10
    python -m benchmarks.hashing --data mnist    # MNIST: hash 32/64/128 bits vs AE-30 and PCA-30

Each test item queries the training items; relevant = same label; precision of the
top 1, 10 and 100. Hash codes are compared by Hamming distance (FAISS IndexBinaryFlat,
exact), real-valued codes by cosine (documents) or L2 (images) (IndexFlat, exact).
Also: bytes per item in the FAISS index, and queries/s of exact search over the
training set on one thread (all test queries, batched), side by side in one run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.harness import SHARED, machine, table, write_json
from benchmarks.newsgroups_2006 import lsa_codes
from zspace.data import load_dataset
from zspace.training.evaluate import hamming_retrieval, retrieval
from zspace.training.run import load_model
from zspace.training.train import TrainConfig, codes_of, train

CUTS = (1, 10, 100)
BITS = (32, 64, 128)
SETS = {
    "news": {"spec": f"20newsgroups:{SHARED / '20newsgroups' / '20news-bydate.tar.gz'}", "metric": "cosine",
             "float": ("AE-10", 10, (500, 250, 125)), "hash_hidden": (500, 500), "baseline": "LSA-10",
             "lr": 1e-3, "batch": 128},
    "mnist": {"spec": f"mnist:{SHARED / 'mnist'}", "metric": "l2",
              "float": ("AE-30", 30, (1000, 500, 250)), "hash_hidden": (1000, 500, 250), "baseline": "PCA-30",
              "lr": 1e-3, "batch": 256},
}


def search_rate(db: np.ndarray, q: np.ndarray, binary: bool, metric: str, seconds: float = 2.0) -> float:
    """Queries/s of exact top-10 search over `db`, one thread, the queries in batches of 256."""
    import faiss

    if binary:
        index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    else:
        index = faiss.IndexFlatIP(db.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(db.shape[1])
    index.add(np.ascontiguousarray(db))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = np.ascontiguousarray(q[done % len(q):][:256])
            index.search(batch, 10)
            done += len(batch)
        return done / (time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)


def bits_of(model, x: np.ndarray) -> np.ndarray:
    """A hash model's codes thresholded at ½ and packed, as its bundle's encoder gives them."""
    return np.packbits(codes_of(model, x) > 0.5, axis=1)


def trained(cfg: TrainConfig, work: Path) -> tuple[object, float]:
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    train(cfg, work)
    return load_model(work)[0], time.monotonic() - t0


@click.command()
@click.option("--data", "which", type=click.Choice(list(SETS)), default="news", help="Data set.")
@click.option("--epochs", default=30, help="Training epochs of every model.")
@click.option("--bits", "bit_list", default=",".join(map(str, BITS)), help="Hash code sizes, comma-separated.")
@click.option("--noise", default=4.0, help="Hash: noise std before the code sigmoid while training.")
@click.option("--workdir", default="benchmarks/results/hashing_runs", help="Run folders (replaced).")
@click.option("--json", "json_path", default=None, help="Where the figures go (default benchmarks/results/hashing_DATA.json).")
@click.option("--threads", default=2, help="torch CPU threads.")
def main(which, epochs, bit_list, noise, workdir, json_path, threads):
    torch.set_num_threads(threads)
    s = SETS[which]
    ds = load_dataset(s["spec"], vocab_size=2000, weighting="log1p")
    print(f"{ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test, {ds.dim} features", flush=True)
    work = Path(workdir) / which
    common = dict(data=s["spec"], epochs=epochs, batch_size=s["batch"], lr=s["lr"], seed=0, threads=threads,
                  vocab_size=2000, weighting="log1p", arch="mlp")
    rows, spaces = [], {}

    # The real-valued references: the deep AE and the linear baseline of the same size.
    name, k, hidden = s["float"]
    model, secs = trained(TrainConfig(model="ae", latent_dim=k, hidden=hidden, **common), work / name)
    spaces[name] = (codes_of(model, ds.x_train), codes_of(model, ds.x_test), secs)
    if which == "news":
        tr, te = lsa_codes(ds.x_train, ds.x_test, 10)
    else:
        mean = ds.x_train.mean(0)
        _, _, vt = np.linalg.svd(ds.x_train - mean, full_matrices=False)
        tr, te = (ds.x_train - mean) @ vt[:30].T, (ds.x_test - mean) @ vt[:30].T
    spaces[s["baseline"]] = (tr.astype(np.float32), te.astype(np.float32), 0.0)
    for label, (tr, te, secs) in spaces.items():
        r = retrieval(te, ds.y_test, tr, ds.y_train, s["metric"], at=CUTS)
        rows.append({"method": label, "code": f"{tr.shape[1]} floats", "bytes_per_item": 4 * tr.shape[1],
                     **{f"precision@{c}": r[f"precision@{c}"] for c in CUTS},
                     "queries_s": search_rate(tr, te, False, s["metric"]), "train_s": secs})
        print(rows[-1], flush=True)

    for bits in [int(b) for b in bit_list.split(",")]:
        model, secs = trained(TrainConfig(model="hash", bits=bits, hidden=s["hash_hidden"], hash_noise=noise, **common),
                              work / f"hash{bits}")
        probs = codes_of(model, ds.x_test)
        tr, te = bits_of(model, ds.x_train), np.packbits(probs > 0.5, axis=1)
        saturated = float(((probs < 0.1) | (probs > 0.9)).mean())
        ones = float(np.unpackbits(tr, axis=1).mean())  # ½ when bits are used evenly
        found = hamming_retrieval(te, ds.y_test, tr, ds.y_train, CUTS)
        rows.append({"method": f"hash-{bits}", "code": f"{bits} bits", "bytes_per_item": bits // 8,
                     **{f"precision@{c}": found[f"precision@{c}"] for c in CUTS},
                     "queries_s": search_rate(tr, te, True, "hamming"), "train_s": secs,
                     "saturated_share": saturated, "ones_share": ones})
        print(rows[-1], flush=True)

    cols = ["method", "code", "bytes_per_item", *(f"precision@{c}" for c in CUTS), "queries_s", "train_s"]
    print(table(rows, cols, f"{ds.name}: test -> train, same label = relevant; Hamming for bits, "
                            f"{s['metric']} for floats; queries/s on one thread, exact"))
    write_json(Path(json_path or f"benchmarks/results/hashing_{which}.json"),
               {"benchmark": "hashing", "data": s["spec"], "epochs": epochs, "noise": noise, "rows": rows,
                "machine": machine()})


if __name__ == "__main__":
    main()
