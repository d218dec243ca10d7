"""The red-team runs, repeated in small: bad inputs under load, kill -9 (one server and a group of workers),
amplification, starvation, the event loop, image floods, index folders replaced while served, fuzzing.

    python -m benchmarks.redteam [--seconds 20] [--kills 5] [--worker-kills 4] [--fuzz 1000]

A digits VAE (trained here for a few epochs) is served by `zspace serve` as a
child process on loopback, with a Flat index of the test digits. Bounded in
time and count throughout; every figure is printed and written to JSON:

- bad inputs: distinct malformed requests over every RPC, sent round after round
  while well-formed clients keep calling; every answer's status is counted. The
  service must answer none of them INTERNAL and fail none of the good calls.
- kill -9: a client upserts items one by one and notes each acknowledgement;
  the server is killed mid-stream and restarted, `--kills` times; every
  acknowledged item must be there after each restart.
- amplification: Searches that would answer gigabytes (20 queries x k=20 over
  60 KB payloads, 4096 queries x k=1000) and the server's peak memory (VmHWM).
- starvation: GetItem latency while huge images are being decoded.
- event loop: gRPC health latency while PNGs full of compressed text chunks are encoded.
- memory: peak RSS while 16 clients send 64-megapixel PNGs at once, and RSS a few seconds after.
- an index folder replaced under the server, then writes: every acknowledged one survives a restart.
- fuzzing (testbed/fuzz.py): requests drawn over every RPC of both protocols; statuses, INTERNAL, hangs.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import click
import grpc
import numpy as np

from benchmarks.harness import RESULTS, ServerChild, free_port, machine, serve_command, table, write_json
from testbed.hostile import big_png, text_chunk_png
from zspace.service.client import to_tensor
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc


def setup(work: Path) -> None:
    from zspace.index.build import build_index
    from zspace.index.latent_index import LatentIndex
    from zspace.training.export import export_run
    from zspace.training.train import TrainConfig, train

    run = train(TrainConfig(data="digits", model="vae", latent_dim=4, hidden=(64, 32), epochs=3, seed=0), work / "run", quiet=True)
    bundle = export_run(run, work / "models", "digits")
    build_index(bundle, "digits", work / "indexes" / "digits", split="test", quiet=True).close()
    big = LatentIndex.create(work / "indexes" / "heavy", "digits", 1, 4)  # items with big payloads
    rng = np.random.default_rng(0)
    big.upsert([f"h{i}" for i in range(400)], rng.standard_normal((400, 4)).astype(np.float32),
               [{"blob": "x" * 60_000} for _ in range(400)])
    big.close()


def start(work: Path, port: int, *extra: str) -> ServerChild:
    args = serve_command(work / "models", port, "--indexes", str(work / "indexes"), "--metrics-port", "0", "--poll-s", "0",
                         *extra)
    return ServerChild(args, port, capture=False).wait_serving()


def bad_requests() -> list[tuple[str, object]]:
    """(RPC, request) pairs a correct server refuses with a clear status, or answers soundly where the input,
    though hostile, has a sound answer (latents of 1e38 through a sigmoid decoder; a 24 MB Search answer
    within the message limit). Never INTERNAL."""
    m = pb.ModelRef(name="digits")
    good = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    out: list[tuple[str, object]] = []
    for t in (pb.Tensor(shape=[2, 64], data=b"\x00" * 7), pb.Tensor(shape=[2, 10], data=good[:, :10].tobytes()),
              pb.Tensor(shape=[0, 64]), pb.Tensor(shape=[-1, 64]), pb.Tensor(shape=[1, 1, 64], data=good[:1].tobytes()),
              to_tensor(np.full((1, 64), np.nan)), to_tensor(np.full((1, 64), 3e38)), to_tensor(np.zeros((5000, 64)))):
        out += [("Encode", pb.EncodeRequest(model=m, inputs=pb.Inputs(tensor=t))),
                ("Reconstruct", pb.ReconstructRequest(model=m, inputs=pb.Inputs(tensor=t))),
                ("Score", pb.ScoreRequest(model=m, inputs=pb.Inputs(tensor=t)))]
    for images in ([b""], [b"not an image"], [b"\x89PNG\r\n\x1a\n broken"], [b"GIF89a...."], [b"\xff\xd8\xff" + b"\x00" * 99]):
        out.append(("Encode", pb.EncodeRequest(model=m, inputs=pb.Inputs(images=pb.ImageList(images=images)))))
    out += [("Encode", pb.EncodeRequest(model=m, inputs=pb.Inputs(texts=pb.TextList(texts=["words"])))),
            ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="nope"))), ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="x" * 20000))),
            ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="digits", version=99))),
            ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="digits", version=-3))), ("Encode", pb.EncodeRequest(model=m))]
    for count, temperature, seed in ((0, 1, 0), (-5, 1, 0), (10**6, 1, 0), (2, -1, 0), (2, float("nan"), 0), (2, float("inf"), 0)):
        out.append(("Generate", pb.GenerateRequest(model=m, count=count, temperature=temperature, seed=seed)))
    out += [("Decode", pb.DecodeRequest(model=m, latents=to_tensor(np.zeros((2, 5))))),
            ("Decode", pb.DecodeRequest(model=m, latents=to_tensor(np.full((2, 4), 1e38)))),
            ("Interpolate", pb.InterpolateRequest(model=m, steps=1, latents=to_tensor(np.zeros((2, 4))))),
            ("Interpolate", pb.InterpolateRequest(model=m, steps=5, latents=to_tensor(np.zeros((3, 4))))),
            ("Interpolate", pb.InterpolateRequest(model=m, steps=10**6))]
    q = to_tensor(np.zeros((1, 4)))
    for field, value in (('la"bel', '"7"'), ("la\x00bel", '"7"'), ("label", '{"a": 1}'), ("label", "[1]"), ("label", str(2**70)),
                         ("label", "NaN"), ("label", "not json"), ("nosuchfield", "1"), ("x" * 5000, "1"), ("label", '"' + "y" * 9000 + '"')):
        out.append(("Search", pb.SearchRequest(index="digits", vectors=q, k=3, filter_field=field, filter_value_json=value)))
    out += [("Search", pb.SearchRequest(index="digits", vectors=q, k=0)), ("Search", pb.SearchRequest(index="digits", vectors=q, k=10**6)),
            ("Search", pb.SearchRequest(index="nope", vectors=q, k=3)), ("Search", pb.SearchRequest(index="i" * 20000, vectors=q, k=3)),
            ("Search", pb.SearchRequest(index="digits", key="missing", k=3)), ("Search", pb.SearchRequest(index="digits", key="k" * 20000, k=3)),
            ("Search", pb.SearchRequest(index="digits", k=3)), ("Search", pb.SearchRequest(index="digits", vectors=to_tensor(np.zeros((1, 7))), k=3)),
            ("Search", pb.SearchRequest(index="heavy", vectors=to_tensor(np.zeros((20, 4))), k=20)),
            ("Search", pb.SearchRequest(index="digits", vectors=to_tensor(np.zeros((4096, 4))), k=1000))]
    v = to_tensor(np.zeros((2, 4)))
    for keys, payloads in ((["a", "a"], []), (["", "b"], []), (["k" * 5000, "b"], []), (["a"], []), (["a", "b"], ["{}"]),
                           (["a", "b"], ["[]", "{}"]), (["a", "b"], ['{"x": NaN}', "{}"]), (["a", "b"], [deep, "{}"]),
                           (["a", "b"], ['{"x": "' + "y" * 70000 + '"}', "{}"]), (["a", "b"], ["not json", "{}"])):
        out.append(("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=keys, payloads_json=payloads)))
    out += [("Upsert", pb.UpsertRequest(index="digits", keys=["a"])), ("Upsert", pb.UpsertRequest(index="digits", vectors=to_tensor(np.full((1, 4), np.inf)), keys=["a"])),
            ("Delete", pb.DeleteRequest(index="digits", keys=[])), ("Delete", pb.DeleteRequest(index="digits", keys=["missing"])),
            ("Delete", pb.DeleteRequest(index="digits", keys=[""])), ("GetItem", pb.GetItemRequest(index="digits", key="")),
            ("GetItem", pb.GetItemRequest(index="digits", key="k" * 20000)), ("GetItem", pb.GetItemRequest(index="nope", key="a")),
            ("IndexStats", pb.IndexStatsRequest(index="")), ("GetModel", pb.GetModelRequest())]
    out += round3_requests()
    return out


def round3_requests() -> list[tuple[str, object]]:
    """What the second red-team run found (issue 22): answers without a bound, strings that are not Unicode,
    versions that are not ASCII, long field names, work done before a cheap refusal."""
    from zspace.kserve import grpc_service_pb2 as kpb

    x = np.zeros((4096, 64), np.float32)
    infer = dict(model_name="digits.encoder", raw_input_contents=[x.tobytes()],
                 inputs=[kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[4096, 64])])
    wanted = kpb.ModelInferRequest.InferRequestedOutputTensor
    v = to_tensor(np.zeros((1, 4)))
    not_images = pb.Inputs(images=pb.ImageList(images=[b"not an image"] * 4096))
    out: list[tuple[str, object]] = [
        ("ModelInfer", kpb.ModelInferRequest(**infer, outputs=[wanted(name="mean")] * 100_000)),
        ("ModelInfer", kpb.ModelInferRequest(**infer, outputs=[wanted(name="mean")] * 600)),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=["s"], payloads_json=['{"\\ud800": 1}'])),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=["s"], payloads_json=['{"' + "F" * 60_000 + '": 1}'])),
        ("Search", pb.SearchRequest(index="digits", vectors=v, k=3, filter_field="label", filter_value_json='"\\ud800"')),
        ("Search", pb.SearchRequest(index="digits", vectors=v, k=3, filter_field="nosuchfield", filter_value_json="1")),
        ("Search", pb.SearchRequest(index="digits", k=1000, inputs=not_images)),
        ("Upsert", pb.UpsertRequest(index="digits", keys=["one"], inputs=not_images)),
        ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="digits"), count=4096, return_png=True))]
    for version in ("²", "١", "1.0"):
        out += [("ModelInfer", kpb.ModelInferRequest(**{**infer, "model_version": version})),
                ("ModelReady", kpb.ModelReadyRequest(name="digits.encoder", version=version)),
                ("ModelMetadata", kpb.ModelMetadataRequest(name="digits.encoder", version=version)),
                ("ModelConfig", kpb.ModelConfigRequest(name="digits.encoder", version=version))]
    return out


def stub_for(request, stubs: dict):
    """The stub whose service takes this request: KServe's messages live in package `inference`."""
    return stubs["kserve" if request.DESCRIPTOR.file.package == "inference" else "zspace"]


