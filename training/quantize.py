"""Precision variants of a bundle: int8 and fp16 graphs made from the fp32 ones, with what they cost.

A variant is a bundle of its own (its own version, manifest and hashes), so everything that
serves, indexes or evaluates bundles takes it unchanged. What makes it safe to serve is in its
manifest: how far its graphs may be from the fp32 graphs (`precision.tolerance`, per graph),
the rows that check it (`parity.npz`: test inputs, the fp32 codes of them and the fp32 graphs'
answers), and what the lower precision costs on the test split (code error, reconstruction
error, precision@10, and for hash models how many bits agree). The tolerance is checked here
before the bundle appears and again wherever it is loaded, on whichever provider runs it.

int8 is ONNX Runtime's dynamic quantization: weights stored as int8 per tensor, activations
quantized per call from their own range (MatMulInteger/ConvInteger), which needs no
calibration data and keeps the float32 inputs and outputs. fp16 converts weights and arithmetic
to float16 and keeps float32 at the graph's edges (`keep_io_types`): the GPU's usual step; on a
CPU it runs, but slower than fp32.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np

from zspace.bundle import GRAPHS, PRECISIONS, Bundle, load_bundle, resolve_bundle, sha256_file, versions, write_manifest
from zspace.data import Dataset, load_dataset
from zspace.errors import UserError
from zspace.files import staged_folder, write_atomic
from zspace.likelihood import target_of
from zspace.progress import stage
from zspace.runtime import BundleRuntime, open_runtime, variant_parity
from zspace.transforms import transform_from_dict

PARITY_ROWS = 64
TOLERANCE_MARGIN = 4.0  # a variant promises at most this many times the distance measured at export (other CPUs
#                         round int8 products differently: without VNNI ONNX Runtime takes another kernel)
TOLERANCE_FLOOR = 1e-4  # and never less than an fp32 bundle's own promise
METHODS = {
    "int8": "onnxruntime.quantization.quantize_dynamic: int8 weights per tensor (QInt8), activations quantized "
            "per call from their range; float32 inputs and outputs; convolutions stay float32",
    "fp16": "onnxruntime.transformers.float16.convert_float_to_float16: float16 weights and arithmetic, "
            "float32 inputs and outputs (keep_io_types)",
}


def convert_graph(src: Path, dst: Path, precision: str) -> None:
    """One fp32 ONNX graph as `precision`, written to DST (and checked by onnx)."""
    import onnx

    from zspace.training.export import drop_weight_shapes

    if precision not in ("int8", "fp16"):
        raise UserError(f"--precision: expected int8 or fp16, got {precision!r}")
    work = dst.with_name(f".{dst.name}.fp32")
    shutil.copyfile(src, work)
    drop_weight_shapes(work)  # bundles exported before the exporter dropped them
    try:
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(work), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=int8_ops(work))
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(topologically_sorted(convert_float_to_float16(onnx.load(str(work)), keep_io_types=True)), str(dst))
        onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    except Exception as exc:  # the converters raise anything; the user needs the graph and the reason, then our bug
        raise UserError(f"{src.name}: {precision} conversion failed ({type(exc).__name__}: {str(exc)[:300]})") from exc
    finally:
        work.unlink(missing_ok=True)


# Convolutions stay float32 in an int8 graph: ONNX Runtime's ConvInteger ran a conv MNIST encoder at 6.0k rows/s
# against fp32's 41.5k on this project's CPU (256 rows, 2 threads), while its dense layers gain as in an MLP. Static
# QDQ quantization with 1,024 calibration rows ran it at 47.8k (1.13x) but moved codes by 0.40, 14 times the dynamic
# error (benchmarks/README.md, "Precision variants and shared memory").
DENSE_OPS = ["MatMul", "Gemm"]


def int8_ops(path: Path) -> list[str] | None:
    """The op types int8 quantizes in the graph at PATH: all that ONNX Runtime can (None) for dense networks,
    only the dense layers where the graph has convolutions."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    return DENSE_OPS if ops & {"Conv", "ConvTranspose"} else None


