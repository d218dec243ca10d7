"""Shared memory between local clients and the server: KServe's system shared-memory extension driven by
the real tritonclient, zspace.v1's shared tensors through the zspace client, and serving on a Unix socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving import start_thread
from test_kserve import drive, reference

from zspace.data import load_dataset
from zspace.errors import NotFound, UserError
from zspace.service.client import ZSpaceClient
from zspace.service.shared_memory import REGIONS, NotAllowed, SharedMemoryRegistry, check_sharing, is_local_peer
from zspace.v1 import zspace_pb2 as pb

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory (/dev/shm) is not here")
TOKEN = "shm-s3cret"


@pytest.fixture(scope="module")
def repo(vae_bundle) -> Path:
    return vae_bundle.parents[1]


@pytest.fixture(scope="module")
def server(repo):
    with start_thread(repo) as s:
        yield s


@pytest.fixture()
def x() -> np.ndarray:
    return np.ascontiguousarray(load_dataset("digits").x_test[:300], dtype=np.float32)  # 76,800 bytes: over 64 KiB


def prefix() -> str:
    return f"zt{uuid.uuid4().hex[:8]}_"


def segments(start: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(start))


def test_tritonclient_infers_through_system_shared_memory_and_each_misuse_is_refused(server, repo, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    name = prefix()
    r = drive(server.target, "shared_memory", tmp_path, name)

    assert "system_shared_memory" in r["extensions"]
    assert r["register_in"]["status"] == "OK" and r["register_out"]["status"] == "OK"
    assert r["status"] == [f"{name}in", f"{name}out"]
    mean, logvar = reference(repo, "encoder", x)
    np.testing.assert_allclose(np.load(tmp_path / "mean_shm.npy"), mean, atol=1e-5)  # read from the output region
    np.testing.assert_allclose(np.load(tmp_path / "logvar_shm.npy"), logvar, atol=1e-5)  # beside it, in the message
    assert r["mean_told"] == {"shared_memory_region": f"{name}out", "shared_memory_offset": 64,
                              "shared_memory_byte_size": len(x) * 16}
    assert r["contents"] == 1  # logvar's alone

    def refused(key: str, status: str, *words: str) -> None:
        assert r[key]["status"] == status, (key, r[key])
        assert all(w in r[key]["message"] for w in words), (key, r[key]["message"])

    refused("same_name_again", "ALREADY_EXISTS", f"'{name}in'", "already registered")
    refused("no_segment", "NOT_FOUND", "no shared memory segment", "another machine or in another container")
    refused("path_as_key", "INVALID_ARGUMENT", "key:", "not a shared memory name")
    refused("past_segment", "INVALID_ARGUMENT", "past the end of segment")
    refused("input_outside_region", "INVALID_ARGUMENT", "input 'x'", "do not fit shared memory region")
    refused("input_wrong_size", "INVALID_ARGUMENT", "shared_memory_byte_size", str(x.nbytes))
    refused("output_too_small", "INVALID_ARGUMENT", "output 'mean'", "shared_memory_byte_size")
    refused("unknown_region", "NOT_FOUND", f"'{name}nope'", "not registered")
    refused("unregister_unknown", "NOT_FOUND", "not registered")
    refused("cuda_register", "UNIMPLEMENTED", "system shared memory instead")
    refused("vanished", "FAILED_PRECONDITION", "was removed", "unregistered")
    assert r["status_after_vanished"] == [f"{name}out"]  # the vanished one is gone, the other kept
    assert r["unregister_all"]["status"] == "OK" and r["status_after_all"] == []
    assert segments(name) == []  # the driver removed its segments; nothing of ours is left either
    with ZSpaceClient(server.target) as c:
        assert c.health() == "SERVING"


def test_the_registration_rpcs_need_the_token(repo, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    with start_thread(repo, token=TOKEN) as s:
        r = drive(s.target, "shared_memory", tmp_path, prefix(), TOKEN)
    assert r["register_without_token"]["status"] == "UNAUTHENTICATED"
    assert r["register_in"]["status"] == "OK"  # the same call with the token


def test_zspace_client_uses_shared_memory_on_loopback_and_answers_the_same(server, x):
    with ZSpaceClient(server.target, shared_memory=False) as plain:
        mean, logvar = plain.encode("digits", x)
        recon = plain.reconstruct("digits", x).x
        decoded = plain.decode("digits", mean).x
    with ZSpaceClient(server.target) as c:
        assert c.shared_memory  # automatic for a loopback target
        got_mean, got_logvar = c.encode("digits", x)
        np.testing.assert_array_equal(got_mean, mean)
        np.testing.assert_array_equal(got_logvar, logvar)
        np.testing.assert_array_equal(c.reconstruct("digits", x).x, recon)
        np.testing.assert_array_equal(c.decode("digits", mean).x, decoded)
        half = c.encode("digits", x, output_dtype="float16")[0]
        assert half.dtype == np.float16 and np.abs(half - mean).max() < 1e-2
        small = c.encode("digits", x[:3])[0]  # under 64 KiB: in the message
        np.testing.assert_array_equal(small, mean[:3])
        made = [b.name for b in c._all_buffers]
        assert len(made) == 1 and segments(made[0]) == made  # one buffer, reused by every call
        status = c._call("SharedMemoryStatus", pb.SharedMemoryStatusRequest(name=made[0]))
        assert [r.name for r in status.regions] == made
    assert segments(made[0]) == []  # closing the client removed its segment ...
    assert made[0] not in {r.name for r in REGIONS.status()}  # ... and its region


def test_zspace_client_recovers_when_the_server_forgets_its_region(server, x):
    """A restarted server holds no regions: the client's next call registers a fresh buffer and answers."""
    with ZSpaceClient(server.target) as c:
        first = c.encode("digits", x)[0]
        old = c._all_buffers[0].name
        REGIONS.unregister(old)  # what a restart does to the server's side
        np.testing.assert_array_equal(c.encode("digits", x)[0], first)
        np.testing.assert_array_equal(c.decode("digits", first).x, c.decode("digits", first).x)
        assert [b.name for b in c._all_buffers] != [old] and segments(old) == []  # the forgotten segment is removed