def raw_garbage(target: str) -> Counter:
    """Bytes that are no protobuf message at all, to every RPC."""
    codes: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        for name in pb.DESCRIPTOR.services_by_name["ZSpace"].methods_by_name:
            call = channel.unary_unary(f"/zspace.v1.ZSpace/{name}", request_serializer=None, response_deserializer=None)
            try:
                call(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return codes


def bad_input_phase(target: str, seconds: float) -> dict:
    requests = bad_requests()
    codes, good_failures, good_calls = Counter(), [], [0]
    stop = threading.Event()

    def good_client() -> None:
        x = np.random.default_rng(2).random((4, 64), dtype=np.float32)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            while not stop.is_set() and good_calls[0] < 100_000:
                try:
                    stub.Encode(pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=to_tensor(x))), timeout=10)
                    stub.Search(pb.SearchRequest(index="digits", key="digits/test/1", k=5), timeout=10)
                    good_calls[0] += 2
                except grpc.RpcError as exc:
                    good_failures.append(exc.code().name)

    goods = [threading.Thread(target=good_client) for _ in range(2)]
    for g in goods:
        g.start()
    sent, rounds, t0 = 0, 0, time.monotonic()
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=opts) as channel:
        from zspace.kserve import grpc_service_pb2_grpc as kpb_grpc

        stubs = {"zspace": pb_grpc.ZSpaceStub(channel), "kserve": kpb_grpc.GRPCInferenceServiceStub(channel)}
        while time.monotonic() - t0 < seconds and rounds < 1000:
            rounds += 1
            for name, request in requests:
                try:
                    getattr(stub_for(request, stubs), name)(request, timeout=10)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
                sent += 1
    codes += raw_garbage(target)
    stop.set()
    for g in goods:
        g.join(30)
    return {"distinct_bad_inputs": len(requests) + len(pb.DESCRIPTOR.services_by_name["ZSpace"].methods_by_name),
            "bad_requests_sent": sent, "rounds": rounds, "statuses": dict(codes), "internal": codes.get("INTERNAL", 0),
            "good_calls": good_calls[0], "good_failures": len(good_failures)}


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a supervisor's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def kill_phase(work: Path, kills: int, workers: int = 1) -> dict:
    """Upsert one item per call, kill -9 the server at a random moment, restart, check every acknowledged item.

    With workers > 1, two writers (their connections land on different workers); odd cycles kill -9 one
    worker (the supervisor restarts it), even ones the whole group (supervisor and workers at once)."""
    rng = np.random.default_rng(3)
    acked: list[str] = []
    lost_total, n = 0, 0
    extra = ("--workers", str(workers)) if workers > 1 else ()
    for cycle in range(kills):
        port = free_port()
        child = start(work, port, *extra)
        stop = threading.Event()

        def writer(child: ServerChild = child, stop: threading.Event = stop) -> None:
            nonlocal n
            with grpc.insecure_channel(child.target) as channel:
                stub = pb_grpc.ZSpaceStub(channel)
                while not stop.is_set():
                    key = f"kill/{n}"
                    n += 1
                    try:
                        stub.Upsert(pb.UpsertRequest(index="digits", keys=[key], vectors=to_tensor(rng.standard_normal((1, 4)))), timeout=5)
                        acked.append(key)
                    except grpc.RpcError:
                        return  # the server died under this call: not acknowledged

        writers = [threading.Thread(target=writer) for _ in range(2 if workers > 1 else 1)]
        for w in writers:
            w.start()
        time.sleep(0.5 + float(rng.random()))
        if workers > 1 and cycle % 2 == 0:
            os.kill(children(child.proc.pid)[0], signal.SIGKILL)  # one worker
            time.sleep(0.3)
            stop.set()
            for w in writers:
                w.join(30)
            child.stop()
        else:
            for pid in (children(child.proc.pid) if workers > 1 else []):
                os.kill(pid, signal.SIGKILL)
            child.kill()  # SIGKILL
            stop.set()
            for w in writers:
                w.join(30)
        child = start(work, free_port())
        with grpc.insecure_channel(child.target) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            lost = 0
            for key in acked:
                try:
                    stub.GetItem(pb.GetItemRequest(index="digits", key=key), timeout=10)
                except grpc.RpcError:
                    lost += 1
        child.stop()
        lost_total += lost
        print(f"  kill -9 cycle {cycle + 1}{f' (workers {workers})' if workers > 1 else ''}: {len(acked)} acknowledged "
              f"so far, {lost} lost", flush=True)
    return {"kill_cycles": kills, "workers": workers, "acknowledged": len(acked), "lost": lost_total}


