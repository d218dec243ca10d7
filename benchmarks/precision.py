"""Precision variants and shared memory: what int8 costs and gains, and what the shared-memory wire gains.

    python -m benchmarks.precision --bundle models/mnist-ae/1 --bundle models/news/1

Part one, quality: each fp32 bundle's int8 and fp16 variants (made with `zspace quantize`
where its models folder has none), their cost on the test split as their manifests
record it: code error, reconstruction error, precision@10 against fp32.

Part two, in-process speed: the first bundle's fp32 and int8 encoders, one caller on a
session of --threads threads, 1, 256 and 4096 rows per call, side by side in rounds.

Part three, served speed: two `zspace serve --precision fp32|int8` servers on the same
models folder, 8 clients x 256 rows (benchmarks.workers' Python load processes), side by
side in rounds.

Part four, the wire: one server (`--workers 1`), 8 x 256 and 16 x 4096 rows, sent as
float32 in the message, as zspace.v1 shared tensors (what ZSpaceClient sends to a local
server, from asyncio stubs), through ZSpaceClient itself (one per thread, shared memory on by
itself for loopback) and through tritonclient with system shared memory; each side by side with
in-process ONNX Runtime running the same layout (benchmarks.workers' reference).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import machine, median_round, side_by_side, table, write_json
from benchmarks.targets import check
from benchmarks.workers import in_process, precision_variant, served, start


def quality(bundles: list[Path]) -> list[dict]:
    from zspace.bundle import load_bundle

    rows = []
    for bundle in bundles:
        fp32 = load_bundle(bundle)
        for precision in ("int8", "fp16"):
            variant = load_bundle(precision_variant(bundle, precision))
            cost = variant.manifest["precision"]["cost"]
            rows.append({"model": fp32.label, "data": fp32.manifest["training"]["data"]["name"], "precision": precision,
                         "code_max_abs": cost["code_max_abs"], "code_max_of_range": cost["code_max_of_range"],
                         "sq_error_fp32": cost["sq_error_fp32"], "sq_error": cost["sq_error"],
                         "sq_error_change": cost["sq_error_change"], "p_at_10_fp32": cost["p_at_10_fp32"],
                         "p_at_10": cost["p_at_10"], "p_at_10_change": cost["p_at_10_change"],
                         "bytes": sum(variant.manifest["files"][g]["bytes"] for g in ("encoder", "decoder")),
                         "bytes_fp32": sum(fp32.manifest["files"][g]["bytes"] for g in ("encoder", "decoder"))})
    return rows


def rows_per_second(bundle: Path, rows: int, threads: int, seconds: float) -> dict:
    from zspace.bundle import load_bundle
    from zspace.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(load_bundle(bundle), RuntimeOptions(threads=threads))
    x = np.random.default_rng(0).random((rows, rt.bundle.input_dim), dtype=np.float32)
    for _ in range(3):
        rt.encode(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rt.encode(x)
        n += 1
    elapsed = time.perf_counter() - t0
    return {"rows_s": n * rows / elapsed, "value": n * rows / elapsed}


def in_process_speed(bundle: Path, threads: int, seconds: float, rounds: int) -> list[dict]:
    int8, fp16 = precision_variant(bundle, "int8"), precision_variant(bundle, "fp16")
    out = []
    for rows in (1, 256, 4096):
        got = side_by_side(f"in-process int8 / fp32, {rows} rows", lambda r=rows: rows_per_second(int8, r, threads, seconds),
                           lambda r=rows: rows_per_second(bundle, r, threads, seconds), rounds)
        median = median_round(got["rounds"], "ratio")
        half = rows_per_second(fp16, rows, threads, seconds)["rows_s"]  # for information: fp16 is for GPUs
        out.append({"rows": rows, "fp32_rows_s": median["second"]["rows_s"], "int8_rows_s": median["first"]["rows_s"],
                    "int8_vs_fp32": got["ratio"], "fp16_rows_s": half})
    return out


def served_speed(bundle: Path, seconds: float, rounds: int, processes: int, extra: list[str]) -> dict:
    precision_variant(bundle, "int8")
    models = bundle.parents[1]
    servers = {p: start(models, 1, "cpu", ["--precision", p, "--max-queue", "65536", *extra])[0] for p in ("int8", "fp32")}
    try:
        side = lambda p: (lambda: {**(r := served(servers[p].target, 8, 256, seconds, 10**6, processes)), "value": r["rows_s"]})
        got = side_by_side("served 8 x 256, int8 / fp32", side("int8"), side("fp32"), rounds)
    finally:
        for s in servers.values():
            s.stop()
    median = median_round(got["rounds"], "ratio")
    return {"clients": 8, "rows": 256, "int8_rows_s": median["first"]["rows_s"], "fp32_rows_s": median["second"]["rows_s"],
            "int8_p99_ms": median["first"]["p99_ms"], "fp32_p99_ms": median["second"]["p99_ms"], "ratio": got["ratio"],
            "errors": median["first"]["errors"] + median["second"]["errors"]}


def wire_speed(bundle: Path, seconds: float, rounds: int, processes: int, extra: list[str]) -> list[dict]:
    child, _ = start(bundle.parents[1], 1, "cpu", ["--max-queue", "65536", *extra])
    out = []
    try:
        for clients, rows in ((8, 256), (16, 4096)):
            for wire in ("float32", "shm", "zspace-client", "triton-shm"):
                def server_side(c=clients, r=rows, w=wire) -> dict:
                    got = served(child.target, c, r, seconds, 10**6, min(processes, c), w)
                    return {**got, "value": got["rows_s"]}

                got = side_by_side(f"{clients} x {rows} {wire}, served / in-process", server_side,
                                   lambda c=clients, r=rows: {**(x := in_process(bundle, "cpu", c, r, seconds)),
                                                              "value": x["rows_s"]}, rounds)
                median = median_round(got["rounds"], "ratio")
                out.append({"clients": clients, "rows": rows, "wire": wire, "served_rows_s": median["first"]["rows_s"],
                            "p50_ms": median["first"]["p50_ms"], "p99_ms": median["first"]["p99_ms"],
                            "in_process_rows_s": median["second"]["rows_s"], "share": got["ratio"],
                            "errors": median["first"]["errors"]})
    finally:
        child.stop()
    return out


def wire_part(record: dict, targets: dict, bundle: Path, seconds: float, rounds: int, processes: int,
              extra: list[str]) -> None:
    print(f"part four: the wire, served vs in-process (server options: {' '.join(extra) or 'defaults'})", flush=True)
    record["wire"] = wire_speed(bundle, seconds, rounds, processes, extra)
    print(table(record["wire"], list(record["wire"][0]), "Encode, --workers 1, each wire vs in-process ORT"))
    for r in record["wire"]:
        if r["wire"] in ("shm", "triton-shm"):
            targets[f"{r['wire'].replace('-', '_')}_share_{r['clients']}x{r['rows']}"] = r["share"]
        elif r["wire"] == "zspace-client":
            targets[f"zspace_client_share_{r['clients']}x{r['rows']}"] = r["share"]


@click.command()
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="An fp32 bundle (models/NAME/VERSION); repeat for more. The first (an MNIST AE, 784 inputs) is timed.")
@click.option("--threads", default=2, help="Part two: ONNX Runtime threads of the in-process session.")
@click.option("--seconds", default=3.0, help="Duration of each side of a round.")
@click.option("--rounds", default=3, help="Side-by-side rounds; the median round's ratio is the figure.")
@click.option("--client-processes", default=4, help="Parts three and four: load processes (Python clients).")
@click.option("--skip-served", is_flag=True, help="Only parts one and two.")
@click.option("--only-wire", is_flag=True, help="Only part four (the wire).")
@click.option("--server-option", "extra", multiple=True,
              help="Passed to the servers of parts three and four, e.g. --server-option=--instances=2.")
@click.option("--json", "json_path", default="benchmarks/results/precision.json", help="Where the figures go.")
def main(bundles, threads, seconds, rounds, client_processes, skip_served, only_wire, extra, json_path):
    bundles, extra = [Path(b) for b in bundles], list(extra)
    record = {"benchmark": "precision", "machine": machine(), "seconds_per_side": seconds, "rounds": rounds,
              "server_options": extra}
    targets = {}
    if only_wire:
        wire_part(record, targets, bundles[0], seconds, rounds, client_processes, extra)
        record["targets"] = check("precision", targets)
        return write_json(Path(json_path), record)
    print("part one: the variants' cost on the test split", flush=True)
    record["quality"] = quality(bundles)
    print(table(record["quality"], ["model", "data", "precision", "code_max_abs", "sq_error_fp32", "sq_error",
                                    "sq_error_change", "p_at_10_fp32", "p_at_10", "p_at_10_change", "bytes", "bytes_fp32"],
                "int8 and fp16 against fp32, test split"))
    print(f"part two: in-process int8 vs fp32, {threads} threads", flush=True)
    record["in_process"] = in_process_speed(bundles[0], threads, seconds, rounds)
    print(table(record["in_process"], list(record["in_process"][0]), "Encode rows/s in process, side by side"))
    int8_rows = [r for r in record["quality"] if r["precision"] == "int8"]
    targets["int8_p_at_10_loss"] = max(-r["p_at_10_change"] for r in int8_rows if r["p_at_10_change"] is not None)
    targets["int8_sq_error_change"] = max(r["sq_error_change"] for r in int8_rows)
    targets["int8_vs_fp32_in_process_256"] = next(r["int8_vs_fp32"] for r in record["in_process"] if r["rows"] == 256)
    if not skip_served:
        print("part three: served int8 vs served fp32, 8 x 256", flush=True)
        record["served"] = served_speed(bundles[0], seconds, rounds, client_processes, extra)
        print(table([record["served"]], list(record["served"]), "Encode through zspace serve, side by side"))
        targets["int8_vs_fp32_served_8x256"] = record["served"]["ratio"]
        wire_part(record, targets, bundles[0], seconds, rounds, client_processes, extra)
    record["targets"] = check("precision", targets)
    write_json(Path(json_path), record)


if __name__ == "__main__":
    main()
