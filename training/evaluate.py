"""Evaluation of a run or a bundle on a data set's test split, beside PCA.

Figures (all on the test split, PCA fitted on the training split at the same
latent size in the same call):
- sq_error: squared error per example summed over features (the 2006
  convention); mse: the same per feature.
- VAE kinds: negative ELBO and importance-sampled negative log-likelihood
  with k samples from q(z|x) (Burda et al.'s estimator, k=1 gives the ELBO).
- Retrieval of test queries among training items, relevant = same label:
  precision@10, mAP, and 5-NN accuracy (L2 for images, cosine for texts).

A run is evaluated through torch, a bundle through ONNX Runtime; both go
through the same numpy code below, so the figures are comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zspace.bundle import VAE_KINDS, load_bundle, versions
from zspace.data import Dataset, load_dataset
from zspace.errors import UserError
from zspace.likelihood import log_likelihood, target_of
from zspace.progress import Progress, stage
from zspace.runtime import open_runtime
from zspace.transforms import transform_from_dict


@dataclass
class Coder:
    """A model seen as numpy functions: what evaluation needs and nothing more."""

    kind: str
    likelihood: str
    latent_dim: int
    input_dim: int
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    decode: Callable[[np.ndarray], np.ndarray]
    out_logvar: np.ndarray | None = None
    binarized: bool = False
    transform: dict | None = None
    data_spec: str | None = None


def coder_from_run(run: Path) -> Coder:
    from zspace.training.run import load_model

    model, info = load_model(run)

    def encode(x):
        with torch.no_grad():
            mu, logvar = model.encode(torch.from_numpy(x))
            return mu.numpy(), None if logvar is None else logvar.numpy()

    def decode(z):
        with torch.no_grad():
            return model.decode(torch.from_numpy(z)).numpy()

    return Coder(
        kind=model.cfg.kind, likelihood=model.cfg.likelihood, latent_dim=model.cfg.latent_dim,
        input_dim=model.cfg.input_dim, encode=encode, decode=decode, out_logvar=model.out_logvar.detach().numpy().copy(),
        binarized=info["config"]["binarize"], transform=info["transform"], data_spec=info["config"]["data"],
    )


def coder_from_bundle(path: Path) -> Coder:
    runtime = open_runtime(load_bundle(path))
    bundle, training = runtime.bundle, runtime.bundle.manifest["training"]

    def encode(x):
        outs = runtime.encode(x)
        return outs[0], outs[1] if len(outs) > 1 else None

    return Coder(
        kind=bundle.kind, likelihood=bundle.likelihood, latent_dim=bundle.latent_dim,
        input_dim=bundle.input_dim, encode=encode, decode=lambda z: runtime.decode(z)[0],
        out_logvar=None if bundle.out_logvar is None else np.asarray(bundle.out_logvar, np.float32),
        binarized=training["config"].get("binarize", False), transform=bundle.transform,
        data_spec=training["data"]["spec"],
    )


def open_coder(target: Path) -> Coder:
    target = Path(target)
    if (target / "run.json").is_file():
        return coder_from_run(target)
    if (target / "manifest.json").is_file():
        return coder_from_bundle(target)
    found = versions(target.parent, target.name)
    if found:
        raise UserError(f"{target}: a model folder, not one of its versions; evaluate {target / str(found[-1])} (the "
                        f"latest of versions {', '.join(map(str, found))})")
    raise UserError(f"{target}: neither a training run (run.json) nor a model bundle (manifest.json); "
                    "expected runs/NAME or models/NAME/VERSION")


# ---------------------------------------------------------------- pieces


def batched(fn, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def importance_sampled(coder: Coder, x: np.ndarray, k: int, seed: int = 0, progress: bool = True) -> dict:
    """Negative ELBO and IS negative log-likelihood (nats), averaged over rows of x."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 8192 // k)
    neg_elbo, nll = [], []
    bar = Progress(math.ceil(len(x) / chunk), f"IS-NLL, {k} importance samples x {len(x)} rows") if progress else None
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        mu, logvar = coder.encode(xb)
        std = np.exp(0.5 * logvar)
        eps = rng.standard_normal((k, *mu.shape)).astype(np.float32)
        z = mu[None] + std[None] * eps  # [k, b, K]
        x_hat = coder.decode(z.reshape(-1, mu.shape[1])).reshape(k, len(xb), -1)
        log_px = log_likelihood(np.broadcast_to(xb, x_hat.shape), x_hat, coder.likelihood, coder.out_logvar)
        log_pz = -0.5 * (z.astype(np.float64) ** 2 + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps.astype(np.float64) ** 2 + logvar[None] + math.log(2 * math.pi)).sum(-1)
        log_w = log_px + log_pz - log_qz  # [k, b]
        top = log_w.max(0)
        nll.append(-(top + np.log(np.exp(log_w - top).mean(0))))
        neg_elbo.append(-log_w.mean(0))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return {"neg_elbo": float(np.concatenate(neg_elbo).mean()), "nll_is": float(np.concatenate(nll).mean()),
            "nll_k": k, "nll_examples": int(len(x))}


