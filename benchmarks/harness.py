"""What the benchmark scripts (and the tests that run servers as processes) share.

Small functions over plain values: a free loopback port, `zspace serve` as a
child process, a closed-loop load of concurrent callers bounded in time and
count, side-by-side rounds with the median round as the figure, tables and JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(models: Path, port: int, *options: str) -> list[str]:
    """`zspace serve` on a loopback port, run by this Python (the checkout's environment)."""
    return [sys.executable, "-m", "zspace.app.cli", "serve", "--models", str(models), "--host", "127.0.0.1",
            "--port", str(port), *options]


class ServerChild:
    """A server as a child process: started, waited for, stopped with SIGTERM (as an orchestrator would)."""

    def __init__(self, args: list[str], port: int, env: dict | None = None, capture: bool = False, cwd: Path = ROOT):
        self.port = port
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if capture else subprocess.PIPE,
                                     text=True, cwd=cwd, env={**os.environ, **(env or {})})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 60) -> ServerChild:
        """Until the port accepts connections (any gRPC server, the echo one too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            self._check_alive()
            time.sleep(0.2)
        raise TimeoutError(f"server on {self.port} did not start within {timeout:.0f}s")

    def wait_serving(self, timeout: float = 60) -> ServerChild:
        """Until gRPC health says SERVING (models loaded), not just until the port is open."""
        from zspace.service.client import ZSpaceClient

        deadline = time.monotonic() + timeout
        with ZSpaceClient(self.target, timeout=2, retries=1) as c:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if c.health() == "SERVING":
                        return self
                except Exception:  # not up yet: connection refused, UNAVAILABLE
                    time.sleep(0.2)
        raise TimeoutError(f"server on {self.port} did not become SERVING within {timeout:.0f}s")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            stream = self.proc.stdout if self.proc.stdout else self.proc.stderr
            raise RuntimeError(f"server exited early (rc {self.proc.returncode}):\n{stream.read() if stream else ''}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out or err or ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not drained by `timeout`."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def requests_answered(metrics_port: int, method: str) -> dict[str, int]:
    """The server's own count of `method` calls so far, by status code (summed over models and workers):
    what a load generator that sees only HTTP statuses (h2load) cannot tell."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("zspace_requests_total{") and f'method="{method}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            counts[code] = counts.get(code, 0) + int(float(line.split()[-1]))
    return counts


def start_milvus_lite(data_dir: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`milvus-lite server` on a free loopback port, waited for; (the process, its URI). The Milvus protocol,
    as a deployment's standalone is reached, for tests and benchmarks where no Milvus image can run."""
    from zspace.index.errors import IndexError_
    from zspace.index.milvus_index import MilvusIndex

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir", str(data_dir),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        try:
            MilvusIndex.connect(uri, data_dir).close()
            return proc, uri
        except IndexError_:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"milvus-lite server did not start:\n{proc.communicate()[1][-2000:]}") from None
            time.sleep(0.5)


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
