"""Retrieval at a million items and more: filtered search, open time, memory, import; FAISS and Milvus side by side.

    python -m benchmarks.scale --items 1000000                       # Flat and HNSW32; + the service, + Milvus
    python -m benchmarks.scale --items 10000000 --factory IVF4096,PQ15 --no-service --milvus none

Codes come from a trained MNIST AE's latent distribution: the 60k training digits are encoded
and each item is a random training code plus Gaussian jitter (15% of each dimension's spread),
so neighbourhoods have the structure of real codes; queries are the codes of test digits.
Payloads: label (the source digit's, 10 values), cat (1,000 values), year (an int range),
note (10 values, never indexed: the slow path, shown for comparison).

Each factory's index is made by `zspace index import` (index.importing.import_codes) with
label, cat and year declared as payload indexes. Then, per factory: import time and rate,
disk, open time and RSS in a fresh process (and in two at once: what workers share), single
query p50/p99 and recall@10 against exact search, unfiltered and at selectivities of 50%
(a range), 10%, 1% (an IN), 0.1% and 0.01% (an AND); the same workload through `zspace serve`
(Search RPC, 8 clients); and through the Milvus backend on a real Milvus standalone server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
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
    table,
    write_json,
)

# (name, filter as --where conditions, selectivity it is built for)
FILTERS = [
    ("none", [], 1.0),
    ("50% range", ["year >= 1988"], 0.5),
    ("10% eq", ["label == 3"], 0.1),
    ("1% in", [f"cat in ({', '.join(str(c) for c in range(10))})"], 0.01),
    ("0.1% eq", ["cat == 7"], 0.001),
    ("0.01% and", ["cat == 7", "label == 3"], 0.0001),
]
SCANNED = ("10% not indexed", ["note == n3"], 0.1)
FIELDS = ("label:int", "cat:int", "year:int")


def draw(bundle: Path, n: int, queries: int, seed: int = 0) -> dict:
    """Codes, labels and payload columns for n items, and query codes, as the module docstring says."""
    from zspace.bundle import load_bundle
    from zspace.data import load_dataset
    from zspace.runtime import open_runtime

    runtime = open_runtime(load_bundle(bundle))
    ds = load_dataset(f"mnist:{SHARED / 'mnist'}", transform=runtime.transform)
    real = runtime.codes(ds.x_train)
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(real), n)
    codes = np.empty((n, real.shape[1]), np.float32)
    spread = real.std(0) * 0.15
    for start in range(0, n, 1_000_000):  # a chunk at a time: 10M codes in float64 would be 2.4 GB more
        stop = min(n, start + 1_000_000)
        codes[start:stop] = real[source[start:stop]] + rng.standard_normal((stop - start, real.shape[1])) * spread
    return {"codes": codes, "queries": runtime.codes(ds.x_test[:queries]),
            "label": ds.y_train[source].astype(np.int64), "cat": rng.integers(0, 1000, n),
            "year": rng.integers(1950, 2025, n), "note": rng.integers(0, 10, n)}


def write_inputs(data: dict, folder: Path) -> tuple[Path, Path, Path]:
    """codes.npy, keys.txt and payloads.jsonl, as a user brings them to `zspace index import`."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "codes.npy", data["codes"])
    n = len(data["codes"])
    with open(folder / "keys.txt", "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(f"item/{i}\n" for i in range(start, min(n, start + 100_000))))
    label, cat, year, note = (data[c].tolist() for c in ("label", "cat", "year", "note"))
    with open(folder / "payloads.jsonl", "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(f'{{"label": {label[i]}, "cat": {cat[i]}, "year": {year[i]}, "note": "n{note[i]}"}}\n'
                            for i in range(start, min(n, start + 100_000))))
    return folder / "codes.npy", folder / "keys.txt", folder / "payloads.jsonl"


