"""`zspace serve --workers N`: N server processes on one port, supervised by the parent.

Why processes: one Python process receives, decodes, batches and answers every
request on one core, however many cores and GPUs the machine has. Each worker is
a whole `Server` (its own event loop, gRPC server, ONNX Runtime sessions,
batchers and FAISS copies of the indexes), all listening on one port with
SO_REUSEPORT, so the kernel spreads connections over them (per connection, not
per request: a client with one channel talks to one worker).

The parent serves nothing itself. It
- reserves the port (a bound, non-listening SO_REUSEPORT socket: port 0 becomes
  a concrete port, and no stray process can take it between worker restarts);
- starts the workers, each with a control socket (JSON lines both ways): the
  worker says when it serves and where its metrics are; the parent says whether
  the whole group serves, and every worker's health answers that (SERVING only
  while every worker serves);
- restarts a worker that dies (backoff from 0.5 s to 30 s for one that keeps
  dying), but ends the group when a worker of the first start fails before it
  served (a bad option or file: a restart cannot mend it);
- forwards SIGHUP (rescan) and SIGTERM/SIGINT (drain: every worker finishes its
  in-flight work; exit 0 when all did);
- serves one /metrics for all: each worker's families with a `worker` label,
  plus the group's own (workers serving, restarts).

A worker whose parent vanishes (kill -9) sees its control socket close and drains.
Indexes: every worker follows the item store (index.latent_index: follow), and
worker 0 alone writes FAISS snapshots.
"""

from __future__ import annotations

if __name__ == "__main__":  # a worker process: SIGTERM before the server's handlers are in place exits quietly
    import os
    import signal
    import sys

    # os._exit: the worker serves nothing yet; an exception raised wherever the signal lands could become
    # another error (exit 1) on its way out.
    signal.signal(signal.SIGTERM, lambda *_: (sys.stdout.flush(), sys.stderr.flush(), os._exit(0)))

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zspace.errors import UserError
from zspace.service.config import ServeConfig
from zspace.service.ports import check_port_free, reserve_port
from zspace.service.server import Role, check_config, serve

log = logging.getLogger("zspace.serve")
MAX_AUTO_WORKERS = 16


def worker_count(value: str | int) -> int:
    """--workers: a positive count, or auto = one per core this process may use, at most MAX_AUTO_WORKERS.

    The cap: every worker holds its own copy of every model and index (and, on CUDA, its own
    context of a few hundred MB), and past 16 processes the kernel's connection spreading and
    the memory cost outgrow what one more Python process adds."""
    if str(value).strip().lower() == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--workers: expected a positive number or auto, got {value!r}") from None
    if n < 1:
        raise UserError(f"--workers: expected a positive number or auto, got {value!r}")
    return n


# ---------------------------------------------------------------------------------------------- worker side


class WorkerLink(Role):
    """A worker's role (server.Role), and its end of the control socket to the supervisor.

    Workers share the cores and the port; every one follows the index folders (others write
    them too) and worker 0 alone writes their snapshots; a worker's /metrics listens on a
    loopback port of its own, which the supervisor scrapes into the group's."""

    shares_port = True
    follows_indexes = True
    checks_ports = False  # the supervisor checked them, and reserved the port

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        size = struct.unpack(">I", self._recv_exactly(4))[0]
        hello = json.loads(self._recv_exactly(size))
        self.index, self.processes = int(hello["worker"]), int(hello["workers"])
        self.writes_snapshots = self.index == 0
        self.log_prefix = f"worker{self.index}[{os.getpid()}] "
        self.config: ServeConfig = pickle.loads(base64.b64decode(hello["config"]))
        self.group_serving = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """The socket as a stream on the running loop: first thing in the worker, so nothing it sends is lost."""
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)

    def _recv_exactly(self, n: int) -> bytes:
        # Exactly n bytes, never more: what follows is read by the event loop's stream.
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise SystemExit("zspace worker: the supervisor closed the control socket before its greeting")
            data += chunk
        return data

    def metrics_address(self, cfg: ServeConfig) -> tuple[str, int]:
        return "127.0.0.1", 0

    def watch(self, on_group: Callable[[], Awaitable[None]], on_gone: Callable[[], None]) -> Awaitable[None]:
        return self.listen(on_group, on_gone)

    async def listen(self, on_group: Callable[[], Awaitable[None]], on_parent_gone: Callable[[], None]) -> None:
        """Read the parent's messages until the socket closes (the parent is gone: drain)."""
        with contextlib.suppress(ConnectionError):
            while line := await self._reader.readline():
                message = json.loads(line)
                if "group_serving" in message:
                    self.group_serving = bool(message["group_serving"])
                    await on_group()
        on_parent_gone()

    def report(self, **message) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")


