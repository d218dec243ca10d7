"""Abuse of the service: repeated keys, hostile filters and payloads, floods, oversized answers, signals at start-up;
each reproduced against a real server or index (the first red-team run found them)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from serving import digits_served, start_thread

from zspace.errors import NotFound
from zspace.index.latent_index import LatentIndex
from zspace.service.client import ZSpaceClient, to_tensor
from zspace.service.config import BatchConfig
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def served(vae_bundle, tmp_path_factory):
    with digits_served(vae_bundle, tmp_path_factory.mktemp("abuse")) as s:
        with grpc.insecure_channel(s.target) as channel:
            yield s, pb_grpc.ZSpaceStub(channel)


def status(call, request) -> tuple[str, str]:
    try:
        call(request, timeout=20)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def test_a_key_repeated_in_one_upsert_is_refused_and_nothing_is_hidden(served):
    _, stub = served
    codes = to_tensor(np.zeros((2, 4), np.float32))
    code, message = status(stub.Upsert, pb.UpsertRequest(index="digits", vectors=codes, keys=["dup/x", "dup/x"]))
    assert code == "INVALID_ARGUMENT" and "keys[1]: 'dup/x' repeats keys[0]" in message
    assert status(stub.GetItem, pb.GetItemRequest(index="digits", key="dup/x"))[0] == "NOT_FOUND", "nothing half-written"
    assert status(stub.Upsert, pb.UpsertRequest(index="digits", vectors=codes, keys=["dup/x", "dup/y"]))[0] == "OK"
    hits = stub.Search(pb.SearchRequest(index="digits", key="dup/x", k=2), timeout=20).results[0].hits
    assert {h.key for h in hits} == {"dup/x", "dup/y"}


def test_reads_during_a_replace_see_the_item_every_time(tmp_path):
    """A writer replacing one key in a loop, readers getting it meanwhile: never NOT_FOUND (bounded: 3 s)."""
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 4)
    idx.upsert(["K"], np.zeros((1, 4), np.float32), [{"n": 0}])
    stop, missing, reads = threading.Event(), [], [0]

    def writer():
        n = 0
        while not stop.is_set() and n < 3000:
            n += 1
            idx.upsert(["K"], np.full((1, 4), n, np.float32), [{"n": n}])

    def reader():
        while not stop.is_set():
            try:
                idx.get("K")
                hits = idx.search(np.zeros((1, 4), np.float32), 1, ("n", idx.get("K").payload["n"]))[0]
                reads[0] += 1
                if not hits:
                    pass  # replaced again between the two reads: a newer value, not a lost item
            except NotFound:
                missing.append(1)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    idx.close()
    assert reads[0] > 100 and not missing, f"{len(missing)} of {reads[0] + len(missing)} reads found the key missing"


def test_a_reader_sees_committed_state_only(tmp_path):
    """Deterministic: a write transaction stands open after deleting K; a reader on another thread still sees K."""
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 4)
    idx.upsert(["K"], np.zeros((1, 4), np.float32), [{"n": 0}])
    store, seen = idx.store, []
    with store._transaction():
        store.db.execute("DELETE FROM items WHERE key = 'K'")
        reader = threading.Thread(target=lambda: seen.append(store.get("K")))
        reader.start()
        reader.join(10)
    assert seen and seen[0] is not None and seen[0].payload == {"n": 0}
    idx.close()


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_generate_takes_any_int64_seed(served, seed):
    _, stub = served
    a = stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="digits"), count=2, seed=seed), timeout=20)
    b = stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="digits"), count=2, seed=seed), timeout=20)
    assert a.outputs.tensor.data == b.outputs.tensor.data, "a seed names one sample"


def deep(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


@pytest.mark.parametrize("field, value_json, says", [
    ('la"bel', '"7"', "quotes"),
    ("la\x00bel", '"7"', "control characters"),
    ("label", '{"a": 1}', "got a JSON object"),
    ("label", "[1, 2]", "got a JSON array"),
    ("label", str(2**64), "64-bit"),
    ("label", "NaN", "NaN is not JSON"),
    ("label", "not json", "filter_value_json: not valid JSON"),
])
def test_bad_filters_are_invalid_argument(served, field, value_json, says):
    _, stub = served
    code, message = status(stub.Search, pb.SearchRequest(index="digits", key="digits/test/0", k=3, filter_field=field,
                                                          filter_value_json=value_json))
    assert code == "INVALID_ARGUMENT" and says in message, (code, message)


@pytest.mark.parametrize("payload, says", [
    (deep(100_000), "payloads_json[0]: "),   # too long, or nested too deeply: either way refused by name
    (deep(5_000), "nested too deeply"),
    (deep(65), "more than 64 levels"),    # our own bound, the same on every Python version
    ('{"x": NaN}', "NaN is not JSON"),
    ('{"x": Infinity}', "Infinity is not JSON"),
    ('{"x": "' + "y" * 70_000 + '"}', "over the limit of 65536"),
])
def test_bad_payloads_are_invalid_argument(served, payload, says):
    _, stub = served
    request = pb.UpsertRequest(index="digits", vectors=to_tensor(np.zeros((1, 4), np.float32)), keys=["p/1"],
                               payloads_json=[payload])
    code, message = status(stub.Upsert, request)
    assert code == "INVALID_ARGUMENT" and says in message, (code, message[:200])


def test_messages_never_echo_unbounded_input(served):
    _, stub = served
    code, message = status(stub.GetItem, pb.GetItemRequest(index="digits", key="k" * 20_000))
    assert code == "INVALID_ARGUMENT" and "key: 20000 characters, over the limit of 1024" in message
    code, message = status(stub.GetItem, pb.GetItemRequest(index="digits", key="k" * 1000))
    assert code == "NOT_FOUND" and len(message) < 200
    code, message = status(stub.GetModel, pb.GetModelRequest(model=pb.ModelRef(name="m" * 20_000)))
    assert code == "INVALID_ARGUMENT" and len(message) < 200
    code, message = status(stub.IndexStats, pb.IndexStatsRequest(index="i" * 20_000))
    assert code == "INVALID_ARGUMENT" and len(message) < 200
    code, message = status(stub.IndexStats, pb.IndexStatsRequest(index="i" * 200))
    assert code == "NOT_FOUND" and len(message) < 300


def test_a_half_copied_bundle_is_retried_when_its_files_change(vae_bundle, tmp_path):
    models = tmp_path / "models"
    (models / "digits" / "1").mkdir(parents=True)
    shutil.copy2(vae_bundle / "manifest.json", models / "digits" / "1")  # the manifest first, as a copy may go
    with start_thread(models) as s, ZSpaceClient(s.target) as c:
        assert [b.path for b in c.list_models().broken] == ["digits/1"]
        for graph in ("encoder.onnx", "decoder.onnx"):
            shutil.copy2(vae_bundle / graph, models / "digits" / "1")
        s.rescan()
        assert [m.name for m in c.list_models().models] == ["digits"] and not c.list_models().broken
        assert json.loads(c.get_model("digits").metrics_json)


def test_undecodable_bytes_and_non_finite_outputs_are_invalid_argument(served):
    s, _ = served
    with grpc.insecure_channel(s.target) as channel:
        raw = channel.unary_unary("/zspace.v1.ZSpace/Encode", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff garbage", timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in err.value.details()
        stub = pb_grpc.ZSpaceStub(channel)
        huge = to_tensor(np.full((1, 64), 3e38, np.float32))
        code, message = status(stub.Encode, pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=huge)))
        assert code == "INVALID_ARGUMENT" and "NaN or infinite" in message, (code, message)


def test_search_answers_are_bounded_before_they_are_built(vae_bundle, tmp_path):
    """20 queries x k=20 over items with big payloads: refused at once, not built in memory (here a 1 MiB limit)."""
    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    index = LatentIndex.create(tmp_path / "indexes" / "big", "digits", 1, 4)
    rng = np.random.default_rng(0)
    index.upsert([f"k{i}" for i in range(40)], rng.standard_normal((40, 4)).astype(np.float32),
                 [{"blob": "x" * 60_000} for _ in range(40)])
    index.close()
    with start_thread(tmp_path / "models", indexes=tmp_path / "indexes", max_message_mb=1) as s:
        with grpc.insecure_channel(s.target) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            queries = to_tensor(rng.standard_normal((20, 4)).astype(np.float32))
            code, message = status(stub.Search, pb.SearchRequest(index="big", vectors=queries, k=20))
            assert code == "RESOURCE_EXHAUSTED" and "over the message limit of 1 MiB" in message, message
            few = to_tensor(rng.standard_normal((5, 4)).astype(np.float32))
            assert status(stub.Search, pb.SearchRequest(index="big", vectors=few, k=2))[0] == "OK"  # 10 x 60 KB
            many = to_tensor(np.zeros((4096, 4), np.float32))
            code, message = status(stub.Search, pb.SearchRequest(index="big", vectors=many, k=1000))
            assert code == "INVALID_ARGUMENT" and "over the limit of 100000" in message


def test_big_requests_beyond_the_byte_budget_are_refused_at_once_and_small_ones_pass(vae_bundle, tmp_path):
    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    big = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=to_tensor(np.zeros((4096, 64), np.float32))))
    small = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=to_tensor(np.zeros((1, 64), np.float32))))
    # The first big request waits up to a second in the batch queue for company: it is in progress meanwhile.
    with start_thread(tmp_path / "models", batch=BatchConfig(max_batch=8192, max_delay_ms=1000, max_queue_rows=8192),
                      max_inflight_mb=1) as s:
        with grpc.insecure_channel(s.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            first = stub.Encode.future(big, timeout=20)
            time.sleep(0.3)
            code, message = status(stub.Encode, big)
            assert code == "RESOURCE_EXHAUSTED" and "MiB of requests in progress" in message, message
            assert not first.done(), "refused at once, while the first is still in progress"
            assert status(stub.Encode, small)[0] == "OK"
            assert first.result().mean.shape == [4096, 4]


def test_image_floods_neither_starve_index_reads_nor_pass_the_pixel_cap(served):
    """Decoding runs in a pool of its own: GetItem stays fast while huge images decode (bounded: 24 requests)."""
    from testbed.hostile import big_png

    s, stub = served
    png = big_png()
    huge = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(images=pb.ImageList(images=[png] * 2)))
    code, message = status(stub.Encode, huge)
    assert code == "INVALID_ARGUMENT" and "pixels in all" in message, "72 Mpx in one request: refused before decoding"
    one = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(images=pb.ImageList(images=[png])))
    flood = [stub.Encode.future(one, timeout=120) for _ in range(24)]
    latencies = []
    try:
        for _ in range(10):
            t0 = time.monotonic()
            stub.GetItem(pb.GetItemRequest(index="digits", key="digits/test/0"), timeout=5)
            latencies.append(time.monotonic() - t0)
        busy = sum(not f.done() for f in flood)
    finally:
        results = [f.exception() for f in flood]
    assert busy > 0, "the flood was still decoding while GetItem was timed"
    assert all(r is None for r in results), results
    assert max(latencies) < 2.0, f"GetItem waited behind image decoding: {max(latencies):.2f} s"


@pytest.mark.parametrize("after_s", [0.3, 1.5])
def test_sigterm_during_start_up_exits_cleanly(vae_bundle, tmp_path, after_s):
    """SIGTERM while the process imports or loads its models: exit 0, no traceback (was rc -15 or 1)."""
    from testbed.servers import ServerChild, free_port, serve_command

    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    port = free_port()
    proc = ServerChild(serve_command(tmp_path / "models", port, "--metrics-port", "0", "--poll-s", "0"), port, capture=True)
    try:
        time.sleep(after_s)
        proc.terminate()
        code, out = proc.wait(60)
    finally:
        proc.kill()
    assert code == 0 and "Traceback" not in out, (code, out[-2000:])


def test_shutdown_is_bounded_by_the_grace_period(tmp_path):
    """SIGTERM with long featurisation queued (60 MB of text per request, seconds each, in threads that
    cannot be interrupted): the process exits soon after --grace-s, not when the last thread is done."""
    from helpers import make_docs, train_run

    from testbed.servers import ServerChild, free_port, serve_command
    from zspace.training.export import export_run

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in make_docs()) + "\n")
    run = train_run(tmp_path / "run", data=f"texts:{docs}", latent_dim=2, hidden=(16,), epochs=1, vocab_size=30)
    export_run(run, tmp_path / "models", "docs")
    port = free_port()
    proc = ServerChild(serve_command(tmp_path / "models", port, "--metrics-port", "0", "--poll-s", "0", "--grace-s", "1"),
                       port, capture=True)
    try:
        proc.wait_serving()
        texts = ["orbit rocket launch nasa " * 40_000] * 60  # 60 x 1M characters: seconds of word counting each
        request = pb.EncodeRequest(model=pb.ModelRef(name="docs"), inputs=pb.Inputs(texts=pb.TextList(texts=texts)))
        with grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            pending = [stub.Encode.future(request, timeout=120) for _ in range(4)]
            time.sleep(2.0)  # all four received, featurisation under way
            t0 = time.monotonic()
            proc.terminate()
            code, out = proc.wait(120)
            took = time.monotonic() - t0
            for f in pending:
                f.cancel()
    finally:
        proc.kill()
    assert code == 0 and "stopped" in out, out[-2000:]
    assert took < 6.0, f"exit took {took:.1f} s after SIGTERM with --grace-s 1"


def test_compact_wire_uint8_in_float16_out(served):
    """8-bit images as UINT8 tensors give the very codes of their float32 form; answers in float16 on request."""
    from zspace.data import load_dataset
    from zspace.service.client import from_tensor

    s, stub = served
    m = pb.ModelRef(name="digits")
    pixels = (load_dataset("digits").x_test[:8] * 255).round().astype(np.uint8)
    as_uint8 = stub.Encode(pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=to_tensor(pixels))), timeout=20)
    floats = pixels.astype(np.float32) / np.float32(255.0)
    as_float = stub.Encode(pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=to_tensor(floats))), timeout=20)
    assert to_tensor(pixels).dtype == pb.UINT8 and len(to_tensor(pixels).data) * 4 == len(to_tensor(floats).data)
    assert np.array_equal(from_tensor(as_uint8.mean), from_tensor(as_float.mean))
    half = stub.Encode(pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=to_tensor(floats)), output_dtype=pb.FLOAT16), timeout=20)
    assert half.mean.dtype == pb.FLOAT16 and from_tensor(half.mean).dtype == np.float16
    np.testing.assert_allclose(from_tensor(half.mean), from_tensor(as_float.mean), atol=1e-2, rtol=1e-3)
    dec = stub.Decode(pb.DecodeRequest(model=m, latents=to_tensor(from_tensor(half.mean)), output_dtype=pb.FLOAT16), timeout=20)
    assert dec.outputs.tensor.dtype == pb.FLOAT16 and dec.latents.dtype == pb.FLOAT16
    for request, says in (
            (pb.DecodeRequest(model=m, latents=to_tensor(np.zeros((1, 4), np.uint8))), "UINT8 is for 8-bit images"),
            (pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=pb.Tensor(shape=[1, 64], data=b"\x00" * 64, dtype=pb.FLOAT16))),
             "do not match shape [1, 64] (expected 128 bytes of float16)"),
            (pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=pb.Tensor(shape=[1, 64], data=b"\x00" * 64, dtype=7))),
             "dtype: unknown value 7"),
            (pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=to_tensor(floats)), output_dtype=pb.UINT8), "output_dtype: expected")):
        code, message = status(getattr(stub, type(request).__name__.replace("Request", "")), request)
        assert code == "INVALID_ARGUMENT" and says in message, (code, message)
