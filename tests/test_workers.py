"""`zspace serve --workers N`: real worker processes on one loopback port, supervised; one index, many workers."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from testbed.servers import ServerChild, free_port, serve_command
from zspace.index.latent_index import LatentIndex
from zspace.service.client import ZSpaceClient

# Each client its own connection: the kernel spreads connections (not calls) over the workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    from zspace.data import load_dataset

    return np.ascontiguousarray(load_dataset("digits").x_test[:4])


@pytest.fixture
def served_dirs(vae_bundle, tmp_path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    shutil.copytree(vae_bundle, models / "digits" / "1")
    LatentIndex.create(tmp_path / "indexes" / "items", "digits", 1, 4, factory="HNSW32").close()
    return models, tmp_path / "indexes"


def start_group(models: Path, indexes: Path, *options: str) -> tuple[ServerChild, int]:
    port, metrics_port = free_port(), free_port()
    group = ServerChild(serve_command(models, port, "--indexes", str(indexes), "--workers", "2", "--poll-s", "0",
                                      "--metrics-port", str(metrics_port), *options), port, capture=True)
    group.wait_serving(120)
    return group, metrics_port


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (the workers of a supervisor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def answered_by(metrics: dict, method: str) -> dict[str, float]:
    """Per worker, how many `method` calls it answered OK."""
    out: dict[str, float] = {}
    for (name, labels), value in metrics.items():
        labels = dict(labels)
        if name == "zspace_requests_total" and labels.get("method") == method and labels.get("code") == "OK":
            out[labels["worker"]] = out.get(labels["worker"], 0) + value
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def test_workers_share_the_port_the_index_and_one_metrics_endpoint(served_dirs, digits_x):
    models, indexes = served_dirs
    group, metrics_port = start_group(models, indexes)
    clients = [ZSpaceClient(group.target, timeout=20, retries=1, options=OWN_CONNECTION) for _ in range(24)]
    try:
        assert len(children(group.proc.pid)) == 2
        for c in clients:
            mean, _ = c.encode("digits", digits_x[:2])
            assert mean.shape == (2, 4)
        # Read-your-writes across workers: a write acknowledged by one is seen by the next Search on every one.
        rng = np.random.default_rng(0)
        for step in range(12):
            vector = rng.standard_normal((1, 4)).astype(np.float32) * 10
            clients[step % len(clients)].upsert("items", [f"k{step}"], vectors=vector, payloads=[{"step": step}])
            for c in clients:
                hits = c.search("items", vectors=vector, k=1)[0]
                assert hits[0].key == f"k{step}" and hits[0].payload == {"step": step}
        metrics = scrape(metrics_port)
        assert set(answered_by(metrics, "Encode")) == {"0", "1"}, "both workers answered, on one port"
        assert set(answered_by(metrics, "Search")) == {"0", "1"}
        assert sum(answered_by(metrics, "Encode").values()) == 24
        assert metrics[("zspace_workers_serving", frozenset())] == 2
    finally:
        for c in clients:
            c.close()
        group.terminate()
    code, out = group.wait(60)
    assert code == 0, out
    assert out.count("stopped") == 3, "both workers drained, then the supervisor"
    assert f"group metrics on 127.0.0.1:{metrics_port}" in out, "one line names the group's metrics port"
    assert LatentIndex.open(indexes / "items").stats()["count"] == 12


def test_a_dead_worker_is_restarted_and_sighup_reaches_every_worker(served_dirs, digits_x, vae_bundle):
    models, indexes = served_dirs
    group, metrics_port = start_group(models, indexes)
    try:
        first = children(group.proc.pid)
        with ZSpaceClient(group.target, timeout=20, retries=1) as c:
            c.upsert("items", ["before"], vectors=np.ones((1, 4), np.float32), payloads=[{}])
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: scrape(metrics_port)[("zspace_worker_restarts_total", frozenset())] == 1, 60, "a restart")
        group.wait_serving(60)
        now = children(group.proc.pid)
        assert len(now) == 2 and first[0] not in now and first[1] in now
        # A new version folder, and SIGHUP to the supervisor only: every worker must rescan and see it
        # (as broken: its manifest says version 1, which is enough to show the rescan happened).
        shutil.copytree(vae_bundle, models / "digits" / "2")
        group.proc.send_signal(signal.SIGHUP)
        clients = [ZSpaceClient(group.target, timeout=20, retries=1, options=OWN_CONNECTION) for _ in range(16)]
        try:
            for c in clients:
                wait_for(lambda c=c: [b.path for b in c.list_models().broken] == ["digits/2"], 30,
                         "version 2 seen by every worker")
                assert c.get_item("items", "before")[1] == {}
        finally:
            for c in clients:
                c.close()
    finally:
        group.terminate()
    code, out = group.wait(60)
    assert code == 0, out
    assert "restarting in" in out


def test_kill_9_of_a_worker_or_of_the_group_loses_no_acknowledged_write(served_dirs):
    models, indexes = served_dirs
    group, _ = start_group(models, indexes)
    acked: set[str] = set()
    stop_at = time.monotonic() + 30

    def writer(w: int) -> None:
        with ZSpaceClient(group.target, timeout=5, retries=1, options=OWN_CONNECTION) as c:
            i = 0
            while time.monotonic() < stop_at:
                key = f"w{w}-{i}"
                try:
                    c.upsert("items", [key], vectors=np.full((1, 4), w * 1000 + i, np.float32), payloads=[{"i": i}])
                except Exception:  # its worker died under it, or the group did: not acknowledged
                    time.sleep(0.05)
                    continue
                acked.add(key)
                i += 1

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(writer, w) for w in range(4)]
            wait_for(lambda: len(acked) >= 40, 30, "writes acknowledged")
            os.kill(children(group.proc.pid)[1], signal.SIGKILL)  # one worker, mid-write
            count = len(acked)
            wait_for(lambda: len(acked) >= count + 40, 30, "writes acknowledged after the worker's restart")
            workers = children(group.proc.pid)
            os.kill(group.proc.pid, signal.SIGKILL)  # then the whole group at once
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            stop_at = time.monotonic()
            for f in futures:
                f.result(timeout=30)
    finally:
        group.kill()
    index = LatentIndex.open(indexes / "items")
    assert index.stats()["count"] >= len(acked) >= 80
    for key in acked:
        assert index.get(key).key == key
    assert index.index.ntotal - len(index.tombstones) == index.stats()["count"]


def test_a_worker_that_cannot_start_ends_the_group_with_its_error(served_dirs, tmp_path):
    models, indexes = served_dirs
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n")  # PEM in form only
    key.write_text("-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n")
    port = free_port()
    group = ServerChild(serve_command(models, port, "--workers", "2", "--metrics-port", "0", "--tls-cert", str(cert),
                                      "--tls-key", str(key)), port, capture=True)
    code, out = group.wait(120)
    assert code == 2, out
    assert "gRPC could not use" in out and "stopping the group" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("value, says", [("0", "expected a positive number or auto"),
                                         ("many", "expected a positive number or auto")])
def test_bad_worker_counts_are_named(cli, value, says, tmp_path):
    code, out = cli("serve", "--models", tmp_path, "--workers", value)
    assert code == 2 and "--workers" in out and says in out


def test_shared_memory_clients_reach_every_worker(served_dirs):
    """Each client's registration and its requests travel on its one connection, so on one worker; with many
    clients both workers serve shared tensors, and their regions go when the clients close."""
    from zspace.data import load_dataset

    models, indexes = served_dirs
    x = np.ascontiguousarray(load_dataset("digits").x_test[:300], dtype=np.float32)  # 76,800 bytes: shared
    group, metrics_port = start_group(models, indexes)
    try:
        with ZSpaceClient(group.target, timeout=20, shared_memory=False) as plain:
            want = plain.encode("digits", x)[0]
        clients = [ZSpaceClient(group.target, timeout=20, options=OWN_CONNECTION, shared_memory=True) for _ in range(12)]
        names = []
        try:
            for c in clients:
                np.testing.assert_array_equal(c.encode("digits", x)[0], want)
                np.testing.assert_array_equal(c.reconstruct("digits", x).x.shape, x.shape)
                names += [b.name for b in c._all_buffers]
        finally:
            for c in clients:
                c.close()
        assert set(answered_by(scrape(metrics_port), "RegisterSharedMemory")) == {"0", "1"}, "both workers took some"
        assert not [n for n in names if (Path("/dev/shm") / n).exists()], "every client removed its segments"
    finally:
        group.terminate()
    code, out = group.wait(60)
    assert code == 0, out


def test_http_is_served_by_every_worker_on_one_port(served_dirs, digits_x):
    """--http-port with --workers 2: the supervisor reserves the HTTP port too (0 made concrete) and every
    worker's listener joins it; new connections reach both, and a write through one is read through the other."""
    import http.client
    import json

    models, indexes = served_dirs
    http_port = free_port()
    group, metrics_port = start_group(models, indexes, "--http-port", str(http_port))
    try:
        body = json.dumps({"inputs": {"tensor": digits_x[:2].tolist()}})
        for _ in range(24):  # a connection each: the kernel spreads connections over the workers
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=20)
            conn.request("POST", "/v1/models/digits/encode", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            assert answer.status == 200 and len(json.loads(answer.read())["mean"]) == 2
            conn.close()
        assert set(answered_by(scrape(metrics_port), "Encode")) == {"0", "1"}, "both workers answered HTTP"
        for step in range(6):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=20)
            conn.request("POST", "/v1/indexes/items/items", json.dumps({"keys": [f"h{step}"], "vectors": [[step, 1, 2, 3]]}),
                         {"Content-Type": "application/json"})
            assert conn.getresponse().status == 200
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=20)
            conn.request("GET", f"/v1/indexes/items/items/h{step}")
            assert conn.getresponse().status == 200, "acknowledged by one worker, read by the next connection's"
            conn.close()
    finally:
        group.terminate()
    code, out = group.wait(60)
    assert code == 0, out