def test_zspace_client_falls_back_to_messages_where_the_server_cannot_see_its_segments(server, x, tmp_path, monkeypatch):
    monkeypatch.setattr(REGIONS, "root", tmp_path)  # the server now looks elsewhere, as one in a container would
    with ZSpaceClient(server.target, shared_memory=False) as plain:
        mean = plain.encode("digits", x)[0]
    with ZSpaceClient(server.target) as c:
        np.testing.assert_array_equal(c.encode("digits", x)[0], mean)
        assert not c.shared_memory and c._all_buffers == []
    with ZSpaceClient(server.target, shared_memory=True) as c, pytest.raises(grpc.RpcError) as info:
        c.encode("digits", x)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no shared memory segment" in info.value.details()
    assert segments("zspace-") == [] or all(not s.startswith(f"zspace-{os.getpid()}-") for s in segments("zspace-"))


def test_only_local_clients_may_register_unless_the_server_says_otherwise(repo, x):
    assert all(is_local_peer(p) for p in ("ipv4:127.0.0.1:5000", "ipv4:127.3.2.1:1", "ipv6:[::1]:5000",
                                          "ipv6:[::ffff:127.0.0.1]:80", "unix:/run/zspace.sock", "unix:"))
    assert not any(is_local_peer(p) for p in ("ipv4:10.0.0.2:5000", "ipv6:[2001:db8::1]:5000", "ipv4:1.27.0.0:1",
                                              "ipv6:[::ffff:10.0.0.1]:80", ""))
    with pytest.raises(NotAllowed, match="for clients on the server's machine"):
        check_sharing("local", "ipv4:10.0.0.2:5000")
    check_sharing("any", "ipv4:10.0.0.2:5000")
    with start_thread(repo, shared_memory="off") as s:
        with ZSpaceClient(s.target, shared_memory=False) as plain:
            mean = plain.encode("digits", x)[0]
        with ZSpaceClient(s.target) as c:  # automatic: refused, so the messages it is
            np.testing.assert_array_equal(c.encode("digits", x)[0], mean)
            assert not c.shared_memory
        with ZSpaceClient(s.target, shared_memory=True) as c, pytest.raises(grpc.RpcError) as info:
            c.encode("digits", x)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "turned off" in info.value.details()


def register_own(c: ZSpaceClient, name: str, size: int) -> Path:
    path = Path("/dev/shm") / name
    path.write_bytes(b"\0" * size)
    c._call("RegisterSharedMemory", pb.RegisterSharedMemoryRequest(
        region=pb.SharedMemoryRegion(name=name, key="/" + name, byte_size=size)))
    return path


def test_a_segment_truncated_under_the_server_is_refused_not_a_crash(server, x):
    name = prefix() + "trunc"
    with ZSpaceClient(server.target, shared_memory=False) as c:
        path = register_own(c, name, x.nbytes)
        try:
            os.truncate(path, 100)  # touching the mapping past the new end would be SIGBUS
            request = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=pb.Tensor(
                shape=list(x.shape), shared=pb.SharedRegion(region=name, byte_size=x.nbytes))))
            with pytest.raises(grpc.RpcError) as info:
                c._call("Encode", request)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "smaller than the region" in info.value.details()
            assert name not in {r.name for r in REGIONS.status()}  # dropped
            assert c.health() == "SERVING"
        finally:
            path.unlink(missing_ok=True)