def pca_fit(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components [D, k]) of x, in float64 for a stable baseline."""
    xd = torch.from_numpy(x).double()
    mean = xd.mean(0)
    cov = (xd - mean).T @ (xd - mean) / max(len(x) - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    comps = evecs[:, torch.argsort(evals, descending=True)[:k]]
    return mean.numpy(), comps.numpy()


def nearest(q: np.ndarray, db: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, database, ids of each query's k nearest) by FAISS's exact search; under cosine both come back
    normalised, as they were searched."""
    import faiss

    q32, db32 = np.ascontiguousarray(q, np.float32), np.ascontiguousarray(db, np.float32)
    if metric == "cosine":
        q32 = q32 / np.maximum(np.linalg.norm(q32, axis=1, keepdims=True), 1e-12)
        db32 = db32 / np.maximum(np.linalg.norm(db32, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(db32.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(db32.shape[1])
    index.add(db32)
    _, ids = index.search(q32, min(k, len(db32)))
    return q32, db32, ids


def retrieval(q: np.ndarray, qy: np.ndarray, db: np.ndarray, dby: np.ndarray, metric: str,
              at: tuple[int, ...] = (10,), knn: int = 5, map_queries: int | None = 1000, seed: int = 0,
              chunk: int = 256) -> dict:
    """precision@n, mAP and k-NN accuracy of queries against a database, same label = relevant.

    precision@n and k-NN accuracy take every query, from FAISS's exact top-k search (one
    BLAS product per block of queries: seconds for MNIST's 10k x 60k). mAP needs each
    query's whole ranking, so it takes `map_queries` queries drawn with `seed` (None: all),
    ranked in chunks; its sample size is reported as mAP_queries."""
    q32, db32, ids = nearest(q, db, metric, max(max(at), knn))
    rel = dby[ids] == qy[:, None]
    n_classes = int(max(qy.max(), dby.max())) + 1
    votes = np.zeros((len(q32), n_classes), np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(q32)), knn), dby[ids[:, :knn]].ravel()), 1)
    out = {f"precision@{n}": float(rel[:, :n].mean()) for n in at}

    picked = np.arange(len(q32))
    if map_queries is not None and map_queries < len(q32):
        picked = np.sort(np.random.default_rng(seed).choice(len(q32), map_queries, replace=False))
    qt, dbt = torch.from_numpy(q32[picked]), torch.from_numpy(db32)
    qyt, dbyt = torch.from_numpy(qy[picked]), torch.from_numpy(dby)
    db_sq = (dbt * dbt).sum(1)
    ap_sum = 0.0
    for i in range(0, len(qt), chunk):
        qb = qt[i : i + chunk]
        score = qb @ dbt.T if metric == "cosine" else -(db_sq[None] - 2 * qb @ dbt.T)  # higher = nearer
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        relevant = (dbyt[order] == qyt[i : i + chunk, None]).float()
        hits = relevant.cumsum(1)
        ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
        ap_sum += float((((hits / ranks) * relevant).sum(1) / relevant.sum(1).clamp_min(1)).sum())
    out.update({"mAP": ap_sum / len(picked), "mAP_queries": len(picked),
                f"{knn}nn_accuracy": float((votes.argmax(1) == qy).mean())})
    return out