def mask_of(data: dict, where: list[str]) -> np.ndarray:
    """Which items a filter matches, computed from the payload columns in this process (the ground truth)."""
    from zspace.index.filters import as_filter

    mask = np.ones(len(data["codes"]), bool)
    ops = {"==": np.equal, "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}
    for c in as_filter(where):
        column = data[c.field]
        if c.field == "note":
            mask &= column == int(str(c.value)[1:])
        elif c.op == "in":
            mask &= np.isin(column, np.asarray(c.value))
        else:
            mask &= ops[c.op](column, c.value)
    return mask


def exact_top10(codes: np.ndarray, queries: np.ndarray, mask: np.ndarray) -> list[set[int]]:
    """Exact filtered nearest neighbours by brute force (squared L2), as item numbers."""
    ids = np.flatnonzero(mask)
    best_d = np.full((len(queries), 10), np.inf, np.float32)
    best_i = np.zeros((len(queries), 10), np.int64)
    qq = (queries ** 2).sum(1)[:, None]
    for start in range(0, len(ids), 500_000):
        chunk = ids[start:start + 500_000]
        x = codes[chunk]
        d = (x ** 2).sum(1)[None, :] - 2 * queries @ x.T + qq
        both_d = np.concatenate([best_d, d], 1)
        both_i = np.concatenate([best_i, np.broadcast_to(chunk, d.shape)], 1)
        top = np.argpartition(both_d, 9, axis=1)[:, :10]
        best_d, best_i = np.take_along_axis(both_d, top, 1), np.take_along_axis(both_i, top, 1)
    return [set(i for i, d in zip(irow.tolist(), drow.tolist()) if np.isfinite(d)) for irow, drow in zip(best_i, best_d)]


def timed_searches(index, queries: np.ndarray, where: list[str], truth: list[set[int]], max_s: float) -> dict:
    """Single-query searches, one after another: p50/p99 latency and recall@10; and the first search of the
    filter (cold_ms), which evaluates it (a served filter is then reused until the next write)."""
    cold_ms = None
    if hasattr(index, "_matches"):
        index._matches.clear()
        t = time.perf_counter()
        index.search(queries[0][None], 10, where or None)
        cold_ms = (time.perf_counter() - t) * 1000
    for q in queries[:5]:
        index.search(q[None], 10, where or None)
    latencies, recalls = [], []
    t_end = time.perf_counter() + max_s
    for q, want in zip(queries, truth):
        t = time.perf_counter()
        hits = index.search(q[None], 10, where or None)[0]
        latencies.append(time.perf_counter() - t)
        got = {int(h.key.rsplit("/", 1)[1]) for h in hits}
        recalls.append(len(got & want) / max(1, min(10, len(want))))
        if time.perf_counter() > t_end:
            break
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "recall@10": float(np.mean(recalls)), "queries": len(ms), "cold_ms": cold_ms}


OPEN_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from zspace.index.backends import open_index
index = open_index(sys.argv[1], snapshots=False, follow=True)
opened = time.perf_counter() - t0
import numpy as np
index.search(np.zeros((1, index.dim), np.float32), 10, ["label == 3"])
def kb(name, key):
    for line in open(name):
        if line.startswith(key):
            return int(line.split()[1])
print(json.dumps({"open_s": opened, "rss_mb": kb("/proc/self/status", "VmRSS:") / 1024,
                  "pss_mb": kb("/proc/self/smaps_rollup", "Pss:") / 1024,
                  "index_mb": index.memory_bytes() / 2**20}), flush=True)
