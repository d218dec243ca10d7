"""What the benchmark scripts share: a closed-loop load of concurrent callers bounded in time and count,
side-by-side rounds with the median round as the figure, tables and JSON.

Servers as child processes, free ports and milvus-lite come from `testbed.servers`, which the tests
own as much as the benchmarks; they are imported here so that every benchmark finds them in one place."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from testbed.servers import ROOT, ServerChild, free_port, requests_answered, serve_command, start_milvus_lite

__all__ = ["ROOT", "ServerChild", "free_port", "requests_answered", "serve_command", "start_milvus_lite"]  # shared

SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def run_in_threads(call: Callable[[], object], threads: int, seconds: float) -> tuple[int, float]:
    """`call()` again and again on `threads` threads for `seconds`: (calls made, seconds taken).
    For in-process references: ONNX Runtime releases the GIL, so the runs really overlap."""
    import threading

    counts, stop_at = [0] * threads, time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            call()
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts), time.perf_counter() - t0


async def closed_loop(call: Callable[[int], Awaitable[object]], clients: int, seconds: float,
                      max_requests: int = 200_000, errors: tuple[type[BaseException], ...] = (),
                      keep_latencies: bool = False) -> dict:
    """`clients` concurrent callers, each calling `call(i)` again as soon as it returns, for `seconds`
    or `max_requests` calls in all; `i` counts each caller's calls from its own offset (i % clients == caller).
    Exceptions in `errors` are counted, anything else propagates."""
    latencies: list[float] = []
    failed = 0
    stop_at = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal failed
        i = offset
        while time.perf_counter() < stop_at and len(latencies) + failed < max_requests:
            t = time.perf_counter()
            try:
                await call(i)
                latencies.append(time.perf_counter() - t)
            except errors:
                failed += 1
            i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    ms = np.asarray(latencies or [float("nan")]) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": failed, "req_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), **({"latencies_ms": ms.tolist()} if keep_latencies else {})}


def median_round(rounds: list[dict], key: str) -> dict:
    """The round whose `key` is the median (the upper one of an even count): a real round, not a blend of two."""
    return sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]


def side_by_side(name: str, first: Callable[[], dict], second: Callable[[], dict], rounds: int) -> dict:
    """`first()` then `second()`, `rounds` times over, each giving a dict with a "value"; the median round's
    ratio first/second is the figure.

    The machines are shared and their speed drifts by tens of percent within a
    minute: a ratio of two figures taken a minute apart measures the drift as much
    as the code. Each round's ratio compares figures taken seconds apart."""
    done = []
    for r in range(rounds):
        a, b = first(), second()
        done.append({"round": r + 1, "first": a, "second": b, "ratio": a["value"] / b["value"]})
        print(f"  {name}, round {r + 1}: ratio {done[-1]['ratio']:.3f}", flush=True)
    median = median_round(done, "ratio")
    return {"rounds": done, "median_round": median["round"], "ratio": median["ratio"], "row": median["first"]}


def machine() -> dict:
    facts = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
             "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        facts.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:  # a serving-only environment
        pass
    return facts


def table(rows: list[dict], columns: list[str], title: str) -> str:
    """Rows of dicts as an aligned text table; floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([title, line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(path: Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def bundle_for(run: Path | None, workdir: Path) -> Path:
    """Export the MNIST AE run if given, else train one epoch of it (speed does not depend on weights)."""
    from zspace.training.export import export_run
    from zspace.training.train import TrainConfig, train

    if run is None:
        run = workdir / "run"
        train(TrainConfig(data=f"mnist:{SHARED / 'mnist'}", model="ae", latent_dim=30, hidden=(1000, 500, 250), arch="mlp",
                          epochs=1, batch_size=256), run, quiet=True)
    return export_run(run, workdir / "models", "mnist-ae")