# ---------------------------------------------------------------- the report


BASELINES = ("pca", "raw")


def evaluate(target: Path, spec: str | None = None, k: int = 100, nll_examples: int | None = None,
             at: tuple[int, ...] = (10,), baselines: tuple[str, ...] = BASELINES, map_queries: int | None = 1000,
             progress: bool = True) -> dict:
    coder = open_coder(target)
    ds = load_dataset(spec or coder.data_spec, transform=transform_from_dict(coder.transform))
    if ds.dim != coder.input_dim:
        raise UserError(f"--data: {ds.name} has {ds.dim} features a row, and {target} takes {coder.input_dim}; "
                        f"evaluate it on data like its own ({coder.data_spec})")
    return evaluate_coder(coder, ds, k=k, nll_examples=nll_examples, at=at, baselines=baselines,
                          map_queries=map_queries, progress=progress)


def binarized(x: np.ndarray, seed: int = 1234) -> np.ndarray:
    """A fixed stochastic binarisation of [0, 1] data (the binarised-MNIST protocol)."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


def hamming_retrieval(q: np.ndarray, qy: np.ndarray, db: np.ndarray, dby: np.ndarray, at: tuple[int, ...] = (10,),
                      knn: int = 5) -> dict:
    """precision@n and k-NN accuracy of packed-bit codes (uint8, numpy.packbits order) by Hamming distance,
    from FAISS's exact binary search: how a hash model's bits are searched in a hamming index."""
    import faiss

    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(np.ascontiguousarray(db, np.uint8))
    _, ids = index.search(np.ascontiguousarray(q, np.uint8), min(max(max(at), knn), len(db)))
    rel = dby[ids] == qy[:, None]
    n_classes = int(max(qy.max(), dby.max())) + 1
    votes = np.zeros((len(q), n_classes), np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(q)), knn), dby[ids[:, :knn]].ravel()), 1)
    return {**{f"precision@{n}": float(rel[:, :n].mean()) for n in at},
            f"{knn}nn_accuracy": float((votes.argmax(1) == qy).mean())}


def evaluate_coder(coder: Coder, ds: Dataset, k: int = 100, nll_examples: int | None = None,
                   at: tuple[int, ...] = (10,), baselines: tuple[str, ...] = BASELINES, map_queries: int | None = 1000,
                   progress: bool = True) -> dict:
    """The model's figures on the test split, beside the chosen baselines (PCA at the same size, raw input)."""
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise UserError(f"--baselines: unknown {', '.join(unknown)}; expected a comma list of {', '.join(BASELINES)}, or none")
    x_test, x_train = ds.x_test, ds.x_train
    if coder.binarized:
        x_test, x_train = binarized(x_test), binarized(x_train, seed=4321)
    tgt_train, tgt_test = target_of(x_train, coder.likelihood), target_of(x_test, coder.likelihood)
    metric = "cosine" if ds.modality == "text" else "l2"

    with stage(f"evaluate: codes and reconstructions of {len(x_test)} test rows", progress):
        codes_test = batched(lambda b: coder.encode(b)[0], x_test)
        recon = batched(coder.decode, codes_test)
    err = ((recon - tgt_test) ** 2).sum(1)
    model = {"sq_error": float(err.mean()), "mse": float(err.mean() / x_test.shape[1])}

    # PCA at the same size: on the reconstruction target for errors, on the input for retrieval.
    pca = mean = comps = None
    if "pca" in baselines:
        with stage(f"evaluate: PCA-{coder.latent_dim} fitted on {len(x_train)} training rows", progress):
            mean, comps = pca_fit(tgt_train, coder.latent_dim)
        pca_recon = (tgt_test - mean) @ comps @ comps.T + mean
        pca_err = ((pca_recon - tgt_test) ** 2).sum(1)
        pca = {"sq_error": float(pca_err.mean()), "mse": float(pca_err.mean() / x_test.shape[1])}

    if coder.kind in VAE_KINDS and k > 0:
        sub = x_test[:nll_examples] if nll_examples else x_test
        model.update(importance_sampled(coder, sub, k, progress=progress))

    report = {"data": ds.describe(), "kind": coder.kind, "likelihood": coder.likelihood,
              "latent_dim": coder.latent_dim, "binarized": coder.binarized, "retrieval_metric": metric,
              "model": model, **({"pca": pca} if pca is not None else {})}
    if "neg_elbo" in model and coder.likelihood == "bernoulli" and not coder.binarized \
            and not np.isin(x_test[:256], (0.0, 1.0)).all():
        # Grey levels under a Bernoulli decoder: the "likelihood" is a cross-entropy against soft targets, and
        # comparing it with binarised-MNIST nats in papers would mislead.
        report["likelihood_note"] = ("Bernoulli decoder on grey-level data: neg_elbo and nll_is are cross-entropies "
                                     "in nats, not log-likelihoods of the images (train with --binarize for those)")
    if ds.y_train is not None and ds.y_test is not None:
        sample = "all" if map_queries is None or map_queries >= len(x_test) else map_queries
        with stage(f"evaluate: retrieval, {len(x_test)} test queries among {len(x_train)} training rows "
                   f"(mAP on {sample} queries)", progress):
            codes_train = batched(lambda b: coder.encode(b)[0], x_train)
            model.update(retrieval(codes_test, ds.y_test, codes_train, ds.y_train, metric, at, map_queries=map_queries))
            if pca is not None:
                same = tgt_train is x_train
                mean_in, comps_in = (mean, comps) if same else pca_fit(x_train, coder.latent_dim)
                pca.update(retrieval((x_test - mean_in) @ comps_in, ds.y_test, (x_train - mean_in) @ comps_in,
                                     ds.y_train, metric, at, map_queries=map_queries))
            if coder.kind == "hash":  # the bits themselves, as a hamming index searches them
                report["bits"] = hamming_retrieval(np.packbits(codes_test > 0.5, axis=1), ds.y_test,
                                                   np.packbits(codes_train > 0.5, axis=1), ds.y_train, at)
            if "raw" in baselines:
                report["raw"] = retrieval(x_test, ds.y_test, x_train, ds.y_train, metric, at, map_queries=map_queries)
    return report