def test_shared_tensors_are_checked_like_message_tensors(server, x):
    name = prefix() + "chk"
    with ZSpaceClient(server.target, shared_memory=False) as c:
        path = register_own(c, name, x.nbytes + 4096)
        try:
            def encode(byte_size=x.nbytes, data=b"", output=None, offset=0):
                t = pb.Tensor(shape=list(x.shape), data=data,
                              shared=pb.SharedRegion(region=name, offset=offset, byte_size=byte_size))
                req = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=t))
                if output is not None:
                    req.output.CopyFrom(output)
                with pytest.raises(grpc.RpcError) as info:
                    c._call("Encode", req)
                return info.value.code(), info.value.details()

            assert encode(byte_size=8) == (grpc.StatusCode.INVALID_ARGUMENT, encode(byte_size=8)[1])
            assert "inputs.tensor.shared.byte_size: 8 bytes do not match shape" in encode(byte_size=8)[1]
            assert "give data or shared, not both" in encode(data=b"1234")[1]
            assert "do not fit shared memory region" in encode(offset=8192)[1]
            code, message = encode(output=pb.SharedRegion(region=name, offset=x.nbytes, byte_size=16))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "output.byte_size: the answer needs" in message
            with open(path, "r+b") as f:  # NaN in shared memory is refused like NaN in a message
                f.write(np.full(len(x) * 64, np.nan, np.float32).tobytes())
            assert "NaN or infinity" in encode()[1]
        finally:
            c._call("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name))
            path.unlink(missing_ok=True)


def test_unregistering_a_region_in_use_waits_for_its_requests_then_unmaps(tmp_path):
    registry = SharedMemoryRegistry(root=tmp_path)
    (tmp_path / "seg").write_bytes(bytes(range(256)) * 4)
    registry.register("r", "/seg", 0, 1024)
    with registry.hold("r", "input") as region:
        registry.unregister("r")
        assert registry.status() == [] and region.fd >= 0  # the name is free at once; the mapping stays
        with pytest.raises(NotFound):
            registry.read("r", 0, 4, "u1", "input")  # new requests cannot find it
        assert region.mapping[:4] == bytes(range(4))  # the request in flight still reads
    assert region.fd == -1 and region.mapping.closed  # unmapped when the last user left
    registry.register("r", "/seg", 0, 1024)  # the name can be taken again
    registry.close()


LEAK_CHECK = """
import os, sys
from pathlib import Path
from zspace.errors import UserError
from zspace.service.shared_memory import SharedMemoryRegistry

root = Path(sys.argv[1])
(root / "seg").write_bytes(b"\\0" * 4096)
registry = SharedMemoryRegistry(root=root, max_regions=4)
before = len(os.listdir("/proc/self/fd"))
refused = 0
for i in range(200):
    registry.register(f"r{i % 4}", "/seg", 0, 4096)
    if i % 4 == 3:
        try:
            registry.register("one-more", "/seg", 0, 8)
        except UserError as exc:
            refused += "4 shared memory regions are registered" in str(exc)
        registry.unregister()
print(before, len(os.listdir("/proc/self/fd")), refused, len(registry.status()))
"""


def test_registering_and_unregistering_leaks_no_descriptor_or_mapping(tmp_path):
    # In a process of its own: this one's server threads open and close descriptors while it counts.
    done = subprocess.run([sys.executable, "-c", LEAK_CHECK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, refused, left = map(int, done.stdout.split())
    assert after == before and refused == 50 and left == 0


def test_concurrent_requests_while_their_region_is_unregistered_never_break_the_server(server, x):
    name = prefix() + "race"
    answers: list[str] = []
    with ZSpaceClient(server.target, shared_memory=False) as c:
        path = register_own(c, name, x.nbytes)
        path.write_bytes(x.tobytes())
        request = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=pb.Tensor(
            shape=list(x.shape), shared=pb.SharedRegion(region=name, byte_size=x.nbytes))))

        def hammer():
            for _ in range(20):
                try:
                    c._call("Encode", request)
                    answers.append("OK")
                except grpc.RpcError as exc:
                    answers.append(exc.code().name)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        c._call("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name))
        for t in threads:
            t.join(60)
        path.unlink()
        assert set(answers) <= {"OK", "NOT_FOUND"} and "NOT_FOUND" in answers and len(answers) == 80
        assert c.health() == "SERVING"


def test_serve_listens_on_a_unix_socket_and_clients_use_shared_memory_there(repo, x, tmp_path):
    sock = tmp_path / "zspace.sock"
    sock_file = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_file.bind(str(sock))  # a socket file that nobody listens on: what a killed server leaves
    sock_file.close()
    with start_thread(repo, uds=sock) as s:
        with ZSpaceClient(f"unix:{sock}") as c:
            assert c.shared_memory
            mean = c.encode("digits", x)[0]
            assert len(c._all_buffers) == 1
        with ZSpaceClient(s.target, shared_memory=False) as tcp:
            np.testing.assert_array_equal(tcp.encode("digits", x)[0], mean)
        with pytest.raises(UserError, match="in use by another server"):
            with start_thread(repo, uds=sock):
                pass
    assert not sock.exists()  # removed when the server stopped
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(UserError, match="exists and is not a socket"):
        with start_thread(repo, uds=tmp_path / "file"):
            pass


def test_uds_with_workers_is_refused_by_the_cli(cli, repo, tmp_path):
    code, text = cli("serve", "--models", str(repo), "--workers", "2", "--uds", str(tmp_path / "s.sock"),
                     "--metrics-port", "0")
    assert code == 2 and "--uds" in text and "--workers 1" in text and "Traceback" not in text
