"""Requests built to hurt the server (the second red-team run): unbounded answers, work on the event loop,
index folders replaced under a running server, strings that are not Unicode, and the order of checks.
Each is sent to a real server on a loopback port, or done to a real index on disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from serving import digits_served, start_thread

from testbed.hostile import text_chunk_png
from zspace.index.build import build_index
from zspace.index.latent_index import LatentIndex
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.kserve import grpc_service_pb2_grpc as kpb_grpc
from zspace.service.client import ZSpaceClient, to_tensor
from zspace.service.config import Limits
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc

MODEL = pb.ModelRef(name="digits")


@pytest.fixture(scope="module")
def served(vae_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with digits_served(vae_bundle, root, max_message_mb=8, limits=Limits(max_rows=65536, max_generate=65536)) as s:
        with grpc.insecure_channel(s.target) as channel:
            yield s, pb_grpc.ZSpaceStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel), root


def status(call, request, timeout: float = 20) -> tuple[str, str]:
    try:
        call(request, timeout=timeout)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def store_rows(index_dir, payloads: list[str]) -> None:
    """Items written straight into an index's SQLite store, as an older zspace (or another tool) may have
    left them: the server must answer about them without failing, whatever they hold."""
    with sqlite3.connect(index_dir / "items.sqlite") as db:
        for i, text in enumerate(payloads):
            cur = db.execute("INSERT INTO items (key, vector, payload) VALUES (?, ?, ?)",
                             (f"legacy/{i}/{time.monotonic_ns()}", np.zeros(4, "<f4").tobytes(), text))
            db.execute("INSERT INTO changes (old_id, new_id) VALUES (NULL, ?)", (cur.lastrowid,))


# ------------------------------------------------------------------ 1. answers bounded before they are built


def test_repeated_kserve_outputs_are_refused_at_once(served):
    _, _, kserve, _ = served
    x = np.zeros((1, 64), np.float32)
    base = dict(model_name="digits.encoder", inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 64])], raw_input_contents=[x.tobytes()])
    wanted = kpb.ModelInferRequest.InferRequestedOutputTensor
    code, message = status(kserve.ModelInfer, kpb.ModelInferRequest(**base, outputs=[wanted(name="mean")] * 100_000))
    assert code == "INVALID_ARGUMENT" and "100000 requested" in message, (code, message)
    code, message = status(kserve.ModelInfer, kpb.ModelInferRequest(**base, outputs=[wanted(name="mean")] * 2))
    assert code == "INVALID_ARGUMENT" and "outputs[1]: 'mean' repeats outputs[0]" in message, (code, message)
    answer = kserve.ModelInfer(kpb.ModelInferRequest(**base, outputs=[wanted(name="logvar"), wanted(name="mean")]),
                               timeout=20)
    assert [o.name for o in answer.outputs] == ["logvar", "mean"]


def test_answers_over_the_message_limit_are_refused_before_any_work(served):
    """The server's limit is 8 MiB here: 65,536 decoded rows of 64 floats are 16 MiB (KServe and zspace.v1),
    32,768 generated images with their PNGs more than 8 MiB."""
    _, stub, kserve, _ = served
    z = np.zeros((65536, 4), np.float32)
    request = kpb.ModelInferRequest(model_name="digits.decoder", inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="z", datatype="FP32", shape=[65536, 4])], raw_input_contents=[z.tobytes()])
    code, message = status(kserve.ModelInfer, request)
    assert code == "RESOURCE_EXHAUSTED" and "ModelInfer: the answer would be 16.0 MiB" in message, (code, message)
    code, message = status(stub.Generate, pb.GenerateRequest(model=MODEL, count=32768, return_png=True))
    assert code == "RESOURCE_EXHAUSTED" and "Generate: the answer would be" in message, (code, message)
    code, message = status(stub.Decode, pb.DecodeRequest(model=MODEL, latents=to_tensor(z)))
    assert code == "RESOURCE_EXHAUSTED" and "Decode: the answer would be" in message, (code, message)
    assert status(stub.Generate, pb.GenerateRequest(model=MODEL, count=256, return_png=True))[0] == "OK"


# ------------------------------------------------------------------ 2. nothing of a request's content on the loop


def test_png_text_chunks_neither_block_the_loop_nor_slow_decoding(served):
    """30 and 90 PNGs of 63 zlib-compressed text chunks each (about 0.3 s apiece for Pillow to open): health
    answers at once meanwhile, and the images decode as fast as plain ones (their text is never read)."""
    s, stub, _, _ = served
    png = text_chunk_png()
    assert 50_000 < len(png) < 100_000
    with grpc.insecure_channel(s.target) as other:
        health = other.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
        for n in (30, 90):
            request = pb.EncodeRequest(model=MODEL, inputs=pb.Inputs(images=pb.ImageList(images=[png] * n)))
            pending = stub.Encode.future(request, timeout=60)
            waits = []
            for _ in range(5):
                t0 = time.monotonic()
                health(b"", timeout=10)
                waits.append(time.monotonic() - t0)
            answer = pending.result()
            assert answer.mean.shape == [n, 4]
            assert max(waits) < 1.0, f"health waited {max(waits):.2f} s behind {n} PNGs (was 6.9 s for 30)"


# ------------------------------------------------------------------ 3. an index folder replaced while served


def test_an_index_folder_replaced_while_serving_is_reopened_and_never_written_over(vae_bundle, tmp_path):
    models, indexes = tmp_path / "models", tmp_path / "indexes"
    shutil.copytree(vae_bundle, models / "digits" / "1")
    old = LatentIndex.create(indexes / "X", "digits", 1, 4)
    old.upsert(["old/0"], np.full((1, 4), 9, np.float32), [{"which": "old"}])
    old.close()
    rng = np.random.default_rng(0)
    new_vectors = rng.standard_normal((50, 4)).astype(np.float32)
    with start_thread(models, indexes=indexes) as s, ZSpaceClient(s.target) as c:
        assert c.search("X", vectors=np.full((1, 4), 9, np.float32), k=1)[0][0].key == "old/0"
        fresh = LatentIndex.create(indexes / ".X.new", "digits", 1, 4)
        fresh.upsert([f"new/{i}" for i in range(50)], new_vectors, [{"which": "new"}] * 50)
        fresh.close()
        shutil.rmtree(indexes / "X")
        os.rename(indexes / ".X.new", indexes / "X")
        c.upsert("X", ["after/0"], vectors=np.full((1, 4), 5, np.float32), payloads=[{"which": "after"}])  # acknowledged
        assert c.get_item("X", "after/0")[1] == {"which": "after"}
        assert c.search("X", vectors=new_vectors[7:8], k=1)[0][0].key == "new/7", "answers come from the new folder"
        s.rescan()
        assert c.get_item("X", "after/0")[1] == {"which": "after"}
    # After the server is gone: the acknowledged write is in the new folder, and every key still finds its own
    # vector (the old index wrote no snapshot here).
    index = LatentIndex.open(indexes / "X")
    try:
        assert index.get("after/0").payload == {"which": "after"}
        assert index.stats()["count"] == 51
        hits = index.search(new_vectors, 1)
        assert [h[0].key for h in hits] == [f"new/{i}" for i in range(50)]
        with pytest.raises(Exception, match="not in the index"):
            index.get("old/0")
    finally:
        index.close()


def test_an_index_refuses_writes_and_snapshots_once_its_folder_is_replaced(tmp_path):
    a = LatentIndex.create(tmp_path / "A", "m", 1, 4)
    b = LatentIndex.create(tmp_path / ".B", "m", 1, 4)
    b.upsert(["b"], np.ones((1, 4), np.float32), [{}])
    b.close()
    shutil.rmtree(tmp_path / "A")
    os.rename(tmp_path / ".B", tmp_path / "A")
    from zspace.index.errors import IndexMoved

    with pytest.raises(IndexMoved, match="replaced or removed"):
        a.upsert(["a"], np.zeros((1, 4), np.float32), [{}])
    before = sorted(p.name for p in (tmp_path / "A").iterdir())
    a.close()  # no snapshot into the other index's folder
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == before
    reopened = LatentIndex.open(tmp_path / "A")
    assert reopened.stats()["count"] == 1 and reopened.get("b")
    reopened.close()


# ------------------------------------------------------------------ 4-6. strings that are not Unicode, and long names


def test_lone_surrogates_are_refused_at_the_door(served):
    _, stub, _, _ = served
    v = to_tensor(np.zeros((1, 4), np.float32))
    for payload in ('{"\\ud800": 1}', '{"a": "x\\udfff"}', '{"a": ["\\ud800"]}'):
        code, message = status(stub.Upsert, pb.UpsertRequest(index="digits", vectors=v, keys=["s/1"], payloads_json=[payload]))
        assert code == "INVALID_ARGUMENT" and "payloads_json[0]: not valid Unicode" in message, (code, message)
    code, message = status(stub.Search, pb.SearchRequest(index="digits", key="digits/test/0", k=3, filter_field="label",
                                                         filter_value_json='"\\ud800"'))
    assert code == "INVALID_ARGUMENT" and "filter_value_json: not valid Unicode" in message, (code, message)
    ok = '{"emoji": "\\ud83d\\ude00"}'  # a surrogate pair is a real character, and stays welcome
    assert status(stub.Upsert, pb.UpsertRequest(index="digits", vectors=v, keys=["s/2"], payloads_json=[ok]))[0] == "OK"


def test_error_messages_about_stored_odd_fields_are_sent_and_bounded(served):
    """Payloads an older zspace stored unchecked (a lone surrogate, 60,000-character field names): a filter on
    a field no item has answers INVALID_ARGUMENT at once, its message small (was: a hang, and a 1.26 MB status)."""
    s, stub, _, root = served
    LatentIndex.create(root / "indexes" / "legacy", "digits", 1, 4).close()
    store_rows(root / "indexes" / "legacy", ['{"\\ud800": 1}'] + [json.dumps({"F" * 60_000 + str(i): 1}) for i in range(21)])
    s.rescan()
    t0 = time.monotonic()
    code, message = status(stub.Search, pb.SearchRequest(index="legacy", vectors=to_tensor(np.zeros((1, 4), np.float32)),
                                                         k=3, filter_field="nosuch", filter_value_json="1"), timeout=10)
    assert code == "INVALID_ARGUMENT" and "no item has a field 'nosuch'" in message, (code, message[:300])
    assert len(message) < 2000 and time.monotonic() - t0 < 9


def test_payload_field_names_are_bounded_on_write(served):
    _, stub, _, _ = served
    v = to_tensor(np.zeros((1, 4), np.float32))
    code, message = status(stub.Upsert, pb.UpsertRequest(index="digits", vectors=v, keys=["f/1"],
                                                         payloads_json=[json.dumps({"F" * 60_000: 1})]))
    assert code == "INVALID_ARGUMENT" and "a field name of 60000 characters, over the limit of 256" in message


# ------------------------------------------------------------------ 7. versions are ASCII digits


@pytest.mark.parametrize("version", ["²", "١", "1.0", "-1", " 1"])
def test_kserve_versions_are_ascii_digits(served, version):
    _, _, kserve, _ = served
    x = np.zeros((1, 64), np.float32)
    infer = kpb.ModelInferRequest(model_name="digits.encoder", model_version=version, inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 64])], raw_input_contents=[x.tobytes()])
    for call, request in ((kserve.ModelInfer, infer),
                          (kserve.ModelReady, kpb.ModelReadyRequest(name="digits.encoder", version=version)),
                          (kserve.ModelMetadata, kpb.ModelMetadataRequest(name="digits.encoder", version=version)),
                          (kserve.ModelConfig, kpb.ModelConfigRequest(name="digits.encoder", version=version))):
        code, message = status(call, request)
        assert code == "INVALID_ARGUMENT" and "model_version: expected a positive integer" in message, (code, message)


# ------------------------------------------------------------------ 9. cheap checks before any decoding


@pytest.mark.parametrize("request_, says", [
    (pb.SearchRequest(index="digits", k=1000, inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"] * 4096))),
     "4096 queries x k=1000"),
    (pb.SearchRequest(index="digits", k=3, filter_field="label", filter_value_json="NaN",
                      inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"]))), "filter_value_json: NaN is not JSON"),
    (pb.UpsertRequest(index="digits", keys=["one"], inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"] * 2))),
     "keys: 1 keys for 2 items"),
    (pb.UpsertRequest(index="digits", keys=["one"], payloads_json=["[1]"],
                      inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"]))), "payloads_json[0]: must be a JSON object"),
    (pb.UpsertRequest(index="digits", keys=[""], inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"]))),
     "keys[0]: must be a non-empty string"),
    (pb.ReconstructRequest(model=MODEL, return_png=True, inputs=pb.Inputs(images=pb.ImageList(images=[b"not an image"] * 16384))),
     "Reconstruct: the answer would be"),
])
def test_cheap_checks_come_before_any_image_is_decoded(served, request_, says):
    """The images are not images at all: the answer names the cheap mistake, so nothing was decoded first."""
    _, stub, _, _ = served
    code, message = status(getattr(stub, type(request_).__name__.removesuffix("Request")), request_)
    assert code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") and says in message, (code, message)


# ------------------------------------------------------------------ 10. folder names the server cannot serve


def test_odd_folder_names_are_skipped_and_rescans_go_on(vae_bundle, tmp_path):
    models, indexes = tmp_path / "models", tmp_path / "indexes"
    shutil.copytree(vae_bundle, models / "digits" / "1")
    (models / "digits" / "²").mkdir()  # str.isdigit() says yes, int() says no
    (models / "digits" / "١").mkdir()  # Arabic-Indic one: not version 1
    os.mkdir(os.fsencode(models) + b"/caf\xe9")  # Latin-1 bytes: not a UTF-8 name
    os.mkdir(os.fsencode(models) + b"/caf\xe9/1")
    build_index(models / "digits", "digits", indexes / "digits", split="test", quiet=True).close()
    shutil.copytree(indexes / "digits", os.fsdecode(os.fsencode(indexes) + b"/ix\xff"))
    with start_thread(models, indexes=indexes) as s, ZSpaceClient(s.target) as c:
        listed = c.list_models()
        assert [(m.name, m.version) for m in listed.models] == [("digits", 1)] and not listed.broken
        stub = pb_grpc.ZSpaceStub(c.channel)
        assert [i.name for i in stub.ListIndexes(pb.ListIndexesRequest(), timeout=20).indexes] == ["digits"]
        bundle2 = models / "digits" / ".2.tmp"
        shutil.copytree(vae_bundle, bundle2)
        manifest = json.loads((bundle2 / "manifest.json").read_text())
        manifest["version"] = 2
        (bundle2 / "manifest.json").write_text(json.dumps(manifest))
        os.rename(bundle2, models / "digits" / "2")
        s.rescan()
        assert sorted(m.version for m in c.list_models().models) == [1, 2], "a real new version is picked up"


# ------------------------------------------------------------------ 11. decoded pixels in flight


def test_the_pixel_budget_holds_a_second_big_image_until_the_first_is_decoded():
    import asyncio

    from zspace.service.pixels import PixelBudget

    async def scenario():
        budget, order = PixelBudget(64_000_000), []
        first_in = asyncio.Event()

        async def decode(name: str, pixels: int, hold: float):
            async with budget.reserve(pixels):
                order.append(f"{name} in ({budget.in_flight})")
                first_in.set()
                await asyncio.sleep(hold)
            order.append(f"{name} out")

        a = asyncio.create_task(decode("a", 40_000_000, 0.2))
        await first_in.wait()
        b = asyncio.create_task(decode("b", 40_000_000, 0.0))
        c = asyncio.create_task(decode("c", 20_000_000, 0.0))  # fits beside a
        await asyncio.gather(a, b, c)
        return order, budget.peak

    order, peak = asyncio.run(scenario())
    assert order.index("a out") < order.index("b in (40000000)"), order
    assert "c in (60000000)" in order and peak == 60_000_000, (order, peak)


# ------------------------------------------------------------------ 12. metrics kept where the operator says


def test_metrics_port_takes_a_host(vae_bundle, tmp_path, cli):
    import urllib.request

    from testbed.servers import free_port
    from zspace.service.config import parse_host_port

    assert parse_host_port("9100", "--metrics-port") == (None, 9100)
    assert parse_host_port("127.0.0.1:9100", "--metrics-port") == ("127.0.0.1", 9100)
    assert parse_host_port("[::1]:0", "--metrics-port") == ("::1", 0)
    for bad in ("host:", ":80", "70000", "127.0.0.1:x"):
        with pytest.raises(Exception, match="--metrics-port: expected PORT or HOST:PORT"):
            parse_host_port(bad, "--metrics-port")
    code, out = cli("serve", "--models", str(tmp_path), "--metrics-port", "localhost:99999")
    assert code == 2 and "--metrics-port: expected PORT or HOST:PORT" in out and "Traceback" not in out
    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    port = free_port()
    with start_thread(tmp_path / "models", metrics_host="127.0.0.1", metrics_port=port) as s:
        assert s.server.metrics_port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"zspace_requests" in r.read() or r.status == 200


# ------------------------------------------------------------------ 8. SIGTERM at any moment, with workers


def sigterm_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM now (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << 14))  # bit 14: signal 15
    except OSError:
        pass
    return False


@pytest.mark.parametrize("moment", ["first-handler", "0.6", "1.2"])
def test_sigterm_at_any_moment_with_workers_exits_0(vae_bundle, tmp_path, moment):
    """first-handler: the moment the process can catch SIGTERM at all (before that it is the interpreter
    starting, with no code of ours running); then while the workers import and load."""
    from testbed.servers import ServerChild, free_port, serve_command

    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    port = free_port()
    proc = ServerChild(serve_command(tmp_path / "models", port, "--workers", "2", "--metrics-port", "0", "--poll-s", "0"),
                       port, capture=True)
    try:
        if moment == "first-handler":
            deadline = time.monotonic() + 30
            while not sigterm_caught(proc.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(float(moment))
        proc.terminate()
        code, out = proc.wait(60)
    finally:
        proc.kill()
    assert code == 0 and "Traceback" not in out, (code, out[-2000:])


def test_a_replace_storm_loses_no_acknowledged_write(vae_bundle, tmp_path):
    """Writers keep upserting while the folder is replaced three times (bounded: 3 swaps, 5,000 writes each):
    every acknowledged write that began after the last swap is in the folder afterwards (what was acknowledged
    before a swap went with the folder the operator removed)."""
    models, indexes = tmp_path / "models", tmp_path / "indexes"
    shutil.copytree(vae_bundle, models / "digits" / "1")
    LatentIndex.create(indexes / "X", "digits", 1, 4).close()
    acked: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    with start_thread(models, indexes=indexes) as s:
        def writer(w: int) -> None:
            with ZSpaceClient(s.target, retries=0) as c:
                n = 0
                while not stop.is_set() and n < 5000:
                    key = f"w{w}/{n}"
                    n += 1
                    started = time.monotonic()
                    try:
                        c.upsert("X", [key], vectors=np.zeros((1, 4), np.float32))
                        acked.append((started, key))
                    except grpc.RpcError as exc:
                        errors.append(exc.code().name)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        try:
            last_swap = 0.0
            for swap in range(3):
                time.sleep(0.4)
                LatentIndex.create(indexes / f".X.{swap}", "digits", 1, 4).close()
                shutil.rmtree(indexes / "X")
                os.rename(indexes / f".X.{swap}", indexes / "X")
                last_swap = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
    after = [key for t, key in acked if t > last_swap]
    assert after, f"no write acknowledged after the last swap ({len(acked)} in all; errors: {Counter(errors)})"
    index = LatentIndex.open(indexes / "X")
    try:
        missing = [k for k in after if not index.store.get(k)]
    finally:
        index.close()
    assert not missing, f"{len(missing)} of {len(after)} acknowledged writes lost"
    assert set(errors) <= {"UNAVAILABLE"}, f"writes that met a swap are refused as UNAVAILABLE only: {Counter(errors)}"


def test_a_decoded_big_image_gives_its_memory_back(tmp_path):
    """A 36-megapixel PNG decoded on a thread of its own, as the server decodes: with the server's malloc
    settings and Pillow's big blocks, the process's RSS returns near where it was (before, 300 MB stayed)."""
    import subprocess
    import sys

    from testbed.hostile import big_png

    (tmp_path / "big.png").write_bytes(big_png())
    script = f"""
import threading
from zspace.memory import decoded_images_outside_the_heap, keep_freed_memory
from zspace.transforms import ImageTransform
keep_freed_memory(); decoded_images_outside_the_heap()
data = open({str(tmp_path / "big.png")!r}, "rb").read()
def rss(): return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
before = rss()
for _ in range(2):
    t = threading.Thread(target=ImageTransform(shape=(1, 8, 8)).from_bytes, args=(data,)); t.start(); t.join()
print(before, rss())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert after - before < 60, f"RSS {before} MB before two decodes, {after} MB after"
