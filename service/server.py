"""`zspace serve`: one grpc.aio process serving every bundle under --models.

Start: load bundles (broken ones reported and skipped), warm them up, then
health = SERVING. While running: rescan the repository every --poll-s seconds
and on SIGHUP. SIGTERM/SIGINT: health = NOT_SERVING, stop accepting, let
in-flight requests finish within --grace-s, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zspace.bundle import repository_hint, version_dirs
from zspace.errors import UserError
from zspace.index.factory import set_threads as set_faiss_threads
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.memory import decoded_images_outside_the_heap, keep_freed_memory
from zspace.service.auth import KSERVE, BearerAuth
from zspace.service.config import ServeConfig
from zspace.service.index_rpcs import IndexRpcs
from zspace.service.indexes import IndexRegistry
from zspace.service.kserve import KServeRpcs
from zspace.service.metrics import Metrics
from zspace.service.ports import check_port_free
from zspace.service.repository import ModelRepository
from zspace.service.rpc import Admission, add_service
from zspace.service.servicer import ModelRpcs, SharedMemoryRpcs, add_zspace_service
from zspace.service.shared_memory import REGIONS, SHARING
from zspace.v1 import zspace_pb2 as pb

log = logging.getLogger("zspace.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ZSpace"].full_name


def event_loop_factory(choice: str):
    """The event loop the server runs on: uvloop's when asked for or (auto) installed, else asyncio's.

    The loop's own bookkeeping is a fair share of a small RPC, and uvloop's is
    cheaper (benchmarks/README.md has the side-by-side figures)."""
    if choice not in ("auto", "uvloop", "asyncio"):
        raise UserError(f"--loop: expected auto, uvloop or asyncio, got {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise UserError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zspace")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def check_config(cfg: ServeConfig) -> None:
    """What can be checked before anything loads: a mistake named now, not after minutes of loading
    (and, with --workers, in the supervisor, not once per worker)."""
    if not Path(cfg.models).is_dir():
        raise UserError(f"--models: {cfg.models} is not a folder")
    if cfg.shared_memory not in SHARING:
        raise UserError(f"--shared-memory: expected one of {', '.join(SHARING)}, got {cfg.shared_memory!r}")
    for root in cfg.media_roots:
        if not Path(root).is_dir():
            raise UserError(f"--media-root: {root} is not a folder")
    if cfg.uds and not Path(cfg.uds).parent.is_dir():
        raise UserError(f"--uds: {Path(cfg.uds).parent} is not a folder")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    for option, path, marker in (("--tls-cert", cfg.tls_cert, b"-----BEGIN CERTIFICATE-----"),
                                 ("--tls-key", cfg.tls_key, b"PRIVATE KEY-----")):
        if path is None:
            continue
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"{option}: cannot read {path} ({exc.strerror})") from None
        if marker not in text:
            raise UserError(f"{option}: {path} is not PEM (no {marker.decode().strip('-')} block)")


def make_http_server(cfg: ServeConfig, role, models, index_rpcs, kserve, indexes, repo, max_body: int):
    """The HTTP listener: KServe v2 REST, zspace's JSON endpoints and the explorer, over the gRPC handlers."""
    from zspace.service.explorer import ExplorerRoutes
    from zspace.service.http import HttpServer, build_app, ssl_context
    from zspace.service.http_api import ApiRoutes
    from zspace.service.http_kserve import KServeHttpRoutes
    from zspace.service.openapi import OpenApiRoutes

    parts = [KServeHttpRoutes(kserve), ApiRoutes(models, index_rpcs),
             ExplorerRoutes(indexes, repo, cfg.media_roots, writes=role.writes_snapshots), OpenApiRoutes(package_version())]
    app = build_app(parts, cfg.token, max_body, cfg.max_concurrent_rpcs)
    return HttpServer(app, cfg.http_host or cfg.host, cfg.http_port, role.shares_port,
                      ssl_context(cfg.tls_cert, cfg.tls_key), cfg.grace_s)


class Role:
    """What this server process is within its deployment; this one: a server on its own.

    `zspace serve --workers N` runs each worker with a role of its own (service/workers.py:
    WorkerLink), which shares the cores and the port, reports to its supervisor and hears
    the group's health; this module knows nothing more of workers than this surface."""

    processes = 1             # server processes sharing this machine's cores
    shares_port = False       # SO_REUSEPORT: several processes listen on one port
    writes_snapshots = True   # of the indexes: one process of a group writes them
    follows_indexes = False   # others write the same index folders: replay their writes before reading
    checks_ports = True       # check the ports before loading (a worker's supervisor has done so already)
    log_prefix = ""
    group_serving = True      # the rest of the deployment serves (health is SERVING only then)

    def metrics_address(self, cfg: ServeConfig) -> tuple[str, int]:
        """Where this process serves /metrics (port 0: any free one)."""
        return cfg.metrics_host or cfg.host, cfg.metrics_port


    async def connect(self) -> None:
        """First thing on the event loop."""

    def report(self, **state) -> None:
        """This process's state (serving, metrics_port) for whoever supervises it."""

    def watch(self, on_group: Callable[[], Awaitable[None]], on_gone: Callable[[], None]) -> Awaitable[None] | None:
        """A task that calls on_group when the group's health changes and on_gone when the supervisor goes."""
        return None