def format_table(report: dict) -> str:
    """The report as a plain table: one row per figure, one column per model."""
    cols = [c for c in ("model", "bits", "pca", "raw") if c in report]
    names = {"model": f"{report['kind']}-{report['latent_dim']}", "bits": "hamming",
             "pca": f"pca-{report['latent_dim']}", "raw": "raw input"}
    keys = []
    for c in cols:
        keys += [k for k in report[c] if k not in keys and k not in ("nll_k", "nll_examples", "mAP_queries")]
    lines = [f"{'figure':<16}" + "".join(f"{names[c]:>14}" for c in cols)]
    for key in keys:
        cells = "".join(f"{report[c][key]:>14.4f}" if key in report[c] else f"{'—':>14}" for c in cols)
        lines.append(f"{key:<16}{cells}")
    d = report["data"]
    foot = f"{d['name']}: {d['n_test']} test vs {d['n_train']} train; retrieval by {report['retrieval_metric']}"
    if "nll_k" in report["model"]:
        foot += f"; IS-NLL with k={report['model']['nll_k']} on {report['model']['nll_examples']} examples"
    if report["binarized"]:
        foot += "; binarised data"
    if "mAP_queries" in report["model"]:
        foot += f"; mAP on {report['model']['mAP_queries']} queries"
    notes = [report["likelihood_note"]] if "likelihood_note" in report else []
    return "\n".join(lines + [foot, *notes])


def write_json(report: dict, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