def worker_main() -> None:
    """`python -m zspace.service.workers FD`: one worker, configured through its control socket."""
    link = WorkerLink(int(sys.argv[1]))
    try:
        serve(link.config, link)
    except UserError as exc:  # as the command line reports one: a line, exit 2 (the supervisor ends the group)
        print(f"Error: worker {link.index}: {exc}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------- parent side


@dataclass
class WorkerState:
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    started: bool = False  # its gRPC server listens (serving or not: it may have no models yet)
    serving: bool = False
    metrics_port: int = 0


class Supervisor:
    def __init__(self, cfg: ServeConfig, workers: int):
        self.cfg, self.count = cfg, workers
        self.workers = [WorkerState() for _ in range(workers)]
        self.stopping = asyncio.Event()
        self.restarts = 0
        self.failure: int | None = None  # exit code of a first-start failure: the group ends with it
        self.any_started = False
        self.group_serving = False
        self._http = None

    async def run(self) -> int:
        cfg = self.cfg
        check_config(cfg)
        if cfg.uds:  # a Unix socket has no SO_REUSEPORT: the last worker to bind would take it from the others
            raise UserError("--uds: one process listens on a Unix socket; use it with --workers 1")
        check_port_free(cfg.host, cfg.port, "--port")
        check_port_free(cfg.metrics_host or cfg.host, cfg.metrics_port, "--metrics-port")
        if cfg.http_port:
            check_port_free(cfg.http_host or cfg.host, cfg.http_port, "--http-port")
        reservation = reserve_port(cfg.host, cfg.port)
        self.port = reservation.getsockname()[1]
        # HTTP is shared the same way: its port reserved (0 made concrete) and every worker's listener joining it.
        http_reservation = reserve_port(cfg.http_host or cfg.host, cfg.http_port, "--http-port") \
            if cfg.http_port is not None else None
        self.http_port = http_reservation.getsockname()[1] if http_reservation else None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            if cfg.metrics_port:
                self._http = serve_group_metrics(self, cfg.metrics_host or cfg.host, cfg.metrics_port)
            metrics = f"group metrics on {cfg.metrics_host or cfg.host}:{cfg.metrics_port}" if cfg.metrics_port else "metrics off"
            log.info("supervising %d workers on %s:%d (pid %d), %s", self.count, cfg.host, self.port, os.getpid(), metrics)
            keepers = [loop.create_task(self._keep(i)) for i in range(self.count)]
            await self.stopping.wait()
            log.info("draining %d workers (grace %.1fs)", self.count, cfg.grace_s)
            self._forward(signal.SIGTERM)
            codes = await self._wait_all(cfg.grace_s + 15)
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            reservation.close()
            if http_reservation is not None:
                http_reservation.close()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
        if self.failure is not None:
            return self.failure
        # A worker still importing when our SIGTERM came had no handler yet and ended by the signal itself: it
        # held no request and no unsaved write (it did not serve yet), so that too is a clean stop.
        clean = all(code in (0, -signal.SIGTERM) for code in codes)
        if not clean:
            log.error("a worker failed to drain (exit codes %s)", codes)
        log.info("stopped")
        return 0 if clean else 1

    async def _keep(self, i: int) -> None:
        """Run worker i, and again whenever it dies, until the group stops."""
        delay = 0.5
        while not self.stopping.is_set():
            started = time.monotonic()
            state = self.workers[i]
            state.started = state.serving = False
            await self._spawn(i)
            code = await state.proc.wait()
            state.serving = False
            state.writer.close()
            state.writer = None
            await self._update_group()
            if self.stopping.is_set():
                return
            if not self.any_started:
                log.error("worker %d failed to start (exit %s): stopping the group", i, code)
                self.failure = code if code and code > 0 else 1
                self.stopping.set()
                return
            self.restarts += 1
            delay = 0.5 if time.monotonic() - started > 30 else min(delay * 2, 30.0)
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs", i, state.proc.pid, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _spawn(self, i: int) -> None:
        parent_end, child_end = socket.socketpair()
        cfg = dataclasses.replace(self.cfg, port=self.port, http_port=self.http_port)
        hello = json.dumps({"worker": i, "workers": self.count,
                            "config": base64.b64encode(pickle.dumps(cfg)).decode()}).encode()
        parent_end.sendall(struct.pack(">I", len(hello)) + hello)
        state = self.workers[i]
        try:
            state.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zspace.service.workers", str(child_end.fileno()), pass_fds=(child_end.fileno(),))
        finally:
            child_end.close()
        reader, state.writer = await asyncio.open_connection(sock=parent_end)
        asyncio.get_running_loop().create_task(self._listen(i, reader, state.proc))

    async def _listen(self, i: int, reader: asyncio.StreamReader, proc) -> None:
        state = self.workers[i]
        with contextlib.suppress(ConnectionError):  # a worker that died: its exit is handled by _keep
            while line := await reader.readline():
                if state.proc is not proc:
                    return  # a message from a worker that has been replaced
                message = json.loads(line)
                state.metrics_port = int(message.get("metrics_port", state.metrics_port))
                state.serving = bool(message.get("serving", state.serving))
                state.started = self.any_started = True
                await self._update_group()

    async def _update_group(self) -> None:
        serving = all(w.serving for w in self.workers) and not self.stopping.is_set()
        if serving != self.group_serving:
            self.group_serving = serving
            log.info("group: %s", "SERVING (all workers serve)" if serving else "NOT_SERVING (a worker does not serve)")
        for w in self.workers:  # every time: a restarted worker learns the group's state
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(json.dumps({"group_serving": serving}).encode() + b"\n")

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _wait_all(self, timeout: float) -> list[int]:
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        except TimeoutError:
            log.error("workers still running %.0fs after SIGTERM: killing them", timeout)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        return [p.returncode for p in procs]


def serve_group_metrics(supervisor: Supervisor, host: str, port: int):
    """/metrics for the whole group, on the one metrics port: every worker's families, scraped when
    Prometheus scrapes, each sample labelled with its worker; plus the group's own figures."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    class GroupCollector:
        def collect(self):
            merged: dict[str, Metric] = {}
            for i, w in enumerate(list(supervisor.workers)):
                if not w.metrics_port or w.proc is None or w.proc.returncode is not None:
                    continue
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    continue  # restarting: its figures return with it
                for family in text_string_to_metric_families(text):
                    into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                    for s in family.samples:
                        into.add_sample(s.name, {**s.labels, "worker": str(i)}, s.value, s.timestamp, s.exemplar)
            yield from merged.values()
            serving = GaugeMetricFamily("zspace_workers_serving", "Worker processes that serve now")
            serving.add_metric([], sum(w.serving for w in supervisor.workers))
            yield serving
            configured = GaugeMetricFamily("zspace_workers", "Worker processes configured (--workers)")
            configured.add_metric([], supervisor.count)
            yield configured
            restarts = CounterMetricFamily("zspace_worker_restarts", "Workers restarted after they died")
            restarts.add_metric([], supervisor.restarts)
            yield restarts

    registry = CollectorRegistry()
    registry.register(GroupCollector())
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror}); "
                        "choose another --metrics-port, or 0 to turn metrics off") from None
    return server


def supervise(cfg: ServeConfig, workers: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(Supervisor(cfg, workers).run())


if __name__ == "__main__":
    worker_main()
