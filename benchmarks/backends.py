"""The two index backends on the same 60k MNIST AE codes: FAISS (embedded) and Milvus (through pymilvus).

    python -m benchmarks.backends [--bundle models/mnist-ae/1]      # or: python -m benchmarks.retrieval --backends

Both indexes are HNSW (M=32) over the 30-d codes of the 60k training digits,
built through `zspace.index.build.build_index` as `zspace index build` does;
Milvus runs as `milvus-lite server` on loopback (the Milvus protocol, as a
deployment's standalone would be reached). Per backend: build time, recall@10
of 1000 test queries against exact search, single-query searches a second in
this process, and Search p50/p99 through `zspace serve` at 8 concurrent Python
clients. The codes' quality does not matter here (a 1-epoch AE is trained when
no bundle is given); their number and dimension do.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import (
    RESULTS,
    SHARED,
    ServerChild,
    bundle_for,
    closed_loop,
    free_port,
    machine,
    serve_command,
    start_milvus_lite,
    table,
    write_json,
)


def recall_and_rate(index, queries: np.ndarray, exact: list[set], seconds: float) -> dict:
    found = [{h.key for h in row} for row in index.search(queries, 10)]
    recall = float(np.mean([len(f & e) / 10 for f, e in zip(found, exact)]))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < 20_000:
        index.search(queries[n % len(queries)][None], 10)
        n += 1
    return {"recall@10": recall, "qps_1": n / (time.perf_counter() - t0)}


async def service_load(target: str, index: str, codes: np.ndarray, clients: int, seconds: float) -> dict:
    import grpc

    from zspace.service.client import to_tensor
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    requests = [pb.SearchRequest(index=index, vectors=to_tensor(codes[i : i + 1]), k=10) for i in range(256)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        for r in requests[:20]:
            await stub.Search(r, timeout=30)
        return await closed_loop(lambda i: stub.Search(requests[i % len(requests)], timeout=30), clients, seconds,
                                 errors=(grpc.aio.AioRpcError,))


def compare(bundle: Path, seconds: float, work: Path) -> list[dict]:
    from zspace.bundle import load_bundle
    from zspace.data import load_dataset
    from zspace.index.build import build_index
    from zspace.index.contract import IndexSpec
    from zspace.runtime import open_runtime

    runtime = open_runtime(load_bundle(bundle))
    ds = load_dataset(f"mnist:{SHARED / 'mnist'}", transform=runtime.transform)
    train_codes = runtime.codes(ds.x_train)
    queries = runtime.codes(ds.x_test[:1000])
    import faiss

    flat = faiss.IndexFlatL2(train_codes.shape[1])
    flat.add(train_codes)
    _, ids = flat.search(queries, 10)
    exact = [{f"mnist/train/{i}" for i in row} for row in ids]
    models = bundle.parents[1]
    milvus, uri = start_milvus_lite(work / "milvus-data")
    rows = []
    try:
        # Each backend is built, timed in process and timed through its own server before the next is built:
        # milvus-lite keeps working for seconds after an insert (its own index build and compaction), and on
        # two cores that work landed in the FAISS service figures when both were timed after both builds (p99
        # 30-38 ms instead of 6; benchmarks/README.md, "Index backends").
        for backend, extra in (("faiss", {}), ("milvus", {"uri": uri, "collection": "mnist_milvus"})):
            print(f"{backend}: building HNSW32 over {len(train_codes)} codes", flush=True)
            folder = work / f"indexes-{backend}"
            t0 = time.perf_counter()
            index = build_index(bundle, f"mnist:{SHARED / 'mnist'}", folder / f"mnist-{backend}",
                                IndexSpec(backend=backend, factory="HNSW32", **extra), quiet=True)
            build_s = time.perf_counter() - t0
            row = {"backend": backend, "build_s": build_s, **recall_and_rate(index, queries, exact, seconds)}
            index.close()
            print(f"  build {build_s:.1f}s, recall@10 {row['recall@10']:.3f}, {row['qps_1']:.0f} single queries/s", flush=True)
            port = free_port()
            child = ServerChild(serve_command(models, port, "--indexes", str(folder), "--metrics-port", "0",
                                              "--poll-s", "0"), port).wait_serving(300)
            try:
                r = asyncio.run(service_load(child.target, f"mnist-{backend}", queries, 8, seconds))
            finally:
                child.stop()
            row.update({"service_req_s": r["req_s"], "service_p50_ms": r["p50_ms"], "service_p99_ms": r["p99_ms"],
                        "service_errors": r["errors"]})
            print(f"  {backend} through the service: {r['req_s']:.0f} req/s, p50 {r['p50_ms']:.2f} "
                  f"p99 {r['p99_ms']:.2f} ms", flush=True)
            rows.append(row)
    finally:
        milvus.terminate()
        milvus.wait(30)
    return rows


def run(bundle: str | None, seconds: float, json_path: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zspace-backends-"))
    path = Path(bundle) if bundle else bundle_for(None, work)
    rows = compare(path, seconds, work)
    print(table(rows, ["backend", "build_s", "recall@10", "qps_1", "service_req_s", "service_p50_ms", "service_p99_ms"],
                "HNSW32 on 60k MNIST AE-30 codes: FAISS (embedded) vs Milvus (milvus-lite server, loopback)"))
    record = {"benchmark": "backends", "rows": rows, "machine": machine(), "seconds_per_measurement": seconds}
    write_json(Path(json_path), record)
    return record


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="An exported MNIST bundle (models/NAME/N); default: train a 1-epoch AE.")
@click.option("--seconds", default=4.0, help="Timing window per measurement.")
@click.option("--json", "json_path", default=str(RESULTS / "backends.json"), help="Where the figures go.")
def main(bundle, seconds, json_path):
    run(bundle, seconds, json_path)


if __name__ == "__main__":
    main()
