"""gRPC load from h2load (nghttp2's HTTP/2 load generator, written in C): clients that cost little.

Why not our Python client: a grpc.aio client spends ≈250 µs of CPU per call.
On a two-core machine that also runs the server, that is a third of all the
CPU, so a Python-driven latency figure measures the client as much as the
server; a deployment's clients run elsewhere. h2load spends ≈50 µs per call.

A unary gRPC call is an HTTP/2 POST of one length-prefixed message with
`content-type: application/grpc`, so h2load can send it as a file. It sees
HTTP statuses only: a failed RPC is still HTTP 200, with the gRPC status in
the trailers. Whoever uses this must count the answers on the server side
(the service's request counter does it) before trusting a figure.

Install: `apt-get install nghttp2-client` (Debian/Ubuntu).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np


def available() -> bool:
    return shutil.which("h2load") is not None


def version() -> str | None:
    if not available():
        return None
    out = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.split()
    return out[-1] if out else "unknown"


def grpc_frame(message) -> bytes:
    """A protobuf message as one gRPC message frame: not compressed, 4-byte big-endian length, bytes."""
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def closed_loop(target: str, method: str, messages: list, seconds: float, work: Path) -> dict:
    """One h2load process per message, all at once: each its own connection, one request at a time.

    So len(messages) clients, each sending its own message again as soon as the
    last answer came, for `seconds`. -> requests, requests/s, p50/p99 ms over all
    clients, and the count of non-200 answers (failed streams included)."""
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, message in enumerate(messages):
        body, log = work / f"client{i}.bin", work / f"client{i}.log"
        body.write_bytes(grpc_frame(message))
        log.unlink(missing_ok=True)
        cmd = ["h2load", "--clients=1", "--max-concurrent-streams=1", f"--duration={seconds:g}", f"--data={body}",
               "--header=content-type: application/grpc", "--header=te: trailers", f"--log-file={log}",
               f"http://{target}{method}"]
        runs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
    rows = []
    for proc, log in runs:
        out, _ = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not log.is_file():
            raise RuntimeError(f"h2load failed (exit {proc.returncode}):\n{out[-2000:]}")
        rows.append(np.loadtxt(log, dtype=np.int64, ndmin=2)[:, :3])  # start µs, HTTP status, duration µs
    rows = np.concatenate(rows)
    start, status, took = rows[:, 0], rows[:, 1], rows[:, 2]
    span_s = (int((start + took).max()) - int(start.min())) / 1e6
    ms = took / 1000.0
    return {"clients": len(messages), "requests": int(len(rows)), "req_s": len(rows) / span_s,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "not_200": int((status != 200).sum())}


def same_request(target: str, method: str, message, clients: int, seconds: float, work: Path) -> dict:
    """`clients` connections from one h2load process, each sending `message` again as soon as its answer
    came, for `seconds`: the cheapest load there is. Each connection is its own TCP connection, so a
    server of several worker processes on one SO_REUSEPORT port gets them spread by the kernel."""
    work.mkdir(parents=True, exist_ok=True)
    body, log = work / "same.bin", work / "same.log"
    body.write_bytes(grpc_frame(message))
    log.unlink(missing_ok=True)
    cmd = ["h2load", f"--clients={clients}", "--threads=1", "--max-concurrent-streams=1", f"--duration={seconds:g}",
           f"--data={body}", "--header=content-type: application/grpc", "--header=te: trailers", f"--log-file={log}",
           f"http://{target}{method}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not log.is_file():
        raise RuntimeError(f"h2load failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2)[:, :3]
    start, status, took = rows[:, 0], rows[:, 1], rows[:, 2]
    span_s = (int((start + took).max()) - int(start.min())) / 1e6
    ms = took / 1000.0
    return {"clients": clients, "requests": int(len(rows)), "req_s": len(rows) / span_s,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "not_200": int((status != 200).sum())}
