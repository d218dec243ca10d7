"""Real servers for tests and benchmarks: a free loopback port, `zspace serve` as a child process (started,
waited for, stopped with SIGTERM as an orchestrator would), the server's own request counts, milvus-lite."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


class MilvusServer:
    """A real Milvus standalone server (PyPI `milvus`: Milvus 2.3.5 with its own etcd and local storage) in
    `data_dir`, its ports moved to free ones so it clashes with nothing (its health port 9091 is fixed)."""

    def __init__(self, data_dir: Path, timeout: float = 180):
        binary = Path(sys.executable).parent / "milvus-server"
        if not binary.exists():
            raise FileNotFoundError("milvus-server is not installed (pip install milvus==2.3.5, Linux x86-64)")
        if not port_free(9091):
            raise OSError("port 9091, which a Milvus standalone server always takes, is busy")
        self.data_dir = Path(data_dir)
        ports = {flag: free_port() for flag in ("--proxy-port", "--etcd-port", "--root-coord-port",
                                                 "--proxy-internal-port", "--query-coord-port", "--query-node-port",
                                                 "--index-coord-port", "--index-node-port", "--data-coord-port",
                                                 "--data-node-port")}
        args = [str(binary), "--data", str(self.data_dir)] + [x for flag, port in ports.items() for x in (flag, str(port))]
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "w")
        # Its own session: the wrapper starts `DIR/bin/milvus run standalone`, which outlives the wrapper
        # unless stopped by its own PID (stop() finds it among the session's processes).
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.uri = f"http://127.0.0.1:{ports['--proxy-port']}"
        deadline = time.monotonic() + timeout
        from zspace.index.errors import IndexError_
        from zspace.index.milvus_index import MilvusIndex

        while True:
            try:
                client = MilvusIndex.connect(self.uri, self.data_dir)
                client.list_collections()
                client.close()
                return
            except Exception as exc:  # not up yet: pymilvus raises its own types while the proxy starts
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    tail = (self.data_dir.parent / f"{self.data_dir.name}.log").read_text()[-2000:]
                    raise RuntimeError(f"milvus-server did not start ({exc}):\n{tail}") from None
                if not isinstance(exc, IndexError_):
                    time.sleep(0.5)
                time.sleep(0.5)

    def pids(self) -> list[int]:
        """The wrapper and every process of its session (the standalone server it started)."""
        found = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.proc.pid:
                try:
                    if os.getsid(int(entry.name)) == self.proc.pid:
                        found.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return found

    def stop(self, timeout: float = 30) -> None:
        pids = self.pids()
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids[1:]):
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
