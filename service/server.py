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
import hmac
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zspace.bundle import repository_hint, version_dirs
from zspace.errors import UserError
from zspace.index.factory import set_threads as set_faiss_threads
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.memory import decoded_images_outside_the_heap, keep_freed_memory
from zspace.service.config import ServeConfig
from zspace.service.index_rpcs import IndexRpcs
from zspace.service.indexes import IndexRegistry
from zspace.service.kserve import KServeRpcs
from zspace.service.metrics import Metrics
from zspace.service.repository import ModelRepository
from zspace.service.rpc import Admission, add_service
from zspace.service.servicer import ModelRpcs, add_zspace_service
from zspace.v1 import zspace_pb2 as pb

if TYPE_CHECKING:
    from zspace.service.workers import WorkerLink

log = logging.getLogger("zspace.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ZSpace"].full_name
KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Probes need no token: gRPC health, and KServe's liveness and readiness (they say nothing about the models).
OPEN_METHODS = ("/grpc.health.v1.Health/", f"/{KSERVE.full_name}/ServerLive", f"/{KSERVE.full_name}/ServerReady")


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


def check_port_free(host: str, port: int, option: str) -> None:
    """UserError naming the option when HOST:PORT cannot be listened on (before gRPC logs its own C-level error)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a closing socket is no obstacle
            try:
                s.bind(address)
            except OSError as exc:
                raise UserError(f"{option}: cannot listen on {host}:{port} ({exc.strerror}); choose another {option}"
                                f"{', or 0 for any free port' if option == '--port' else ', or 0 to turn metrics off'}") from None


def read_token(token_file: str | None, token_env: str) -> str | None:
    """The bearer token from a file (first line) or an environment variable; None = auth off."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"--token-file: cannot read {token_file} ({exc.strerror})") from None
        if not token:
            raise UserError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get(token_env) or None


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


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every RPC but the probes (OPEN_METHODS) needs `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self.expected):
            return await continuation(details)
        return self.deny


class Server:
    """The running service; `start()` then `wait()`, or `run()` for both with signal handling."""

    def __init__(self, cfg: ServeConfig, link: WorkerLink | None = None):
        """link: this server is one worker of `zspace serve --workers N` (service.workers)."""
        self.cfg, self.link = cfg, link
        check_config(cfg)
        self.metrics = Metrics()
        # The cores are shared out among the workers, then among a model graph's instances.
        workers = link.count if link else 1
        cores = os.cpu_count() or 1
        onnx_threads = cfg.onnx_threads or max(1, cores // workers // cfg.batch.instances)
        set_faiss_threads(cfg.faiss_threads or (max(1, cores // workers) if link else 0))
        self.repo = ModelRepository(cfg.models, cfg.device, onnx_threads, cfg.batch, self.metrics.on_batch, cfg.cuda_tf32)
        # Workers share each index folder: every one follows the item store, worker 0 writes the snapshots.
        self.indexes = IndexRegistry(cfg.indexes, self.repo, cfg.search, snapshots=not link or link.index == 0,
                                     follow=link is not None)
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.port = cfg.port
        self.metrics_port = 0
        self._poller: asyncio.Task | None = None
        self.started = False

    async def start(self) -> None:
        """Load, bind, listen; on any failure let go of what was taken (ports, threads) before raising."""
        try:
            await self._start()
        except BaseException:
            if self.server is not None:
                await self.server.stop(None)  # else its finaliser runs on a closed loop and prints a traceback
            self.metrics.close()
            for rt in self.repo.loaded():
                rt.close()
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        if self.link is None:  # a worker's ports were checked (and its port reserved) by the supervisor
            check_port_free(cfg.host, cfg.port, "--port")  # before minutes of loading, not after
            check_port_free(cfg.metrics_host or cfg.host, cfg.metrics_port, "--metrics-port")
        await self.rescan()
        if not version_dirs(cfg.models):
            log.warning("--models %s: %s", cfg.models, repository_hint(Path(cfg.models)))
        await asyncio.to_thread(self.indexes.open_all)
        self.started = True
        limit = cfg.max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 1 if self.link else 0)]  # one port for a group's workers; else a busy port is an error
        interceptors = [BearerAuth(cfg.token)] if cfg.token else []
        self.server = grpc.aio.server(migration_thread_pool=None, options=options, interceptors=interceptors,
                                      maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        # An answer must fit the message limit; requests in progress share one byte budget (rpc.Admission).
        limits = dataclasses.replace(cfg.limits, max_answer_bytes=limit)
        admission = Admission(cfg.max_inflight_mb << 20)
        add_zspace_service(self.server, ModelRpcs(self.repo, limits, self.metrics, admission),
                           IndexRpcs(self.indexes, self.repo, limits, self.metrics, admission))
        # KServe v2 beside zspace.v1: the same models, batchers, limits and byte budget.
        add_service(self.server, KSERVE, kpb, KServeRpcs(self.repo, limits, self.serving, package_version(),
                                                         self.metrics, admission))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, KSERVE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{cfg.host}:{cfg.port}"
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
        if cfg.metrics_port:  # before the gRPC server starts: a failure here leaves nothing running
            # A worker's metrics go to its supervisor, which serves the group's on --metrics-port.
            host, port = ("127.0.0.1", 0) if self.link else (cfg.metrics_host or cfg.host, cfg.metrics_port)
            try:
                self.metrics_port = self.metrics.serve_http(host, port)
            except OSError as exc:
                raise UserError(f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror}); "
                                "choose another --metrics-port, or 0 to turn metrics off") from None
        await self.server.start()
        if cfg.poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        models = ", ".join(f"{rt.name}/{rt.version} ({rt.provider})" for rt in self.repo.loaded()) or "none"
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        metrics_host = "127.0.0.1" if self.link else cfg.metrics_host or cfg.host
        metrics = f"metrics on {metrics_host}:{self.metrics_port}" if self.metrics_port else "metrics off"
        log.info("serving on %s:%d%s (%s loop), %s; models: %s", cfg.host, self.port,
                 " (TLS)" if cfg.tls_cert else "", loop, metrics, models)
        if self.link:
            self.link.send(serving=bool(self.repo.loaded()), metrics_port=self.metrics_port)

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
        if self.link and self.started:
            self.link.send(serving=bool(self.repo.loaded()))
        await self.set_health()

    def serving(self) -> bool:
        """Models loaded, not draining, and in a group of workers every worker serving: health's SERVING,
        and KServe's ServerReady."""
        return bool(self.repo.loaded()) and not self.stopping.is_set() and (self.link is None or self.link.group_serving)

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
        if self.server:
            await self.server.stop(self.cfg.grace_s)
        for rt in self.repo.loaded():
            rt.close()
        await asyncio.to_thread(self.indexes.close)
        self.metrics.close()
        log.info("stopped")

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain. The signals are handled from the first moment:
        one that comes while models are still loading ends the start-up cleanly (exit 0)."""
        loop = asyncio.get_running_loop()
        if self.link:
            await self.link.connect()
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
        if self.link:  # a worker: the supervisor's word on the group; its going away means drain
            loop.create_task(self.link.listen(self.set_health, done.set))
        await signalled
        await self.stop()
        return 0


def serve(cfg: ServeConfig, link: WorkerLink | None = None) -> int:
    who = f"worker{link.index}[{os.getpid()}] " if link else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it narrates which CPU build it tried
    keep_freed_memory()
    decoded_images_outside_the_heap()
    runner = asyncio.Runner(loop_factory=event_loop_factory(cfg.loop))
    try:
        code = runner.run(Server(cfg, link).run())
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


class BackgroundServer:
    """A Server on its own event loop in a daemon thread: for quickstart, benchmarks and tests.

        with BackgroundServer(ServeConfig(models=Path("models"), port=0)) as s:
            ZSpaceClient(s.target) ...
    """

    def __init__(self, cfg: ServeConfig):
        import threading

        self.loop = event_loop_factory(cfg.loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="zspace-server")
        self.thread.start()
        try:
            self.server = self._run(self._start(cfg))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @staticmethod
    async def _start(cfg: ServeConfig) -> Server:
        server = Server(cfg)
        await server.start()
        return server

    def _run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def rescan(self) -> None:
        self._run(self.server.rescan())

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
