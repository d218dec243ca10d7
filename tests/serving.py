"""Run a real zspace server on a loopback port for tests: in a thread, or as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from zspace.service.config import ServeConfig
from zspace.service.server import BackgroundServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread(BackgroundServer):
    """The real server in a background thread, plus a metrics scrape for assertions."""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


def start_thread(models: Path, **overrides) -> ServerThread:
    cfg = ServeConfig(models=models, port=0, metrics_port=free_port(), onnx_threads=1, poll_s=0, grace_s=5, **overrides)
    return ServerThread(cfg)


class ServerProcess:
    """`zspace serve` as a child process, for signals (SIGTERM drain)."""

    def __init__(self, args: list[str], port: int, env: dict | None = None):
        self.port = port
        exe = [sys.executable, "-m", "zspace.app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
        self.proc = subprocess.Popen(exe, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60) -> None:
        from zspace.service.client import ZSpaceClient

        deadline = time.monotonic() + timeout
        with ZSpaceClient(self.target, timeout=2, retries=1) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
                try:
                    if c.health() == "SERVING":
                        return
                except Exception:
                    time.sleep(0.2)
        raise TimeoutError("server did not become SERVING")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
