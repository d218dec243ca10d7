"""Export a training run as a model bundle (`models/<name>/<version>/`).

The bundle is assembled in a hidden temporary folder beside its final place
and renamed into it only once both graphs pass onnx's checker and match torch
on a real test batch, so a server watching the repository never sees half a
bundle and a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from zspace import __version__
from zspace.bundle import (
    FORMAT_VERSION,
    PRECISIONS,
    VAE_KINDS,
    Bundle,
    check_name,
    load_bundle,
    sha256_file,
    versions,
    write_manifest,
)
from zspace.errors import UserError
from zspace.files import staged_folder
from zspace.likelihood import target_of
from zspace.progress import stage
from zspace.runtime import PARITY_TOLERANCE, onnx_session, outputs_apart
from zspace.training.models import pack_bits
from zspace.training.quantize import write_variant
from zspace.training.run import load_model, load_run_data, read_metrics
from zspace.training.train import codes_of

OPSET = 20


class EncoderGraph(torch.nn.Module):
    """x -> mean (and logvar for VAE kinds; for hash models the probabilities and the packed bits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        mean, logvar = self.model.encode(x)
        if self.model.cfg.kind == "hash":
            return mean, pack_bits(mean)
        return (mean, logvar) if logvar is not None else mean


class DecoderGraph(torch.nn.Module):
    """z -> reconstruction in data space."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model.decode(z)


def export_graph(module: torch.nn.Module, name: str, example: torch.Tensor, outputs: list[str], path: Path) -> None:
    # The exporter logs a warning per missing optional torchvision op; none of ours need them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, external_data=False, opset_version=OPSET,
            input_names=[name], output_names=outputs,
            dynamic_shapes={name: {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )
    program.save(str(path), external_data=False)
    drop_weight_shapes(path)


def drop_weight_shapes(path: Path) -> None:
    """Remove the value_info entries that restate the weights' shapes (the exporter writes them; initializers carry
    their own). They are redundant, and ONNX Runtime's quantizer, which transposes Gemm weights, trips over them
    ("Inferred shape and existing shape differ"): the graph as exported must quantize as it is."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        onnx.save(model, str(path))


def parity(module: torch.nn.Module, path: Path, name: str, batch: np.ndarray) -> float:
    """max |ONNX Runtime − torch| over every float output, on a real batch (packed bits: see outputs_apart)."""
    with torch.no_grad():
        ref = module(torch.from_numpy(batch))
    ref = [r.numpy() for r in ([ref] if isinstance(ref, torch.Tensor) else ref)]
    return outputs_apart(onnx_session(path).run(None, {name: batch}), ref)


def fitted_prior(model, kind: str, x_train: np.ndarray) -> dict:
    """What Generate samples from: N(0, I) for VAE kinds, the codes' own Gaussian otherwise."""
    if kind in VAE_KINDS:
        return {"type": "standard_normal"}
    codes = codes_of(model, x_train).astype(np.float64)
    mean = codes.mean(0)
    cov = np.cov(codes, rowvar=False).reshape(len(mean), len(mean)) + 1e-6 * np.eye(len(mean))
    return {"type": "gaussian", "fitted_on": "training codes", "mean": mean.tolist(),
            "cholesky": np.linalg.cholesky(cov).tolist()}


def export_run(run: Path, repo: Path, name: str, version: int | None = None, precision: str = "fp32") -> Path:
    """Export RUN's best weights as REPO/NAME/VERSION (default: the highest + 1); returns the bundle's path.

    precision int8 or fp16: the fp32 bundle is made (and checked against torch) in a hidden folder first, and
    the variant made from it is what appears (training/quantize.py), its manifest naming the run it came from."""
    run, repo = Path(run), Path(repo)
    check_name(name)
    if precision not in PRECISIONS:
        raise UserError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    model, info = load_model(run)
    ds = load_run_data(run)
    existing = versions(repo, name)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if version < 1:
        raise UserError(f"--version: must be a positive integer, got {version}")
    final = repo / name / str(version)
    if final.exists():
        raise UserError(f"{final} already exists; bundles are immutable, export a new --version")
    batch = np.ascontiguousarray(ds.x_test[:64])
    if len(batch) < 2:
        raise UserError(f"{run}: the test split has fewer than 2 rows; cannot check export parity")
    with staged_folder(final) as staging:
        if precision == "fp32":
            write_fp32(model, info, ds, run, staging, name, version, batch)
        else:
            repo.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".export-", dir=repo) as tmp:  # hidden: no server loads it
                fp32 = write_fp32(model, info, ds, run, Path(tmp), name, version, batch)
                for png in run.glob("*.png"):
                    shutil.copy2(png, staging / png.name)
                write_variant(fp32, staging, precision, ds, {"run": str(run), "version": None,
                              "sha256": {g: fp32.graphs[g].sha256 for g in fp32.graphs}}, name=name, version=version)
    return final


