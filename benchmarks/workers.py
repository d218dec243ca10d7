"""Worker processes: `zspace serve --workers N` side by side with --workers 1, and with in-process ONNX Runtime.

    python -m benchmarks.workers                                  # this machine: --workers 2 vs 1, h2load 64 x 1 row
    python -m benchmarks.workers --device cuda --workers 8 --matrix   # a GPU machine: the load matrix of issue 12

Part one (always): two servers run at once on two ports, `--workers 1` and
`--workers N`, and h2load (C, ≈50 µs of CPU per call: benchmarks/h2load.py) sends
64 connections x 1-row Encode to each in turn, `--rounds` times; the median
round's ratio of requests/s is the figure. Every answer h2load counts is checked
against the servers' own count of Encodes answered OK (h2load sees HTTP 200 for a
failed RPC too).

Part two (--matrix): Encode loads 64x1, 8x1, 8x256 and 16x4096 (clients x rows)
from Python grpc.aio clients in several processes (one connection per caller, so
the kernel spreads them over the workers), each side by side with in-process ONNX
Runtime on the same device with the same layout (as many threads as clients, each
running the same batch on one session). On CUDA the targets of issue 12 are
checked (targets.py "workers_cuda"); on the CPU the figures are for information.
"""

from __future__ import annotations

import asyncio
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np

from benchmarks import h2load
from benchmarks.harness import (
    GRPC_OPTIONS,
    ServerChild,
    bundle_for,
    closed_loop,
    free_port,
    machine,
    median_round,
    requests_answered,
    run_in_threads,
    serve_command,
    side_by_side,
    table,
    write_json,
)
from benchmarks.targets import check

MATRIX = ((64, 1), (8, 1), (8, 256), (16, 4096))  # (clients, rows per request)
WIRES = ("float32", "uint8", "shm", "zspace-client", "triton-shm")


def start(models: Path, workers: int, device: str, extra: list[str]) -> tuple[ServerChild, int]:
    port, metrics_port = free_port(), free_port()
    child = ServerChild(serve_command(models, port, "--workers", str(workers), "--device", device, "--poll-s", "0",
                                      "--metrics-port", str(metrics_port), *extra), port)
    return child.wait_serving(300), metrics_port


def encode_request(rows: int, dim: int, wire: str = "float32"):
    """An Encode of `rows` random rows; wire uint8 sends them as 8-bit pixels (a quarter of the bytes; the
    server scales them by 1/255, as the manifest of an image model says)."""
    from zspace.service.client import to_tensor
    from zspace.v1 import zspace_pb2 as pb

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (rows, dim), dtype=np.uint8) if wire == "uint8" else rng.random((rows, dim), dtype=np.float32)
    return pb.EncodeRequest(model=pb.ModelRef(name="mnist-ae"), inputs=pb.Inputs(tensor=to_tensor(x)))


# ------------------------------------------------------------------ part one: --workers N vs 1, h2load


def h2load_side(name: str, server: tuple[ServerChild, int], clients: int, seconds: float, work: Path):
    child, metrics_port = server
    request = encode_request(1, 784)

    def run() -> dict:
        before = requests_answered(metrics_port, "Encode").get("OK", 0)
        r = h2load.same_request(child.target, "/zspace.v1.ZSpace/Encode", request, clients, seconds, work / name)
        ok = requests_answered(metrics_port, "Encode").get("OK", 0) - before
        print(f"  {name:<12} {r['req_s']:8.0f} req/s  p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:6.2f} ms  "
              f"answered OK {ok}/{r['requests']}", flush=True)
        # The server may count up to one more answer per connection: calls cut off when h2load's time ran out.
        if not 0 <= ok - r["requests"] <= clients or r["not_200"]:
            raise RuntimeError(f"{name}: h2load counted {r['requests']} answers ({r['not_200']} not HTTP 200), "
                               f"the server {ok} OK ones")
        return {"setup": name, **r, "value": r["req_s"]}

    return run