class Server:
    """The running service; `start()` then `wait()`, or `run()` for both with signal handling."""

    def __init__(self, cfg: ServeConfig, role: Role | None = None):
        self.cfg, self.role = cfg, role or Role()
        check_config(cfg)
        self.metrics = Metrics()
        # The cores are shared out among the processes, then among a model graph's instances.
        processes = self.role.processes
        cores = os.cpu_count() or 1
        threads = cfg.runtime.threads or max(1, cores // processes // cfg.batch.instances)
        set_faiss_threads(cfg.faiss_threads or (max(1, cores // processes) if processes > 1 else 0))
        self.repo = ModelRepository(cfg.models, dataclasses.replace(cfg.runtime, threads=threads), cfg.batch,
                                    self.metrics.on_batch, precision=cfg.precision)
        self.indexes = IndexRegistry(cfg.indexes, self.repo, cfg.search, snapshots=self.role.writes_snapshots,
                                     follow=self.role.follows_indexes)
        self.metrics.index_bytes = self.indexes.memory_bytes
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.port = cfg.port
        self.metrics_port = 0
        self.uds: Path | None = None  # the Unix socket this server listens on (--uds), removed when it stops
        self.http = None              # the HTTP listener (--http-port), service/http.py
        self.http_port = 0
        self._poller: asyncio.Task | None = None
        self.started = False

    async def start(self) -> None:
        """Load, bind, listen; on any failure let go of what was taken (ports, threads) before raising."""
        try:
            await self._start()
        except BaseException:
            if self.server is not None:
                await self.server.stop(None)  # else its finaliser runs on a closed loop and prints a traceback
            if self.http is not None:
                await self.http.stop()
            self.metrics.close()
            for rt in self.repo.loaded():
                rt.close()
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        if self.role.checks_ports:
            check_port_free(cfg.host, cfg.port, "--port")  # before minutes of loading, not after
            check_port_free(*self.role.metrics_address(cfg), "--metrics-port")
            if cfg.http_port:
                check_port_free(cfg.http_host or cfg.host, cfg.http_port, "--http-port")
        await self.rescan()
        if not version_dirs(cfg.models):
            log.warning("--models %s: %s", cfg.models, repository_hint(Path(cfg.models)))
        await asyncio.to_thread(self.indexes.open_all)
        self.started = True
        limit = cfg.max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 1 if self.role.shares_port else 0)]  # else a busy port is an error
        interceptors = [BearerAuth(cfg.token)] if cfg.token else []
        self.server = grpc.aio.server(migration_thread_pool=None, options=options, interceptors=interceptors,
                                      maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        # An answer must fit the message limit; requests in progress share one byte budget (rpc.Admission).
        limits = dataclasses.replace(cfg.limits, max_answer_bytes=limit)
        admission = Admission(cfg.max_inflight_mb << 20)
        models = ModelRpcs(self.repo, limits, self.metrics, admission)
        index_rpcs = IndexRpcs(self.indexes, self.repo, limits, self.metrics, admission)
        add_zspace_service(self.server, models, index_rpcs,
                           SharedMemoryRpcs(REGIONS, self.metrics, admission, cfg.shared_memory))
        # KServe v2 beside zspace.v1: the same models, batchers, limits and byte budget.
        kserve = KServeRpcs(self.repo, limits, self.serving, package_version(), self.metrics, admission, REGIONS,
                            cfg.shared_memory)
        add_service(self.server, KSERVE, kpb, kserve)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, KSERVE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{cfg.host}:{cfg.port}"
        creds = None
        try:
            if cfg.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address"
            self.port = 0
        if self.port == 0 and cfg.tls_cert:  # the port was free a moment ago (check_port_free): the TLS files failed
            raise UserError(f"--tls-cert/--tls-key: gRPC could not use {cfg.tls_cert} and {cfg.tls_key} (see its "
                            "log line above: a PEM certificate chain and the matching private key are expected)")
        if self.port == 0:
            raise UserError(f"--port: cannot listen on {address} (in use by another process, or not an address of "
                            "this machine); choose another --port, or 0 for any free one")
        if cfg.uds:
            self._listen_uds(Path(cfg.uds), creds)
        host, port = self.role.metrics_address(cfg)
        if cfg.metrics_port:  # before the gRPC server starts: a failure here leaves nothing running
            try:
                self.metrics_port = self.metrics.serve_http(host, port)
            except OSError as exc:
                raise UserError(f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror}); "
                                "choose another --metrics-port, or 0 to turn metrics off") from None
        if cfg.http_port is not None:  # the same handlers over HTTP (service/http.py)
            self.http = make_http_server(cfg, self.role, models, index_rpcs, kserve, self.indexes, self.repo, limit)
            try:
                self.http_port = await self.http.start()
            except OSError as exc:
                raise UserError(f"--http-port: cannot listen on {cfg.http_host or cfg.host}:{cfg.http_port} "
                                f"({exc.strerror}); choose another --http-port") from None
        await self.server.start()
        if cfg.poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        models = ", ".join(f"{rt.name}/{rt.version} ({rt.provider})" for rt in self.repo.loaded()) or "none"
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        metrics = f"metrics on {host}:{self.metrics_port}" if self.metrics_port else "metrics off"
        http = f", HTTP on {cfg.http_host or cfg.host}:{self.http_port} (explorer at /ui/)" if self.http else ""
        log.info("serving on %s:%d%s%s (%s loop), %s; models: %s", cfg.host, self.port,
                 " (TLS)" if cfg.tls_cert else "", http, loop, metrics, models)
        self.role.report(serving=bool(self.repo.loaded()), metrics_port=self.metrics_port)

    def _listen_uds(self, path: Path, creds) -> None:
        """Also listen on the Unix domain socket PATH: local clients skip TCP, and the zspace client uses shared
        memory there by default. A socket file left by a server that is gone is replaced; a live one is not."""
        import socket
        import stat

        if len(os.fsencode(path)) > 107:  # sockaddr_un's sun_path
            raise UserError(f"--uds: {path} is longer than a socket path may be (107 bytes); use a shorter path")
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise UserError(f"--uds: {path} exists and is not a socket; choose another path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise UserError(f"--uds: {path} is in use by another server")
            except OSError:
                path.unlink()  # nobody listens: a socket left by a server that died
            finally:
                probe.close()
        address = f"unix:{path}"
        bound = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        if not bound:
            raise UserError(f"--uds: cannot listen on {path}")
        self.uds = path

    async def rescan(self) -> None:
        changes, retired = await asyncio.to_thread(self.repo.scan)
        for runtime in retired:
            runtime.close()  # finishes its queued requests, then its workers end
        for change in changes:
            log.info("repository: %s", change)
        if self.started:  # at start the indexes open after the models (see start)
            self.indexes.retire_removed()
            await asyncio.to_thread(self.indexes.open_all, bool(changes))
        self.metrics.set_models(len(self.repo.loaded()), len(self.repo.broken))
        if self.started:
            self.role.report(serving=bool(self.repo.loaded()))
        await self.set_health()

    def serving(self) -> bool:
        """Models loaded, not draining, and in a group of workers every worker serving: health's SERVING,
        and KServe's ServerReady."""
        return bool(self.repo.loaded()) and not self.stopping.is_set() and self.role.group_serving

    async def set_health(self) -> None:
        """SERVING while models are loaded and, in a group of workers, while every worker serves."""
        if self.stopping.is_set():
            return
        serving = self.serving()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _poll(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.cfg.poll_s)
            except TimeoutError:
                try:
                    await self.rescan()
                except Exception:
                    log.exception("repository rescan failed; keeping the loaded models")

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, finish in-flight ones within the grace period."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("draining (grace %.1fs)", self.cfg.grace_s)
        await self.health.enter_graceful_shutdown()
        if self._poller:
            self._poller.cancel()
        stopping = [self.server.stop(self.cfg.grace_s)] if self.server else []
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        for rt in self.repo.loaded():
            rt.close()
        await asyncio.to_thread(self.indexes.close)
        self.metrics.close()
        if self.uds is not None:
            self.uds.unlink(missing_ok=True)
        log.info("stopped")

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain. The signals are handled from the first moment:
        one that comes while models are still loading ends the start-up cleanly (exit 0)."""
        loop = asyncio.get_running_loop()
        await self.role.connect()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.rescan()) if self.started else None)
        starting, signalled = loop.create_task(self.start()), loop.create_task(done.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("stopped during start-up")
            return 0
        starting.result()  # a failed start raises here (a busy port, say)
        watching = self.role.watch(self.set_health, done.set)  # a worker: the group's health; its end means drain
        if watching is not None:
            loop.create_task(watching)
        await signalled
        await self.stop()
        return 0


def serve(cfg: ServeConfig, role: Role | None = None) -> int:
    role = role or Role()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {role.log_prefix}%(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it narrates which CPU build it tried
    keep_freed_memory()
    decoded_images_outside_the_heap()
    runner = asyncio.Runner(loop_factory=event_loop_factory(cfg.loop))
    try:
        code = runner.run(Server(cfg, role).run())
    except BaseException:
        runner.close()
        raise
    # The drain is done: requests answered or past the grace period, indexes snapshotted and closed. What may
    # still run is a thread that cannot be interrupted (a long ONNX Runtime call, a model load cut short);
    # Python would wait for it at exit, past the grace period an orchestrator allows. So leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