def write_fp32(model, info: dict, ds, run: Path, out: Path, name: str, version: int, batch: np.ndarray) -> Bundle:
    """The fp32 bundle of MODEL in OUT: graphs checked against torch, PNGs, manifest; returns it as read back."""
    files, parities = export_graphs(model, batch, out)
    for png in run.glob("*.png"):
        shutil.copy2(png, out / png.name)
    rows = read_metrics(run)
    with stage("export: test-split metrics and the prior"):
        metrics = quality_metrics(model, ds, run)
        manifest = bundle_manifest(model, info, ds, name, version, files, parities, len(batch),
                                   epochs_trained=rows[-1]["epoch"] if rows else 0, metrics=metrics)
    write_manifest(out, manifest)
    return load_bundle(out)  # the reader's own checks, before anyone can see it


def export_graphs(model, batch: np.ndarray, out: Path) -> tuple[dict, dict]:
    """Both graphs into OUT, each checked by onnx and against torch on real rows: (manifest files, parities).

    The encoder is checked on test rows, the decoder on the encoder's codes of them."""
    import onnx

    mcfg = model.cfg
    enc_outputs = ["mean", "logvar"] if mcfg.kind in VAE_KINDS else ["mean", "bits"] if mcfg.kind == "hash" else ["mean"]
    graphs = {
        "encoder": (EncoderGraph(model), "x", torch.from_numpy(batch[:2]), enc_outputs, batch),
        "decoder": (DecoderGraph(model), "z", torch.zeros(2, mcfg.latent_dim), ["x_hat"],
                    np.ascontiguousarray(codes_of(model, batch))),
    }
    files, parities = {}, {}
    for g, (module, in_name, example, outputs, check_batch) in graphs.items():
        path = out / f"{g}.onnx"
        with stage(f"export: {g} graph to ONNX, checked, parity with torch on {len(check_batch)} rows"):
            export_graph(module.eval(), in_name, example, outputs, path)
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
            parities[g] = parity(module, path, in_name, check_batch)
        if parities[g] > PARITY_TOLERANCE:
            raise UserError(f"export: {g} ONNX output differs from torch by {parities[g]:.2e} "
                            f"(limit {PARITY_TOLERANCE:.0e}); the bundle was not written")
        files[g] = {"path": path.name, "sha256": sha256_file(path), "input": in_name, "outputs": outputs,
                    "bytes": path.stat().st_size}
    return files, parities


def quality_metrics(model, ds, run: Path) -> dict:
    """What the bundle says of its quality: the best validation epoch, the run's evaluation, test squared error."""
    rows = read_metrics(run)
    metrics = {"validation": min(rows, key=lambda r: r["val_loss"]) if rows else {}}
    if (run / "evaluation.json").is_file():
        metrics["test"] = json.loads((run / "evaluation.json").read_text())
    with torch.no_grad():
        recon = model.decode(model.encode(torch.from_numpy(ds.x_test))[0]).numpy()
    metrics["test_sq_error"] = float(((recon - target_of(ds.x_test, model.cfg.likelihood)) ** 2).sum(1).mean())
    return metrics


def bundle_manifest(model, info: dict, ds, name: str, version: int, files: dict, parities: dict, parity_rows: int, *,
                    epochs_trained: int, metrics: dict) -> dict:
    """manifest.json (docs/architecture.md has the format); write_manifest checks it before it is written."""
    import onnx

    mcfg = model.cfg
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "kind": mcfg.kind,
        "modality": ds.modality,
        "input_dim": mcfg.input_dim,
        "latent_dim": mcfg.latent_dim,
        "transform": ds.transform.to_dict(),
        "output": {
            "likelihood": mcfg.likelihood,
            "range": [0.0, 1.0] if mcfg.likelihood in ("bernoulli", "multinomial") and mcfg.kind != "pca" else None,
            "logvar": model.out_logvar.detach().tolist() if mcfg.likelihood == "gaussian" and mcfg.kind != "pca" else None,
        },
        "prior": fitted_prior(model, mcfg.kind, ds.x_train),
        "training": {
            "data": ds.describe(),
            "config": info["config"],
            "model": info["model"],
            "seed": info["config"]["seed"],
            "device": info["device"],
            "epochs_trained": epochs_trained,
            "best_epoch": metrics["validation"].get("epoch"),
        },
        "metrics": metrics,
        "export": {"opset": OPSET, "torch": torch.__version__, "onnx": onnx.__version__,
                   "parity_max_abs": parities, "parity_rows": parity_rows, "tolerance": PARITY_TOLERANCE},
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "zspace_version": __version__,
    }
    if ds.modality == "image":
        manifest["input_shape"] = list(ds.transform.shape)
    return manifest