def workers_vs_one(models: Path, workers: int, device: str, clients: int, seconds: float, rounds: int,
                   extra: list[str]) -> dict:
    if not h2load.available():
        raise click.ClickException("h2load not found: apt-get install nghttp2-client")
    work = Path(tempfile.mkdtemp(prefix="zspace-workers-bench-"))
    one, many = start(models, 1, device, extra), start(models, workers, device, extra)
    try:
        for server in (one, many):  # warm both: first calls pay for lazy set-up
            h2load.same_request(server[0].target, "/zspace.v1.ZSpace/Encode", encode_request(1, 784), clients, 1.0, work / "warm")
        got = side_by_side(f"{clients} x 1 row, --workers {workers} / --workers 1",
                           h2load_side(f"--workers {workers}", many, clients, seconds, work),
                           h2load_side("--workers 1", one, clients, seconds, work), rounds)
    finally:
        one[0].stop()
        many[0].stop()
    return got


# ------------------------------------------------------------------ part two: the matrix


def client_process(target: str, rows: int, callers: int, seconds: float, max_requests: int, wire: str) -> dict:
    """One load process: `callers` closed-loop callers, each on its own connection."""
    if wire == "shm":
        return asyncio.run(shared_memory_load(target, rows, callers, seconds, max_requests))
    if wire == "triton-shm":
        return asyncio.run(triton_shared_memory_load(target, rows, callers, seconds, max_requests))
    if wire == "zspace-client":
        return zspace_client_load(target, rows, callers, seconds, max_requests)
    import grpc

    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    request = encode_request(rows, 784, wire)

    async def main() -> dict:
        channels = [grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(callers)]
        stubs = [pb_grpc.ZSpaceStub(c) for c in channels]
        for stub in stubs:
            await stub.Encode(request, timeout=60)
        r = await closed_loop(lambda i: stubs[i % callers].Encode(request, timeout=60), callers, seconds, max_requests,
                              errors=(grpc.aio.AioRpcError,), keep_latencies=True)
        for c in channels:
            await c.close()
        return r

    return asyncio.run(main())


LATENT = 30  # the MNIST AE's code: what each answer row takes (float32)


class Segment:
    """A POSIX shared memory segment of this load process, removed when closed."""

    def __init__(self, name: str, size: int):
        from zspace.service.client import new_segment

        self.name, self.size, self.path = name, size, Path("/dev/shm") / name
        self.mapping = new_segment(self.path, size)

    def close(self) -> None:
        self.mapping.close()
        self.path.unlink(missing_ok=True)


async def shared_memory_load(target: str, rows: int, callers: int, seconds: float, max_requests: int) -> dict:
    """zspace.v1 Encode with the tensor and the answer in a registered region (what ZSpaceClient sends to a local
    server). Each call writes its rows into the region and copies the codes out, as a real client must."""
    import os

    import grpc

    from zspace.service.client import aligned
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    x = np.random.default_rng(0).random((rows, 784), dtype=np.float32)
    start, answer = aligned(x.nbytes), rows * LATENT * 4
    channels = [grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(callers)]
    stubs = [pb_grpc.ZSpaceStub(c) for c in channels]
    segments = [Segment(f"zbench-{os.getpid()}-{i}", start + answer) for i in range(callers)]
    requests = []
    for stub, seg in zip(stubs, segments):
        await stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(region=pb.SharedMemoryRegion(
            name=seg.name, key="/" + seg.name, byte_size=seg.size)))
        requests.append(pb.EncodeRequest(
            model=pb.ModelRef(name="mnist-ae"),
            inputs=pb.Inputs(tensor=pb.Tensor(shape=[rows, 784], shared=pb.SharedRegion(region=seg.name, byte_size=x.nbytes))),
            output=pb.SharedRegion(region=seg.name, offset=start, byte_size=answer)))

    async def call(i: int) -> None:
        c = i % callers
        seg = segments[c]
        seg.mapping[: x.nbytes] = x.data
        await stubs[c].Encode(requests[c], timeout=60)
        np.frombuffer(seg.mapping[start : start + answer], np.float32)

    try:
        for c in range(callers):
            await call(c)
        return await closed_loop(call, callers, seconds, max_requests, errors=(grpc.aio.AioRpcError,), keep_latencies=True)
    finally:
        for stub, seg, ch in zip(stubs, segments, channels):
            await stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=seg.name))
            seg.close()
            await ch.close()


