"""Serving benchmark: Encode through the real server vs Python gRPC's ceiling vs in-process ONNX Runtime.

The server runs as its own process (`zspace serve`) on loopback with the
MNIST-sized AE (784-1000-500-250-30); the load comes from a grpc.aio client
in this process with N concurrent callers, each bounded in time and count.
The "echo" server is the same harness against a servicer that answers Encode
with a fixed response and does no work: the most Python gRPC can do here.

    python benchmarks/serve.py [--run benchmarks/results/mnist_runs/ae]

The server is configured for throughput on this machine: `--instances` runs
in flight per graph (default: one per core, one ONNX Runtime thread each);
batching on is `--max-batch 64 --max-delay-ms 1`, off is `--max-batch 1`.
The in-process reference is the fastest of one run on all cores (spinning
or not) and the server's own layout of parallel runs. Both ratio targets are
taken side by side: `--rounds` rounds of the server, then echo (64 x 1 row)
or in-process ORT (256 rows), seconds apart; the median round's ratio is the
figure (this machine's speed drifts over a minute by more than the margins
being measured).

Targets (issue 3): 64 clients x 1 row, batching on >= 70% of echo's requests/s;
256-row requests >= 70% of in-process ONNX Runtime rows/s; p99 at 8 clients <= 10 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
from common import ROOT, SHARED, machine, median_round, table, write_json

OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the echo server (a child process)


def run_echo(port: int) -> None:
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
        server = grpc.aio.server(options=OPTIONS)
        pb_grpc.add_ZSpaceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# ------------------------------------------------------------------ load


async def load(target: str, rows: np.ndarray, concurrency: int, seconds: float, max_requests: int) -> dict:
    import grpc

    from zspace.service.client import to_tensor
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    request = pb.EncodeRequest(model=pb.ModelRef(name="mnist-ae"), inputs=pb.Inputs(tensor=to_tensor(rows)))
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        for _ in range(20):  # warm the connection and the server's code paths
            await stub.Encode(request, timeout=30)
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def caller():
            nonlocal errors
            while time.perf_counter() < stop_at and len(latencies) < max_requests:
                t = time.perf_counter()
                try:
                    await stub.Encode(request, timeout=30)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "errors": errors, "req_s": len(lat) / elapsed, "rows_s": len(lat) * len(rows) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99))}


def in_process(bundle: Path, batch: int, seconds: float, instances: int, threads: int) -> dict:
    """ONNX Runtime at its best here: one run on all cores (spinning or not), or the server's layout
    of `instances` runs side by side with `threads` each; the fastest is the reference."""
    cores = os.cpu_count() or 1
    layouts = [(1, cores, True), (1, cores, False)] + ([(instances, threads, False)] if instances > 1 else [])
    runs = [in_process_once(bundle, batch, seconds / len(layouts), *layout) for layout in layouts]
    best = max(runs, key=lambda r: r["rows_s"])
    return {**best, "layouts": {r["layout"]: r["rows_s"] for r in runs}}


def in_process_once(bundle: Path, batch: int, seconds: float, parallel: int, threads: int, spin: bool) -> dict:
    from zspace.bundle import load_bundle
    from zspace.runtime import onnx_session

    session = onnx_session(load_bundle(bundle).graph("encoder"), "cpu", threads, spin=spin)
    x = np.random.default_rng(0).random((batch, 784), dtype=np.float32)
    for _ in range(10):
        session.run(None, {"x": x})
    counts = [0] * parallel
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:  # ONNX Runtime releases the GIL: these runs really overlap
        while time.perf_counter() < stop_at:
            session.run(None, {"x": x})
            counts[i] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(parallel)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed, n = time.perf_counter() - t0, sum(counts)
    return {"req_s": n / elapsed, "rows_s": n * batch / elapsed, "p50_ms": elapsed / n * parallel * 1000,
            "layout": f"{parallel} run(s) x {threads} thread(s){' spinning' if spin else ''}"}


class Child:
    """A server process, stopped with SIGTERM."""

    def __init__(self, args: list[str], port: int):
        self.port = port
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            time.sleep(0.2)
        raise TimeoutError(f"server on {port} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bundle_for(run: Path | None, workdir: Path) -> Path:
    """Export the MNIST AE run if given, else train one epoch of it (speed does not depend on weights)."""
    from zspace.training.export import export_run
    from zspace.training.train import TrainConfig, train

    if run is None:
        run = workdir / "run"
        train(TrainConfig(data=f"mnist:{SHARED / 'mnist'}", model="ae", latent_dim=30, hidden=(1000, 500, 250),
                          epochs=1, batch_size=256), run, quiet=True)
    return export_run(run, workdir / "models", "mnist-ae")


@click.command()
@click.option("--run", type=click.Path(exists=True, file_okay=False), default=None, help="MNIST AE run to export (default: train 1 epoch).")
@click.option("--seconds", default=4.0, help="Load duration per configuration.")
@click.option("--max-requests", default=200_000, help="Request cap per configuration.")
@click.option("--rounds", default=3, help="Side-by-side rounds of each ratio target: server, then echo or in-process ORT.")
@click.option("--instances", default=os.cpu_count() or 1, help="Server: ONNX Runtime runs in flight per graph.")
@click.option("--threads", default=0, help="Server: ONNX Runtime threads per run (0: cores / instances).")
@click.option("--json", "json_path", default="benchmarks/results/serve.json", help="Where the figures go.")
@click.option("--echo-port", type=int, default=None, hidden=True)
def main(run, seconds, max_requests, rounds, instances, threads, json_path, echo_port):
    if echo_port:
        return run_echo(echo_port)
    from zspace.memory import keep_freed_memory

    keep_freed_memory()  # the load generator and the in-process reference get the server's tuning too
    work = Path(tempfile.mkdtemp(prefix="zspace-serve-bench-"))
    bundle = bundle_for(Path(run) if run else None, work)
    models = bundle.parents[1]
    rng = np.random.default_rng(0)
    one, big = rng.random((1, 784), dtype=np.float32), rng.random((256, 784), dtype=np.float32)
    rows = []

    def measure(label: str, target: str, x: np.ndarray, clients: int) -> dict:
        r = asyncio.run(load(target, x, clients, seconds, max_requests))
        row = {"setup": label, "clients": clients, "rows_per_request": len(x), **r}
        print(f"{label:<22} clients={clients:<3} rows={len(x):<4} {r['req_s']:9.0f} req/s {r['rows_s']:10.0f} rows/s "
              f"p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:6.2f} ms errors {r['errors']}", flush=True)
        return row

    def side_by_side(name: str, first, second) -> dict:
        """`first()` then `second()`, `rounds` times over: each a row with a "value"; the median round's ratio is the figure.

        The machine is shared and its speed drifts by tens of percent over a minute; a
        ratio of two figures taken a minute apart measures the drift as much as the server.
        Each round's ratio compares figures taken seconds apart."""
        done = []
        for r in range(rounds):
            a, b = first(), second()
            done.append({"round": r + 1, "first": a, "second": b, "ratio": a["value"] / b["value"]})
            print(f"  {name}, round {r + 1}: ratio {done[-1]['ratio']:.3f}", flush=True)
        median = median_round(done, "ratio")
        return {"rounds": done, "median_round": median["round"], "ratio": median["ratio"], "row": median["first"]}

    def grpc_rows(target: str, x: np.ndarray, clients: int, label: str = "server, batching on"):
        def one_round() -> dict:
            row = measure(label, target, x, clients)
            return {**row, "value": row["rows_s"]}

        return one_round

    def in_process_rows() -> dict:
        ort = in_process(bundle, len(big), seconds, instances, threads)
        print(f"  in-process ORT {ort['rows_s']:.0f} rows/s ({ort['layout']})", flush=True)
        return {**ort, "value": ort["rows_s"]}

    threads = threads or max(1, (os.cpu_count() or 1) // instances)
    before = {batch: in_process(bundle, batch, seconds, instances, threads) for batch in (1, 8, 64, 256)}
    serve = [sys.executable, "-m", "zspace.app.cli", "serve", "--models", str(models), "--metrics-port", "0",
             "--instances", str(instances), "--threads", str(threads), "--poll-s", "0"]
    echo_port = free_port()
    echo = Child([sys.executable, str(Path(__file__).resolve()), "--echo-port", str(echo_port)], echo_port)
    echo_target = f"127.0.0.1:{echo_port}"
    try:
        for label, extra in (("server, batching on", ["--max-batch", "64", "--max-delay-ms", "1"]),
                             ("server, batching off", ["--max-batch", "1", "--max-delay-ms", "0"])):
            port = free_port()
            child = Child([*serve, "--port", str(port), *extra], port)
            try:
                for clients in (1, 8):
                    rows.append(measure(label, f"127.0.0.1:{port}", one, clients))
                if "off" in label:
                    rows.append(measure(label, f"127.0.0.1:{port}", one, 64))
                    continue
                # The two ratio targets, each taken side by side (the echo server waits idle meanwhile).
                rows64 = side_by_side("64 x 1 row, server / echo", grpc_rows(f"127.0.0.1:{port}", one, 64),
                                      grpc_rows(echo_target, one, 64, "echo (gRPC ceiling)"))
                rows256 = side_by_side("256 rows, server / in-process ORT", grpc_rows(f"127.0.0.1:{port}", big, 8),
                                       in_process_rows)
                rows.extend([rows64["row"], rows256["row"]])
            finally:
                child.stop()
        for clients in (1, 8):
            rows.append(measure("echo (gRPC ceiling)", echo_target, one, clients))
        rows.append(rows64["rounds"][rows64["median_round"] - 1]["second"])
    finally:
        echo.stop()

    # The reference is ORT at its best on this noisy machine: measured before and after the
    # server phases (with and without spinning each time), the fastest kept.
    for batch in (1, 8, 64, 256):
        after = in_process(bundle, batch, seconds, instances, threads)
        r = max(before[batch], after, key=lambda r: r["rows_s"])
        layouts = {name: max(before[batch]["layouts"][name], after["layouts"][name]) for name in after["layouts"]}
        rows.append({"setup": "in-process ORT", "clients": 1, "rows_per_request": batch, **r, "layouts": layouts})
        print(f"in-process ORT batch={batch:<4} {r['rows_s']:10.0f} rows/s ({r['layout']})", flush=True)

    def pick(setup, clients, n):
        return next(r for r in rows if r["setup"] == setup and r["clients"] == clients and r["rows_per_request"] == n)

    ratio_echo, ratio_ort = rows64["ratio"], rows256["ratio"]
    strict = pick("server, batching on", 8, 256)["rows_s"] / max(
        [pick("in-process ORT", 1, 256)["rows_s"]] + [d["second"]["rows_s"] for d in rows256["rounds"]])
    p99_8 = pick("server, batching on", 8, 1)["p99_ms"]
    cores = os.cpu_count() or 1
    single = max(v for k, v in pick("in-process ORT", 1, 256)["layouts"].items() if k.startswith(f"1 run(s) x {cores} "))
    one_run_ratio = pick("server, batching on", 8, 256)["rows_s"] / single
    targets = {
        "batching_on_64x1_vs_echo": {"value": ratio_echo, "target": ">= 0.70", "met": ratio_echo >= 0.70,
                                     "how": f"median of {rounds} side-by-side rounds"},
        "rows256_vs_in_process_ort": {"value": ratio_ort, "target": ">= 0.70", "met": ratio_ort >= 0.70,
                                      "how": f"median of {rounds} side-by-side rounds"},
        # For reading the figure: the median round against the fastest in-process figure taken at any time.
        "rows256_vs_fastest_in_process_any_time": {"value": strict, "target": "(information)", "met": None},
        # For reading the figure: the same server against the plain in-process loop (one run on all cores).
        "rows256_vs_one_in_process_run": {"value": one_run_ratio, "target": "(information)", "met": None},
        "p99_ms_8_clients": {"value": p99_8, "target": "<= 10", "met": p99_8 <= 10},
    }
    cols = ["setup", "clients", "rows_per_request", "req_s", "rows_s", "p50_ms", "p90_ms", "p99_ms", "errors"]
    print(table(rows, cols, "Encode on the MNIST AE (784-1000-500-250-30), loopback"))
    for title, got, key, sides in (
            ("64 x 1-row requests, server (batching on) and echo side by side", rows64, "req_s", ("server_req_s", "echo_req_s")),
            ("256-row requests, server and in-process ORT side by side", rows256, "rows_s", ("server_rows_s", "in_process_rows_s"))):
        got["table"] = [{"round": d["round"], sides[0]: d["first"][key], sides[1]: d["second"][key], "ratio": d["ratio"]}
                        for d in got["rounds"]]
        print(table(got["table"], ["round", *sides, "ratio"], title))
    for name, t in targets.items():
        verdict = "" if t["met"] is None else (": met" if t["met"] else ": NOT met")
        print(f"{name}: {t['value']:.3f} (target {t['target']}){verdict}")
    side = {name: {"rounds": got["table"], "median_round": got["median_round"], "ratio": got["ratio"]}
            for name, got in (("rows64x1_vs_echo", rows64), ("rows256_vs_in_process", rows256))}
    write_json(Path(json_path), {"benchmark": "serve", "rows": rows, "side_by_side": side, "targets": targets,
                                 "machine": machine(),
                                 "seconds_per_setup": seconds, "server": {"instances": instances, "threads": threads,
                                 "batching_on": "--max-batch 64 --max-delay-ms 1", "batching_off": "--max-batch 1"}})


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
