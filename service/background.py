"""A server on its own event loop in a daemon thread: for quickstart, benchmarks and tests, which need a real
server in their own process without a command line."""

from __future__ import annotations

import asyncio
import threading

from zspace.service.config import ServeConfig
from zspace.service.server import Server, event_loop_factory


class BackgroundServer:
    """A Server on its own event loop in a daemon thread: for quickstart, benchmarks and tests.

        with BackgroundServer(ServeConfig(models=Path("models"), port=0)) as s:
            ZSpaceClient(s.target) ...
    """

    def __init__(self, cfg: ServeConfig):
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
