"""Serving benchmark: Encode through the real server vs Python gRPC's ceiling vs in-process ONNX Runtime.

The server runs as its own process (`zspace serve`) on loopback with the
MNIST-sized AE (784-1000-500-250-30); the load comes from a grpc.aio client
in this process with N concurrent callers, each bounded in time and count.
The "echo" server is the same harness against a servicer that answers Encode
with a fixed response and does no work: the most Python gRPC can do here.

    python -m benchmarks.serve [--run benchmarks/results/mnist_runs/ae]

The server is configured for throughput on this machine: `--instances` runs
in flight per graph (default: one per core, one ONNX Runtime thread each);
batching on is `--max-batch 64 --max-delay-ms 1`, off is `--max-batch 1`.
The in-process reference is the fastest of one run on all cores (spinning
or not) and the server's own layout of parallel runs. Both ratio targets are
taken side by side: `--rounds` rounds of the server, then echo (64 x 1 row)
or in-process ORT (256 rows), seconds apart; the median round's ratio is the
figure (this machine's speed drifts over a minute by more than the margins
being measured).

Targets (targets.py): 64 clients x 1 row, batching on >= 70% of echo's requests/s;
256-row requests >= 70% of in-process ONNX Runtime rows/s; p99 at 8 clients <= 10 ms.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import (
    GRPC_OPTIONS,
    ServerChild,
    bundle_for,
    closed_loop,
    free_port,
    machine,
    run_in_threads,
    serve_command,
    side_by_side,
    table,
    write_json,
)
from benchmarks.targets import check

SIZES = (1, 8, 64, 256)


# ------------------------------------------------------------------ the echo server (a child process)


def run_echo(port: int) -> None:
    """A ZSpace server whose Encode answers a fixed response: the most Python gRPC can do here."""
    import grpc

    from zspace.memory import keep_freed_memory
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    keep_freed_memory()  # the same process tuning as `zspace serve`: the ceiling is the ceiling
    reply = pb.EncodeResponse(mean=pb.Tensor(shape=[1, 30], data=bytes(120)), version=1)

    class Echo(pb_grpc.ZSpaceServicer):
        async def Encode(self, request, context):
            return reply

    async def main():
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ZSpaceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# ------------------------------------------------------------------ the two sides of each ratio


@dataclass
class Setup:
    bundle: Path
    seconds: float
    max_requests: int
    instances: int
    threads: int
    precision: str = "fp32"  # the bundle's precision; the server is told to answer with it (--precision)


async def encode_load(target: str, rows: np.ndarray, clients: int, seconds: float, max_requests: int,
                      model: str = "mnist-ae") -> dict:
    """Closed-loop Encode of `rows` per request from `clients` concurrent callers on one channel."""
    import grpc

    from zspace.service.client import to_tensor
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    request = pb.EncodeRequest(model=pb.ModelRef(name=model), inputs=pb.Inputs(tensor=to_tensor(rows)))
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        for _ in range(20):  # warm the connection and the server's code paths
            await stub.Encode(request, timeout=30)
        r = await closed_loop(lambda i: stub.Encode(request, timeout=30), clients, seconds, max_requests,
                              errors=(grpc.aio.AioRpcError,))
    return {**r, "rows_s": r["req_s"] * len(rows)}


def measure(setup: Setup, label: str, target: str, x: np.ndarray, clients: int) -> dict:
    r = asyncio.run(encode_load(target, x, clients, setup.seconds, setup.max_requests))
    print(f"{label:<22} clients={clients:<3} rows={len(x):<4} {r['req_s']:9.0f} req/s {r['rows_s']:10.0f} rows/s "
          f"p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:6.2f} ms errors {r['errors']}", flush=True)
    return {"setup": label, "rows_per_request": len(x), **r}


def in_process(setup: Setup, batch: int) -> dict:
    """ONNX Runtime at its best here: one run on all cores (spinning or not), or the server's layout
    of `instances` runs side by side with `threads` each; the fastest is the reference."""
    cores = os.cpu_count() or 1
    layouts = [(1, cores, True), (1, cores, False)] + ([(setup.instances, setup.threads, False)] if setup.instances > 1 else [])
    runs = [in_process_once(setup.bundle, batch, setup.seconds / len(layouts), *layout) for layout in layouts]
    best = max(runs, key=lambda r: r["rows_s"])
    return {**best, "layouts": {r["layout"]: r["rows_s"] for r in runs}}


def in_process_once(bundle: Path, batch: int, seconds: float, parallel: int, threads: int, spin: bool) -> dict:
    from zspace.bundle import load_bundle
    from zspace.runtime import RuntimeOptions, open_runtime

    runtime = open_runtime(load_bundle(bundle), RuntimeOptions(threads=threads, spin=spin))
    x = np.random.default_rng(0).random((batch, runtime.bundle.input_dim), dtype=np.float32)
    for _ in range(10):
        runtime.encode(x)
    n, elapsed = run_in_threads(lambda: runtime.encode(x), parallel, seconds)
    return {"req_s": n / elapsed, "rows_s": n * batch / elapsed, "p50_ms": elapsed / n * parallel * 1000,
            "layout": f"{parallel} run(s) x {threads} thread(s){' spinning' if spin else ''}"}


# ------------------------------------------------------------------ the phases


def server_phase(setup: Setup, label: str, options: list[str], echo: str, rounds: int) -> tuple[list[dict], dict]:
    """One `zspace serve` configuration: 1-row latency rows, and (batching on) both ratio targets side by side."""
    rng = np.random.default_rng(0)
    one, big = rng.random((1, 784), dtype=np.float32), rng.random((256, 784), dtype=np.float32)
    port = free_port()
    base = ["--metrics-port", "0", "--instances", str(setup.instances), "--threads", str(setup.threads), "--poll-s", "0",
            "--precision", setup.precision]
    child = ServerChild(serve_command(setup.bundle.parents[1], port, *base, *options), port).wait_listening()
    rows, ratios = [], {}
    try:
        rows += [measure(setup, label, child.target, one, clients) for clients in ((1, 8, 64) if "off" in label else (1, 8))]
        if "off" not in label:
            def grpc_side(target: str, x: np.ndarray, clients: int, name: str):
                return lambda: {**(row := measure(setup, name, target, x, clients)), "value": row["rows_s"]}

            def ort_side() -> dict:
                ort = in_process(setup, len(big))
                print(f"  in-process ORT {ort['rows_s']:.0f} rows/s ({ort['layout']})", flush=True)
                return {**ort, "value": ort["rows_s"]}

            # The two ratio targets, each taken side by side (the echo server waits idle meanwhile).
            ratios["rows64x1_vs_echo"] = side_by_side("64 x 1 row, server / echo", grpc_side(child.target, one, 64, label),
                                                      grpc_side(echo, one, 64, "echo (gRPC ceiling)"), rounds)
            ratios["rows256_vs_in_process"] = side_by_side("256 rows, server / in-process ORT",
                                                           grpc_side(child.target, big, 8, label), ort_side, rounds)
            rows += [ratios["rows64x1_vs_echo"]["row"], ratios["rows256_vs_in_process"]["row"]]
    finally:
        child.stop()
    return rows, ratios


def reference_rows(setup: Setup, before: dict[int, dict]) -> list[dict]:
    """In-process ORT at its best on this noisy machine: measured before and after the server phases, the fastest kept."""
    rows = []
    for batch in SIZES:
        after = in_process(setup, batch)
        r = max(before[batch], after, key=lambda r: r["rows_s"])
        layouts = {name: max(before[batch]["layouts"][name], after["layouts"][name]) for name in after["layouts"]}
        rows.append({"setup": "in-process ORT", "clients": 1, "rows_per_request": batch, **r, "layouts": layouts})
        print(f"in-process ORT batch={batch:<4} {r['rows_s']:10.0f} rows/s ({r['layout']})", flush=True)
    return rows


def summarise(rows: list[dict], ratios: dict, setup: Setup) -> dict:
    """The targets, plus two readings of the 256-row figure for information."""
    def pick(name, clients, n):
        return next(r for r in rows if r["setup"] == name and r["clients"] == clients and r["rows_per_request"] == n)

    served256 = pick("server, batching on", 8, 256)["rows_s"]
    fastest = max([pick("in-process ORT", 1, 256)["rows_s"]] + [d["second"]["rows_s"] for d in ratios["rows256_vs_in_process"]["rounds"]])
    cores = os.cpu_count() or 1
    one_run = max(v for k, v in pick("in-process ORT", 1, 256)["layouts"].items() if k.startswith(f"1 run(s) x {cores} "))
    how = "median of side-by-side rounds"
    targets = check("serve", {"batching_on_64x1_vs_echo": ratios["rows64x1_vs_echo"]["ratio"],
                              "rows256_vs_in_process_ort": ratios["rows256_vs_in_process"]["ratio"],
                              "p99_ms_8_clients": pick("server, batching on", 8, 1)["p99_ms"]},
                    {"batching_on_64x1_vs_echo": how, "rows256_vs_in_process_ort": how})
    targets["rows256_vs_fastest_in_process_any_time"] = {"value": served256 / fastest, "target": "(information)", "met": None}
    targets["rows256_vs_one_in_process_run"] = {"value": served256 / one_run, "target": "(information)", "met": None}
    return targets


def print_tables(rows: list[dict], ratios: dict) -> dict:
    cols = ["setup", "clients", "rows_per_request", "req_s", "rows_s", "p50_ms", "p90_ms", "p99_ms", "errors"]
    print(table(rows, cols, "Encode on the MNIST AE (784-1000-500-250-30), loopback"))
    side = {}
    for name, key, sides in (("rows64x1_vs_echo", "req_s", ("server_req_s", "echo_req_s")),
                             ("rows256_vs_in_process", "rows_s", ("server_rows_s", "in_process_rows_s"))):
        got = ratios[name]
        rounds = [{"round": d["round"], sides[0]: d["first"][key], sides[1]: d["second"][key], "ratio": d["ratio"]}
                  for d in got["rounds"]]
        print(table(rounds, ["round", *sides, "ratio"], f"{name}, side by side"))
        side[name] = {"rounds": rounds, "median_round": got["median_round"], "ratio": got["ratio"]}
    return side


@click.command()
@click.option("--run", type=click.Path(exists=True, file_okay=False), default=None, help="MNIST AE run to export (default: train 1 epoch).")
@click.option("--seconds", default=4.0, help="Load duration per configuration.")
@click.option("--max-requests", default=200_000, help="Request cap per configuration.")
@click.option("--rounds", default=3, help="Side-by-side rounds of each ratio target: server, then echo or in-process ORT.")
@click.option("--instances", default=os.cpu_count() or 1, help="Server: ONNX Runtime runs in flight per graph.")
@click.option("--threads", default=0, help="Server: ONNX Runtime threads per run (0: cores / instances).")
@click.option("--json", "json_path", default="benchmarks/results/serve.json", help="Where the figures go.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="cuda, or --workers above 1: the worker benchmark's load matrix instead (benchmarks/workers.py).")
@click.option("--workers", default=1, help="Server worker processes (above 1: benchmarks/workers.py's matrix).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32",
              help="Serve (and time in process) the bundle's variant of this precision, made by `zspace quantize`.")
@click.option("--wire", type=click.Choice(["float32", "uint8", "shm", "zspace-client", "triton-shm"]), default="float32",
              help="Other than float32: the load matrix (benchmarks/workers.py) with clients sending that way.")
@click.option("--echo-port", type=int, default=None, hidden=True)
def main(run, seconds, max_requests, rounds, instances, threads, json_path, device, workers, precision, wire, echo_port):
    if echo_port:
        return run_echo(echo_port)
    if device != "cpu" or workers > 1 or wire != "float32":
        # 64x1, 8x1, 8x256, 16x4096 against in-process ORT on the same device, plus --workers N vs 1 (h2load).
        from benchmarks.workers import MATRIX
        from benchmarks.workers import measure as measure_workers

        out = json_path if json_path != "benchmarks/results/serve.json" else f"benchmarks/results/workers-{device}.json"
        return measure_workers(run, None, device, workers, 64, seconds, rounds, True, 4, 2_000_000, [], out, MATRIX,
                               wire, wire != "float32", precision)
    from zspace.memory import keep_freed_memory

    keep_freed_memory()  # the load generator and the in-process reference get the server's tuning too
    bundle = bundle_for(Path(run) if run else None, Path(tempfile.mkdtemp(prefix="zspace-serve-bench-")))
    if precision != "fp32":
        from benchmarks.workers import precision_variant

        bundle = precision_variant(bundle, precision)
    setup = Setup(bundle, seconds, max_requests, instances, threads or max(1, (os.cpu_count() or 1) // instances),
                  precision)
    before = {batch: in_process(setup, batch) for batch in SIZES}
    echo_port = free_port()
    echo = ServerChild([sys.executable, "-m", "benchmarks.serve", "--echo-port", str(echo_port)], echo_port).wait_listening()
    try:
        rows, ratios = server_phase(setup, "server, batching on", ["--max-batch", "64", "--max-delay-ms", "1"], echo.target, rounds)
        rows += server_phase(setup, "server, batching off", ["--max-batch", "1", "--max-delay-ms", "0"], echo.target, rounds)[0]
        rows += [measure(setup, "echo (gRPC ceiling)", echo.target, np.zeros((1, 784), np.float32), c) for c in (1, 8)]
        rows.append(ratios["rows64x1_vs_echo"]["rounds"][ratios["rows64x1_vs_echo"]["median_round"] - 1]["second"])
    finally:
        echo.stop()
    rows += reference_rows(setup, before)
    side = print_tables(rows, ratios)
    write_json(Path(json_path), {"benchmark": "serve", "rows": rows, "side_by_side": side,
                                 "targets": summarise(rows, ratios, setup), "machine": machine(), "seconds_per_setup": seconds,
                                 "server": {"instances": setup.instances, "threads": setup.threads,
                                            "batching_on": "--max-batch 64 --max-delay-ms 1", "batching_off": "--max-batch 1"}})


if __name__ == "__main__":
    main()