def zspace_client_load(target: str, rows: int, callers: int, seconds: float, max_requests: int) -> dict:
    """The Python client as a user has it: one ZSpaceClient per caller thread (each its own connection), shared
    memory on by itself for this loopback target, encode() returning a fresh array each call."""
    import threading
    import time

    from zspace.service.client import ZSpaceClient

    x = np.random.default_rng(0).random((rows, 784), dtype=np.float32)
    clients = [ZSpaceClient(target, timeout=60, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(callers)]
    for c in clients:
        c.encode("mnist-ae", x)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors = [0] * callers
    stop_at = time.perf_counter() + seconds
    per = max(1, max_requests // callers)

    def caller(i: int) -> None:
        while time.perf_counter() < stop_at and len(latencies[i]) < per:
            t = time.perf_counter()
            try:
                clients[i].encode("mnist-ae", x)
                latencies[i].append(time.perf_counter() - t)
            except Exception:  # counted, as closed_loop counts the RPC errors of the other wires
                errors[i] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    shared = all(c.shared_memory and c._all_buffers for c in clients)
    for c in clients:
        c.close()
    if not shared:
        raise RuntimeError("the zspace client did not use shared memory for this target")
    ms = np.concatenate([np.asarray(v) for v in latencies]) * 1000
    return {"requests": len(ms), "errors": sum(errors), "req_s": len(ms) / elapsed, "latencies_ms": ms.tolist()}


async def triton_shared_memory_load(target: str, rows: int, callers: int, seconds: float, max_requests: int) -> dict:
    """KServe ModelInfer through tritonclient's asyncio client and `tritonclient.utils.shared_memory` regions."""
    import os

    import tritonclient.grpc.aio as triton
    import tritonclient.utils.shared_memory as shm
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    x = np.random.default_rng(0).random((rows, 784), dtype=np.float32)
    answer = rows * LATENT * 4
    clients = [triton.InferenceServerClient(target) for _ in range(callers)]
    regions = []
    for i, client in enumerate(clients):
        name = f"tbench-{os.getpid()}-{i}"
        handles = (shm.create_shared_memory_region(name + "-in", "/" + name + "-in", x.nbytes),
                   shm.create_shared_memory_region(name + "-out", "/" + name + "-out", answer))
        await client.register_system_shared_memory(name + "-in", "/" + name + "-in", x.nbytes)
        await client.register_system_shared_memory(name + "-out", "/" + name + "-out", answer)
        given = InferInput("x", [rows, 784], "FP32")
        given.set_shared_memory(name + "-in", x.nbytes)
        wanted = InferRequestedOutput("mean")
        wanted.set_shared_memory(name + "-out", answer)
        regions.append((handles, given, wanted))

    async def call(i: int) -> None:
        (inp, out), given, wanted = regions[i % callers]
        shm.set_shared_memory_region(inp, [x])
        await clients[i % callers].infer("mnist-ae.encoder", [given], outputs=[wanted])
        shm.get_contents_as_numpy(out, np.float32, [rows, LATENT]).copy()

    try:
        for c in range(callers):
            await call(c)
        return await closed_loop(call, callers, seconds, max_requests, errors=(InferenceServerException,),
                                 keep_latencies=True)
    finally:
        for i, (client, ((inp, out), _, _)) in enumerate(zip(clients, regions)):
            for end in ("-in", "-out"):  # by name: no name would unregister the other load processes' regions too
                await client.unregister_system_shared_memory(f"tbench-{os.getpid()}-{i}{end}")
            shm.destroy_shared_memory_region(inp)
            shm.destroy_shared_memory_region(out)
            await client.close()


def served(target: str, clients: int, rows: int, seconds: float, max_requests: int, processes: int,
           wire: str = "float32") -> dict:
    per = [clients // processes + (i < clients % processes) for i in range(processes)]
    per = [n for n in per if n]
    with ProcessPoolExecutor(len(per), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(client_process, [target] * len(per), [rows] * len(per), per, [seconds] * len(per),
                              [max_requests // len(per)] * len(per), [wire] * len(per)))
    ms = np.concatenate([p["latencies_ms"] for p in parts])
    req_s = sum(p["req_s"] for p in parts)
    return {"req_s": req_s, "rows_s": req_s * rows, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": sum(p["errors"] for p in parts)}


def in_process(bundle: Path, device: str, clients: int, rows: int, seconds: float) -> dict:
    """The same layout in one process: `clients` threads, each running its batch again and again on one session."""
    from zspace.bundle import load_bundle
    from zspace.runtime import RuntimeOptions, open_runtime

    runtime = open_runtime(load_bundle(bundle), RuntimeOptions.from_env(device=device))
    x = np.random.default_rng(0).random((rows, 784), dtype=np.float32)
    for _ in range(5):
        runtime.encode(x)
    n, elapsed = run_in_threads(lambda: runtime.encode(x), clients, seconds)
    return {"req_s": n / elapsed, "rows_s": n * rows / elapsed, "provider": runtime.provider}


def matrix(models: Path, bundle: Path, workers: int, device: str, seconds: float, rounds: int, processes: int,
           max_requests: int, extra: list[str], layouts=MATRIX, wire: str = "float32") -> dict:
    # 16 clients x 4096 rows queue 64k rows at once: past the default --max-queue (4096 rows per lane), which
    # would answer most of them RESOURCE_EXHAUSTED, as it should for a server that is not sized for it.
    child, _ = start(models, workers, device, ["--max-queue", "65536", *extra])
    rows_out = []
    try:
        for clients, rows in layouts:
            def server_side(clients=clients, rows=rows) -> dict:
                r = served(child.target, clients, rows, seconds, max_requests, min(processes, clients), wire)
                print(f"  served     {clients:>3} x {rows:<5} {r['req_s']:9.0f} req/s {r['rows_s']:11.0f} rows/s "
                      f"p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:6.2f} ms errors {r['errors']}", flush=True)
                return {**r, "value": r["rows_s"]}

            def reference(clients=clients, rows=rows) -> dict:
                r = in_process(bundle, device, clients, rows, seconds)
                print(f"  in-process {clients:>3} x {rows:<5} {r['req_s']:9.0f} req/s {r['rows_s']:11.0f} rows/s "
                      f"({r['provider']})", flush=True)
                return {**r, "value": r["rows_s"]}

            got = side_by_side(f"{clients} x {rows}, served / in-process", server_side, reference, rounds)
            median = median_round(got["rounds"], "ratio")
            rows_out.append({"clients": clients, "rows": rows, "served_req_s": median["first"]["req_s"],
                             "served_rows_s": median["first"]["rows_s"], "p50_ms": median["first"]["p50_ms"],
                             "p99_ms": median["first"]["p99_ms"], "in_process_rows_s": median["second"]["rows_s"],
                             "share": got["ratio"], "errors": median["first"]["errors"]})
    finally:
        child.stop()
    return {"rows": rows_out, "wire": wire}


def precision_variant(bundle: Path, precision: str) -> Path:
    """The model's highest bundle of PRECISION beside BUNDLE (an fp32 one), made by `zspace quantize` if none."""
    from zspace.bundle import load_bundle, version_dirs
    from zspace.training.quantize import quantize_bundle

    made = [v for v in version_dirs(bundle.parents[1]) if v.parent.name == bundle.parent.name
            and load_bundle(v).precision == precision]
    return made[-1] if made else quantize_bundle(bundle, precision)


def parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    """"64x1,16x4096" -> ((64, 1), (16, 4096))."""
    try:
        return tuple((int(c), int(r)) for c, r in (part.split("x") for part in text.split(",")))
    except ValueError:
        raise click.BadParameter(f"expected CLIENTSxROWS[,CLIENTSxROWS...], got {text!r}") from None


@click.command()
@click.option("--run", type=click.Path(exists=True, file_okay=False), default=None, help="MNIST AE run to export (default: train 1 epoch).")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Or an exported mnist-ae bundle folder (models/mnist-ae/N) to serve as it is.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Server and in-process reference device.")
@click.option("--workers", default=2, help="Worker processes of the server measured against --workers 1.")
@click.option("--clients", default=64, help="Part one: h2load connections, 1-row Encode each.")
@click.option("--seconds", default=4.0, help="Load duration per side of a round.")
@click.option("--rounds", default=3, help="Side-by-side rounds; the median round's ratio is the figure.")
@click.option("--matrix", "with_matrix", is_flag=True, help="Also the 64x1, 8x1, 8x256, 16x4096 matrix against in-process ORT.")
@click.option("--client-processes", default=4, help="Part two: load processes (Python clients).")
@click.option("--layouts", default=",".join(f"{c}x{r}" for c, r in MATRIX), show_default=True,
              help="Part two: the loads, CLIENTSxROWS, comma-separated.")
@click.option("--wire", type=click.Choice(WIRES), default="float32",
              help="Part two: how clients send pixels (uint8: a quarter of the bytes, scaled by the server; shm: "
                   "zspace.v1 shared tensors in registered shared memory; zspace-client: the Python ZSpaceClient, "
                   "which uses shared memory by itself here; triton-shm: tritonclient's ModelInfer with system "
                   "shared memory).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32",
              help="The bundle's precision, served (--precision) and in process (an int8/fp16 variant is made with "
                   "`zspace quantize` when the models folder has none).")
@click.option("--skip-part-one", is_flag=True, help="Only the matrix (part one needs h2load).")
@click.option("--max-requests", default=2_000_000, help="Part two: request cap per side of a round.")
@click.option("--server-option", "extra", multiple=True, help="Passed to both servers, e.g. --server-option=--max-batch=128.")
@click.option("--json", "json_path", default="benchmarks/results/workers.json", help="Where the figures go.")
def main(run, bundle_path, device, workers, clients, seconds, rounds, with_matrix, client_processes, layouts, wire,
         precision, skip_part_one, max_requests, extra, json_path):
    measure(run, bundle_path, device, workers, clients, seconds, rounds, with_matrix, client_processes, max_requests,
            list(extra), json_path, parse_layouts(layouts), wire, skip_part_one, precision)


def measure(run: str | None, bundle_path: str | None, device: str, workers: int, clients: int, seconds: float,
            rounds: int, with_matrix: bool, client_processes: int, max_requests: int, extra: list[str],
            json_path: str, layouts=MATRIX, wire: str = "float32", skip_part_one: bool = False,
            precision: str = "fp32") -> dict:
    """Both parts; also what `python -m benchmarks.serve --device D --workers N` runs."""
    from zspace.memory import keep_freed_memory

    keep_freed_memory()
    bundle = Path(bundle_path) if bundle_path else bundle_for(Path(run) if run else None,
                                                              Path(tempfile.mkdtemp(prefix="zspace-workers-bench-")))
    if precision != "fp32":
        bundle = precision_variant(bundle, precision)
        extra = [*extra, "--precision", precision]
    print(f"bundle: {bundle}", flush=True)
    models = bundle.parents[1]
    record = {"benchmark": "workers", "device": device, "workers": workers, "machine": machine(),
              "seconds_per_side": seconds, "server_options": extra, "precision": precision, "wire": wire}
    targets = {}
    if not skip_part_one:
        print(f"part one: h2load {clients} x 1-row Encode, --workers {workers} vs --workers 1 ({device})", flush=True)
        ratio = workers_vs_one(models, workers, device, clients, seconds, rounds, extra)
        rounds_table = [{"round": d["round"], f"workers{workers}_req_s": d["first"]["req_s"],
                         "workers1_req_s": d["second"]["req_s"], "ratio": d["ratio"],
                         f"workers{workers}_p99_ms": d["first"]["p99_ms"], "workers1_p99_ms": d["second"]["p99_ms"]}
                        for d in ratio["rounds"]]
        print(table(rounds_table, list(rounds_table[0]),
                    f"{clients} x 1 row (h2load): --workers {workers} vs 1, side by side"))
        record["workers_vs_one"] = {"clients": clients, "rounds": rounds_table, "median_round": ratio["median_round"],
                                    "ratio": ratio["ratio"]}
        targets["workers_n_vs_1_64x1_h2load"] = ratio["ratio"]
    if with_matrix:
        print(f"part two: the load matrix, --workers {workers} ({device}, {wire} on the wire, {precision}) vs in-process "
              "ORT", flush=True)
        record["matrix"] = matrix(models, bundle, workers, device, seconds, rounds, client_processes, max_requests, extra,
                                  layouts, wire)
        cols = ["clients", "rows", "served_req_s", "served_rows_s", "p50_ms", "p99_ms", "in_process_rows_s", "share", "errors"]
        print(table(record["matrix"]["rows"], cols, f"Encode, --workers {workers} on {device}, vs in-process ORT side by side"))
        by = {(r["clients"], r["rows"]): r for r in record["matrix"]["rows"]}
        if device == "cuda":
            figures = {"rows8x256_vs_in_process": ((8, 256), "share"), "rows16x4096_vs_in_process": ((16, 4096), "share"),
                       "req_s_64x1": ((64, 1), "served_req_s"), "p99_ms_8x1": ((8, 1), "p99_ms")}
            targets.update({name: by[layout][key] for name, (layout, key) in figures.items() if layout in by})
    record["targets"] = check("workers", targets)
    write_json(Path(json_path), record)
    return record


if __name__ == "__main__":
    main()
