"""Run a real zspace server on a loopback port for tests, in a thread (as a process: benchmarks.harness.ServerChild)."""

from __future__ import annotations

import shutil
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from testbed.servers import free_port
from zspace.service.background import BackgroundServer
from zspace.service.config import SERVE_RUNTIME, ServeConfig


class ServerThread(BackgroundServer):
    """The real server in a background thread, plus a metrics scrape for assertions."""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


def start_thread(models: Path, **overrides) -> ServerThread:
    settings = {"port": 0, "metrics_port": free_port(), "runtime": replace(SERVE_RUNTIME, threads=1), "poll_s": 0,
                "grace_s": 5, **overrides}
    cfg = ServeConfig(models=models, **settings)
    return ServerThread(cfg)


@contextmanager
def digits_served(vae_bundle: Path, root: Path, **overrides):
    """The digits VAE served with an index of its test split (root/models, root/indexes): what most service
    tests talk to. Yields the running ServerThread."""
    from zspace.index.build import build_index

    shutil.copytree(vae_bundle, root / "models" / "digits" / "1")
    build_index(root / "models" / "digits", "digits", root / "indexes" / "digits", split="test", quiet=True).close()
    with start_thread(root / "models", indexes=root / "indexes", **overrides) as s:
        yield s