def topologically_sorted(model):
    """MODEL with its nodes in an order where each runs after what it reads: the float16 converter appends the
    casts it puts at the graph's edges at the end, which onnx's checker refuses."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise ValueError("the graph has a cycle or reads a value nothing makes")
        for n in runnable:
            ready.update(n.output)
        ordered += runnable
        pending = [n for n in pending if not any(n is r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def precision_at_10(codes_test: np.ndarray, codes_train: np.ndarray, ds: Dataset, metric: str) -> float | None:
    """Test rows as queries among training rows, relevant = same label (what `zspace evaluate` reports)."""
    from zspace.training.evaluate import nearest

    if ds.y_test is None or ds.y_train is None:
        return None
    _, _, ids = nearest(codes_test, codes_train, metric, 10)
    return float((ds.y_train[ids] == ds.y_test[:, None]).mean())


def variant_cost(fp32: BundleRuntime, variant: BundleRuntime, ds: Dataset) -> dict:
    """What the variant loses against the fp32 graphs on the test split (and, for P@10, the training split)."""
    precision = variant.bundle.precision
    metric = "cosine" if ds.modality == "text" else "l2"
    target = target_of(ds.x_test, fp32.bundle.likelihood)
    figures = {}
    with stage(f"quantize: {len(ds.x_test)} test rows and {len(ds.x_train)} training rows through fp32 and "
               f"{precision}"):
        for which, rt in (("fp32", fp32), (precision, variant)):
            codes = rt.codes(ds.x_test)
            recon = np.concatenate([rt.decode(np.ascontiguousarray(codes[i : i + 4096]))[0]
                                    for i in range(0, len(codes), 4096)])
            figures[which] = {"codes": codes, "sq_error": float(((recon - target) ** 2).sum(1).mean()),
                              "p_at_10": precision_at_10(codes, rt.codes(ds.x_train), ds, metric)}
    base, low = figures["fp32"], figures[precision]
    apart = np.abs(low["codes"] - base["codes"])
    spread = float(base["codes"].max() - base["codes"].min()) or 1.0
    cost = {
        "rows": len(ds.x_test),
        "code_max_abs": float(apart.max()), "code_mean_abs": float(apart.mean()),
        "code_max_of_range": float(apart.max() / spread),
        "sq_error": low["sq_error"], "sq_error_fp32": base["sq_error"],
        "sq_error_change": low["sq_error"] / base["sq_error"] - 1.0 if base["sq_error"] else 0.0,
        "p_at_10": low["p_at_10"], "p_at_10_fp32": base["p_at_10"],
        "p_at_10_change": None if base["p_at_10"] is None else low["p_at_10"] - base["p_at_10"],
    }
    if fp32.bundle.is_hash:
        cost["bits_agreement"] = float(((low["codes"] > 0.5) == (base["codes"] > 0.5)).mean())
    return cost


def write_variant(fp32: Bundle, out: Path, precision: str, ds: Dataset, source: dict, *, name: str, version: int) -> Bundle:
    """Make the `precision` variant of the fp32 bundle FP32 in the (staging) folder OUT as NAME/VERSION; returns
    it checked. OUT gets both converted graphs, the parity rows and a manifest that is FP32's with the variant's
    files, name and version, precision block and test-split error."""
    if fp32.precision != "fp32":
        raise UserError(f"{fp32.label} is already {fp32.precision}; variants are made from an fp32 bundle")
    for g in GRAPHS:
        with stage(f"quantize: {g} graph to {precision}"):
            convert_graph(fp32.graph(g), out / f"{g}.onnx", precision)
    x = np.ascontiguousarray(ds.x_test[:PARITY_ROWS])
    reference = open_runtime(fp32)
    encoded = reference.encode(x)
    z = np.ascontiguousarray(encoded[0])
    rows = {"x": x, "z": z}
    for graph, outs in (("encoder", encoded), ("decoder", reference.decode(z))):
        rows.update({f"{graph}.{name}": o for name, o in zip(fp32.graphs[graph].outputs, outs)})
    buffer = io.BytesIO()
    np.savez(buffer, **rows)
    write_atomic(out / "parity.npz", buffer.getvalue())

    manifest = {**fp32.manifest, "name": name, "version": version}
    manifest["files"] = {g: {**fp32.manifest["files"][g], "sha256": sha256_file(out / f"{g}.onnx"),
                             "bytes": (out / f"{g}.onnx").stat().st_size} for g in GRAPHS}
    manifest["files"]["parity"] = {"path": "parity.npz", "sha256": sha256_file(out / "parity.npz"), "rows": len(x)}
    # The distance is measured first, then promised with a margin.
    low = open_runtime(dataclasses.replace(fp32, path=out, precision=precision, parity_file="parity.npz"))
    measured = variant_parity(low)
    import onnxruntime

    manifest["precision"] = {
        "name": precision, "method": METHODS[precision], "onnxruntime": onnxruntime.__version__, "from": source,
        "parity_max_abs": measured, "parity_rows": len(x),
        "tolerance": {g: max(TOLERANCE_MARGIN * d, TOLERANCE_FLOOR) for g, d in measured.items()},
        "cost": variant_cost(reference, low, ds),
    }
    manifest["metrics"] = {**fp32.manifest["metrics"], "test_sq_error": manifest["precision"]["cost"]["sq_error"]}
    write_manifest(out, manifest)
    return load_bundle(out)  # the reader's own checks (hashes, the tolerance on these rows), before anyone sees it


def variant_data(bundle: Bundle, spec: str | None) -> Dataset:
    """The bundle's own data set (or SPEC) through the bundle's transform: the test split measures the cost."""
    spec = spec or bundle.manifest.get("training", {}).get("data", {}).get("spec")
    if not spec:
        raise UserError(f"{bundle.label}: the manifest names no data set; give --data")
    try:
        return load_dataset(spec, transform=transform_from_dict(bundle.transform))
    except (OSError, UserError) as exc:
        raise UserError(f"--data: cannot load {spec!r} to measure the variant ({exc}); give --data with the data set "
                        "the model was trained on") from None


def quantize_bundle(ref: str | Path, precision: str, version: int | None = None, data: str | None = None) -> Path:
    """REPO/NAME/VERSION (or REPO/NAME: its highest version), an fp32 bundle, as a `precision` variant in the
    next version (or VERSION); returns the new bundle's path. Nothing appears unless every check passes."""
    if precision not in PRECISIONS or precision == "fp32":
        raise UserError(f"--precision: expected int8 or fp16, got {precision!r}")
    fp32 = load_bundle(resolve_bundle(ref))
    if fp32.precision != "fp32":
        raise UserError(f"{fp32.label} is {fp32.precision}; quantize its fp32 version "
                        f"({fp32.precision_from})")
    repo = fp32.path.parent.parent
    existing = versions(repo, fp32.name)
    version = version or existing[-1] + 1
    final = repo / fp32.name / str(version)
    if final.exists():
        raise UserError(f"{final} already exists; bundles are immutable, give another --version")
    ds = variant_data(fp32, data)
    source = {"name": fp32.name, "version": fp32.version,
              "sha256": {g: fp32.graphs[g].sha256 for g in GRAPHS}}
    with staged_folder(final) as staging:
        for png in fp32.path.glob("*.png"):
            shutil.copy2(png, staging / png.name)
        write_variant(fp32, staging, precision, ds, source, name=fp32.name, version=version)
    return final