sys.stdin.read()
"""


def open_in_processes(folder: Path, processes: int) -> list[dict]:
    """Open the index in `processes` fresh processes at once (a server's workers): each one's open time and memory,
    measured while all of them hold it (PSS shares pages held by several among them)."""
    children = [subprocess.Popen([sys.executable, "-c", OPEN_SCRIPT, str(folder)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        return [json.loads(c.stdout.readline()) for c in children]
    finally:
        for c in children:
            c.stdin.close()
            c.wait(60)


async def service_rows(target: str, index: str, queries: np.ndarray, seconds: float) -> list[dict]:
    import grpc

    from zspace.service.client import filter_message, to_tensor
    from zspace.v1 import zspace_pb2 as pb
    from zspace.v1 import zspace_pb2_grpc as pb_grpc

    rows = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        for name, where, _ in FILTERS:
            requests = []
            for i in range(min(256, len(queries))):
                r = pb.SearchRequest(index=index, vectors=to_tensor(queries[i:i + 1]), k=10)
                if where:
                    r.filter.CopyFrom(filter_message(where))
                requests.append(r)
            for r in requests[:10]:
                await stub.Search(r, timeout=60)
            result = await closed_loop(lambda i, rs=requests: stub.Search(rs[i % len(rs)], timeout=60), 8, seconds,
                                       errors=(grpc.aio.AioRpcError,))
            rows.append({"filter": name, "req_s": result["req_s"], "p50_ms": result["p50_ms"],
                         "p99_ms": result["p99_ms"], "errors": result["errors"]})
            print(f"  service {name}: {result['req_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms", flush=True)
    return rows


IMPORT_SCRIPT = """
import json, sys, time
from pathlib import Path
from zspace.index.contract import IndexSpec
from zspace.index.importing import import_codes
if __name__ == "__main__":
    bundle, codes, keys, payloads, out, factory, *fields = sys.argv[1:]
    t0 = time.perf_counter()
    import_codes(Path(bundle), Path(codes), Path(keys), Path(payloads), Path(out),
                 IndexSpec(factory=factory, fields=tuple(fields))).close()
    print(json.dumps({"import_s": time.perf_counter() - t0}), flush=True)
"""


def import_in_a_process(bundle: Path, inputs: tuple, folder: Path, factory: str) -> float:
    """`import_codes` timed in a fresh process, as `zspace index import` runs it (interpreter start excluded):
    this one holds the drawn data and ONNX Runtime's threads, which an importing user's process does not."""
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT, str(bundle), *map(str, inputs), str(folder), factory,
                           *FIELDS], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["import_s"]


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def measure_factory(factory: str, bundle: Path, inputs: tuple, data: dict, truths: dict, work: Path,
                    seconds: float, service: bool, reuse: bool = False) -> dict:
    from zspace.index.backends import open_index

    name = f"scale-{factory.replace(',', '-').lower()}"
    folder = work / "indexes" / name
    n = len(data["codes"])
    if reuse and (folder / "index.json").exists():
        print(f"{factory}: reusing {folder}", flush=True)
        row = {"factory": factory, "items": n, "import_s": None, "import_items_s": None, "disk_mb": folder_mb(folder)}
    else:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{factory}: importing {n:,} items", flush=True)
        import_s = import_in_a_process(bundle, inputs, folder, factory)
        row = {"factory": factory, "items": n, "import_s": import_s, "import_items_s": n / import_s,
               "disk_mb": folder_mb(folder)}
        print(f"  import {import_s:.1f} s ({n / import_s:,.0f} items/s), {row['disk_mb']:.0f} MB on disk", flush=True)
    one, two = open_in_processes(folder, 1)[0], open_in_processes(folder, 2)
    row.update(open_s=one["open_s"], rss_mb=one["rss_mb"], index_mb=one["index_mb"],
               rss_2_workers_mb=sum(r["rss_mb"] for r in two), pss_2_workers_mb=sum(r["pss_mb"] for r in two))
    print(f"  open {one['open_s']:.2f} s, RSS {one['rss_mb']:.0f} MB (index {one['index_mb']:.0f} MB); two processes: "
          f"RSS {row['rss_2_workers_mb']:.0f} MB, PSS {row['pss_2_workers_mb']:.0f} MB", flush=True)
    index = open_index(folder, snapshots=False)
    searches = []
    for fname, where, _ in [*FILTERS, SCANNED]:
        plan = index.explain(where)
        r = timed_searches(index, data["queries"], where, truths[fname], seconds if fname != SCANNED[0] else 10)
        searches.append({"factory": factory, "filter": fname, "matches": plan["matches"], "strategy": plan["strategy"],
                         "ef_search": plan.get("ef_search"), "nprobe": plan.get("nprobe"), **r})
        print(f"  {fname}: {plan['matches']:,} match, {plan['strategy']}, first {r['cold_ms']:.2f} ms, "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, recall@10 {r['recall@10']:.3f}", flush=True)
    index.release()
    row["searches"] = searches
    if service:
        models = work / "models"
        port = free_port()
        child = ServerChild(serve_command(models, port, "--indexes", str(folder.parent), "--metrics-port", "0",
                                          "--poll-s", "0"), port).wait_serving(600)
        try:
            row["service"] = asyncio.run(service_rows(child.target, name, data["queries"], seconds))
        finally:
            child.stop()
    return row


def measure_milvus(factory: str, bundle: Path, inputs: tuple, data: dict, truths: dict, work: Path,
                   seconds: float) -> dict:
    """The same items through the Milvus backend on a real Milvus standalone server (PyPI `milvus`)."""
    from testbed.servers import MilvusServer
    from zspace.index.contract import IndexSpec
    from zspace.index.importing import import_codes

    server = MilvusServer(work / "milvus-data")
    try:
        n = len(data["codes"])
        print(f"milvus {factory}: importing {n:,} items into {server.uri}", flush=True)
        t0 = time.perf_counter()
        index = import_codes(bundle, *inputs, work / "milvus-index", IndexSpec(backend="milvus", factory=factory,
                                                                               uri=server.uri, collection="scale",
                                                                               fields=FIELDS))
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:  # Milvus builds its vector index in the background: measure the built index, not the build
            info = index.client.describe_index(index.collection, "vector")
            if info.get("indexed_rows", 0) >= info.get("total_rows", n) or time.perf_counter() - t0 > 1800:
                break
            time.sleep(5)
        index_s = time.perf_counter() - t0
        # Segments loaded before their index was built are searched by brute force until loaded again.
        index.client.release_collection(index.collection)
        index.client.load_collection(index.collection)
        row = {"factory": f"milvus {factory}", "items": n, "import_s": import_s, "import_items_s": n / import_s,
               "index_build_s": index_s}
        print(f"  import {import_s:.1f} s, vector index built {index_s:.0f} s later", flush=True)
        searches = []
        for level in ("Strong", "Bounded"):  # zspace's collections are Strong; Bounded shows Milvus's own speed
            index.consistency = level
            for fname, where, _ in [*FILTERS, SCANNED]:
                r = timed_searches(index, data["queries"], where, truths[fname], seconds)
                searches.append({"factory": f"{row['factory']} {level}", "filter": fname,
                                 "matches": int(truths[f"{fname} count"]), "strategy": "milvus", **r})
                print(f"  {level} {fname}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"recall@10 {r['recall@10']:.3f}", flush=True)
        row["searches"] = searches
        index.client.drop_collection(index.collection)
        index.close()
        return row
    finally:
        server.stop()


def run(items: int, factories: list[str], queries: int, seconds: float, service: bool, milvus: str | None,
        bundle: str | None, work: Path, json_path: Path, reuse: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models" / "mnist-ae"
    path = Path(bundle) if bundle else models / "1" if reuse and (models / "1").exists() else bundle_for(None, work)
    if not (models / "1").exists():
        shutil.copytree(path, models / "1")
    path = models / "1"
    print(f"drawing {items:,} codes from the AE's latent distribution", flush=True)
    data = draw(path, items, queries)  # the same seed: the same items as an earlier run in this folder
    inputs = (work / "inputs" / "codes.npy", work / "inputs" / "keys.txt", work / "inputs" / "payloads.jsonl")
    if not (reuse and all(p.exists() for p in inputs)):
        inputs = write_inputs(data, work / "inputs")
    truths = {}
    for fname, where, _ in [*FILTERS, SCANNED]:
        mask = mask_of(data, where)
        truths[fname], truths[f"{fname} count"] = exact_top10(data["codes"], data["queries"], mask), int(mask.sum())
    rows = [measure_factory(f, path, inputs, data, truths, work, seconds, service, reuse) for f in factories]
    if milvus:
        rows.append(measure_milvus(milvus, path, inputs, data, truths, work, seconds))
    searches = [s for r in rows for s in r["searches"]]
    print(table(rows, ["factory", "items", "import_s", "import_items_s", "disk_mb", "open_s", "rss_mb", "index_mb",
                       "rss_2_workers_mb", "pss_2_workers_mb"], f"{items:,} items: import, disk, open, memory"))
    print(table(searches, ["factory", "filter", "matches", "strategy", "ef_search", "nprobe", "cold_ms", "p50_ms",
                           "p99_ms", "recall@10"], "single-query search, k=10 (cold: the filter's first search)"))
    raw_mb = items * data["codes"].shape[1] * 4 / 2**20
    record = {"benchmark": "scale", "items": items, "raw_vector_mb": raw_mb, "rows": rows, "machine": machine()}
    write_json(json_path, record)
    return record


@click.command()
@click.option("--items", type=click.IntRange(min=1000), default=1_000_000, help="Items in the index.")
@click.option("--factory", "factories", multiple=True, default=("Flat", "HNSW32"),
              help="A FAISS factory to measure (repeatable).")
@click.option("--queries", type=click.IntRange(min=10), default=300, help="Test digits used as queries.")
@click.option("--seconds", default=5.0, help="Time limit per measured filter, and per service load.")
@click.option("--service/--no-service", default=True, help="Also load `zspace serve` (Search RPC, 8 clients).")
@click.option("--milvus", default="HNSW32", help="Milvus factory to compare on a Milvus standalone server; "
                                                 "'none' to skip.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="An exported MNIST bundle (models/NAME/N); default: train a 1-epoch AE.")
@click.option("--work", type=click.Path(file_okay=False), default=None, help="Working folder (default: a temp one, removed).")
@click.option("--reuse", is_flag=True, help="With --work: keep the inputs and indexes an earlier run made there.")
@click.option("--json", "json_path", default=None, help="Where the figures go (default results/scale_<items>.json).")
def main(items, factories, queries, seconds, service, milvus, bundle, work, reuse, json_path):
    keep = work is not None
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="zspace-scale-"))
    try:
        run(items, list(factories), queries, seconds, service,
            None if milvus == "none" else milvus, bundle, work,
            Path(json_path) if json_path else RESULTS / f"scale_{items}.json", reuse)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