def replace_phase(work: Path, writes: int = 200) -> dict:
    """An index folder replaced while served (rm -rf X; mv .X.new X), then upserts; after a restart every
    acknowledged write is there, and every key of the new index still finds its own vector."""
    from zspace.index.latent_index import LatentIndex

    indexes = work / "indexes"
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((100, 4)).astype(np.float32)
    child = start(work, free_port())
    acked = []
    try:
        fresh = LatentIndex.create(indexes / ".swap.new", "digits", 1, 4)
        fresh.upsert([f"swap/{i}" for i in range(100)], vectors, [{"i": i} for i in range(100)])
        fresh.close()
        shutil.rmtree(indexes / "digits")
        os.rename(indexes / ".swap.new", indexes / "digits")
        with grpc.insecure_channel(child.target) as channel:
            stub = pb_grpc.ZSpaceStub(channel)
            for i in range(writes):
                try:
                    stub.Upsert(pb.UpsertRequest(index="digits", keys=[f"after/{i}"], vectors=to_tensor(vectors[i % 100:i % 100 + 1])), timeout=10)
                    acked.append(f"after/{i}")
                except grpc.RpcError:
                    pass
    finally:
        child.stop()
    index = LatentIndex.open(indexes / "digits")
    try:
        lost = sum(index.store.get(k) is None for k in acked)
        own = sum(h[0].key == f"swap/{i}" for i, h in enumerate(index.search(vectors, 1)))
    finally:
        index.close()
    return {"acknowledged": len(acked), "lost": lost, "keys_finding_their_vector": own, "keys": 100}


def loop_phase(child: ServerChild) -> dict:
    """Encode of 30 and 90 PNGs of 63 compressed text chunks each, with gRPC health timed meanwhile."""
    png = text_chunk_png()
    out = {}
    with grpc.insecure_channel(child.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
        for n in (30, 90):
            request = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(images=pb.ImageList(images=[png] * n)))
            t0 = time.monotonic()
            pending = stub.Encode.future(request, timeout=60)
            waits = []
            while not pending.done() and len(waits) < 200:
                t = time.monotonic()
                health(b"", timeout=30)
                waits.append((time.monotonic() - t) * 1000)
            pending.result()
            out[f"{n}_pngs"] = {"encode_s": time.monotonic() - t0, "health_max_ms": max(waits, default=0.0),
                                "health_calls": len(waits)}
    return out


def memory_phase(child: ServerChild, clients: int = 16) -> dict:
    """16 clients each sending a 64-megapixel PNG at once: the server's peak RSS, and its RSS a few seconds later."""
    png = big_png(8000)
    before = rss_mb(child.proc.pid)
    Path(f"/proc/{child.proc.pid}/clear_refs").write_text("5")  # resets VmHWM: the peak of this phase alone
    request = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(images=pb.ImageList(images=[png])))
    t0 = time.monotonic()
    with grpc.insecure_channel(child.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        flood = [stub.Encode.future(request, timeout=300) for _ in range(clients)]
        statuses = Counter((f.exception().code().name if f.exception() else "OK") for f in flood)
    took = time.monotonic() - t0
    time.sleep(3)
    return {"clients": clients, "png_mb": len(png) / 2**20, "megapixels": 64, "statuses": dict(statuses),
            "seconds": took, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(child.proc.pid),
            "rss_after_3s_mb": rss_mb(child.proc.pid)}


def fuzz_phase(target: str, examples: int, seconds: float) -> dict:
    """`examples` requests drawn by testbed/fuzz.py over every RPC of both protocols, within `seconds`."""
    from hypothesis import HealthCheck, assume, given, settings

    from testbed.fuzz import Tally, requests, send

    tally, t0 = Tally(), time.monotonic()
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=opts) as channel:
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(requests())
        def one(drawn):
            path, request = drawn
            assume(request.ByteSize() < 32 << 20 and time.monotonic() - t0 < seconds)
            send(channel, path, request, tally)
            if tally.tried % 500 == 0:
                print(f"  fuzz: {tally.tried} requests, {len(tally.bad)} bad", flush=True)

        one()
    codes = Counter()
    for (_, code), count in tally.statuses.items():
        codes[code] += count
    return {"requests": tally.tried, "seconds": time.monotonic() - t0, "statuses": dict(codes),
            "methods": len({m for m, _ in tally.statuses}), "internal": codes.get("INTERNAL", 0) + codes.get("UNKNOWN", 0),
            "hangs": codes.get("DEADLINE_EXCEEDED", 0), "bad_examples": tally.bad[:10]}


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    return status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    return status_mb(pid, "VmRSS")


def amplification_phase(child: ServerChild) -> dict:
    before = peak_rss_mb(child.proc.pid)
    out = {"peak_rss_mb_before": before}
    with grpc.insecure_channel(child.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        for name, request in (("20q_k20_60KB_payloads", pb.SearchRequest(index="heavy", vectors=to_tensor(np.zeros((20, 4))), k=20)),
                              ("4096q_k1000", pb.SearchRequest(index="digits", vectors=to_tensor(np.zeros((4096, 4))), k=1000))):
            t0 = time.monotonic()
            try:
                stub.Search(request, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            out[name] = {"status": code, "seconds": time.monotonic() - t0, "peak_rss_mb": peak_rss_mb(child.proc.pid)}
    return out


def starvation_phase(child: ServerChild, seconds: float) -> dict:
    request = pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(images=pb.ImageList(images=[big_png()])))
    with grpc.insecure_channel(child.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ZSpaceStub(channel)
        flood = [stub.Encode.future(request, timeout=5) for _ in range(24)]  # short deadlines, as the red team sent
        lat, t0 = [], time.monotonic()
        while time.monotonic() - t0 < seconds and len(lat) < 2000:
            t = time.monotonic()
            stub.GetItem(pb.GetItemRequest(index="digits", key="digits/test/0"), timeout=10)
            lat.append((time.monotonic() - t) * 1000)
            time.sleep(0.01)
        statuses = Counter((f.exception().code().name if f.exception() else "OK") for f in flood)
    return {"flood_requests": 24, "flood_statuses": dict(statuses), "getitem_calls": len(lat),
            "getitem_p50_ms": float(np.percentile(lat, 50)), "getitem_p99_ms": float(np.percentile(lat, 99)),
            "getitem_max_ms": float(np.max(lat))}


@click.command()
@click.option("--seconds", default=20.0, help="Length of the bad-input phase (and of the starvation phase / 4).")
@click.option("--kills", default=5, help="kill -9 cycles of a single server.")
@click.option("--worker-kills", default=4, help="kill -9 cycles of `--workers 2` (one worker, then the whole group, in turn).")
@click.option("--fuzz", "fuzz_examples", default=1000, help="Fuzzed requests over every RPC of both protocols (0: none).")
@click.option("--fuzz-seconds", default=600.0, help="Time budget of the fuzzing.")
@click.option("--json", "json_path", default=str(RESULTS / "redteam.json"), help="Where the figures go.")
def main(seconds, kills, worker_kills, fuzz_examples, fuzz_seconds, json_path):
    work = Path(tempfile.mkdtemp(prefix="zspace-redteam-"))
    fuzz = None
    try:
        print("setup: a digits VAE, a Flat index of the test digits, an index of 60 KB payloads", flush=True)
        setup(work)
        child = start(work, free_port())
        try:
            print(f"bad inputs for {seconds:.0f} s beside two well-formed clients", flush=True)
            bad = bad_input_phase(child.target, seconds)
            print("amplification", flush=True)
            amp = amplification_phase(child)
            print("starvation: 24 36-megapixel PNGs with 5 s deadlines, GetItem meanwhile", flush=True)
            starve = starvation_phase(child, seconds / 4)
            print("event loop: 30 and 90 PNGs of 63 compressed text chunks, health meanwhile", flush=True)
            loop = loop_phase(child)
            print("memory: 16 clients x one 64-megapixel PNG at once", flush=True)
            memory = memory_phase(child)
            if fuzz_examples:
                print(f"fuzz: {fuzz_examples} requests over every RPC of both protocols", flush=True)
                fuzz = fuzz_phase(child.target, fuzz_examples, fuzz_seconds)
        finally:
            child.stop()
        print(f"kill -9: {kills} cycles", flush=True)
        kill = kill_phase(work, kills)
        print(f"kill -9 with --workers 2: {worker_kills} cycles", flush=True)
        kill_workers = kill_phase(work, worker_kills, workers=2) if worker_kills else None
        print("an index folder replaced while served", flush=True)
        replaced = replace_phase(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [{"figure": "distinct bad inputs", "value": bad["distinct_bad_inputs"]},
            {"figure": "bad requests sent", "value": bad["bad_requests_sent"]},
            {"figure": "answered INTERNAL", "value": bad["internal"]},
            {"figure": "good calls under the bad load", "value": bad["good_calls"]},
            {"figure": "good calls failed", "value": bad["good_failures"]},
            {"figure": "kill -9 cycles / acknowledged / lost", "value": f"{kill['kill_cycles']} / {kill['acknowledged']} / {kill['lost']}"},
            *([{"figure": "kill -9 cycles with 2 workers / acknowledged / lost",
                "value": f"{kill_workers['kill_cycles']} / {kill_workers['acknowledged']} / {kill_workers['lost']}"}]
              if kill_workers else []),
            {"figure": "index folder replaced: acknowledged / lost / keys finding their vector",
             "value": f"{replaced['acknowledged']} / {replaced['lost']} / {replaced['keys_finding_their_vector']} of {replaced['keys']}"},
            {"figure": "peak RSS before amplification, MB", "value": round(amp["peak_rss_mb_before"], 1)},
            *({"figure": f"Search {k}: status, s, peak RSS MB", "value": f"{v['status']}, {v['seconds']:.3f}, {v['peak_rss_mb']:.1f}"}
              for k, v in amp.items() if isinstance(v, dict)),
            {"figure": "GetItem p50 / p99 / max ms while images decode",
             "value": f"{starve['getitem_p50_ms']:.1f} / {starve['getitem_p99_ms']:.1f} / {starve['getitem_max_ms']:.1f}"},
            *({"figure": f"Encode {k.replace('_', ' ')} of text chunks: s; health max ms",
               "value": f"{v['encode_s']:.2f}; {v['health_max_ms']:.1f}"} for k, v in loop.items()),
            {"figure": "16 x 64-Mpx PNGs: statuses; RSS before / peak / 3 s after, MB",
             "value": f"{memory['statuses']}; {memory['rss_before_mb']:.0f} / {memory['peak_rss_mb']:.0f} / "
                      f"{memory['rss_after_3s_mb']:.0f}"}]
    if fuzz:
        rows += [{"figure": "fuzzed requests (RPCs reached)", "value": f"{fuzz['requests']} ({fuzz['methods']})"},
                 {"figure": "fuzz statuses", "value": fuzz["statuses"]},
                 {"figure": "fuzz INTERNAL/UNKNOWN / hangs", "value": f"{fuzz['internal']} / {fuzz['hangs']}"}]
    print(table(rows, ["figure", "value"], "Red-team run, repeated"))
    print("statuses of the bad requests:", bad["statuses"])
    ok = (bad["internal"] == 0 and bad["good_failures"] == 0 and kill["lost"] == 0 and replaced["lost"] == 0
          and replaced["keys_finding_their_vector"] == replaced["keys"] and (not kill_workers or kill_workers["lost"] == 0)
          and (not fuzz or fuzz["internal"] == 0 and fuzz["hangs"] == 0))
    if fuzz and fuzz["bad_examples"]:
        print("fuzz: requests that got a bug status:", *fuzz["bad_examples"], sep="\n  ")
    print("verdict:", "all held" if ok else "NOT held", flush=True)
    write_json(Path(json_path), {"benchmark": "redteam", "machine": machine(), "bad_inputs": bad, "kill": kill,
                                 "kill_workers": kill_workers, "replaced": replaced, "amplification": amp,
                                 "starvation": starve, "event_loop": loop, "memory": memory, "fuzz": fuzz, "held": ok})


if __name__ == "__main__":
    main()
