"""The red-team run of issue 17, repeated in small: bad inputs under load, kill -9, amplification, starvation.

    python -m benchmarks.redteam [--seconds 20] [--kills 5]

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
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import click
import grpc
import numpy as np

from benchmarks.harness import RESULTS, ServerChild, free_port, machine, serve_command, table, write_json
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


def start(work: Path, port: int) -> ServerChild:
    args = serve_command(work / "models", port, "--indexes", str(work / "indexes"), "--metrics-port", "0", "--poll-s", "0")
    return ServerChild(args, port, capture=False).wait_serving()


def big_png(side: int = 6000) -> bytes:
    """A PNG of side x side pixels (36 megapixels by default) of a smooth pattern: 1 MB on the wire,
    a few hundred milliseconds to decode."""
    import io

    from PIL import Image

    a = np.add.outer(np.arange(side) % 256, np.arange(side) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([a, a.T, a // 2], -1)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def text_chunk_png(chunks: int = 63, side: int = 64) -> bytes:
    """A small PNG (about 66 KB) carrying `chunks` zlib-compressed text chunks of a megabyte each: Pillow
    decompresses every one when it opens the file (about 0.3 s), though not one pixel depends on them."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"note{i}", "x" * 1_000_000, zip=True)
    buf = io.BytesIO()
    pixels = (np.random.default_rng(0).random((side, side)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


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
    return out


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
        stub = pb_grpc.ZSpaceStub(channel)
        while time.monotonic() - t0 < seconds and rounds < 1000:
            rounds += 1
            for name, request in requests:
                try:
                    getattr(stub, name)(request, timeout=10)
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


def kill_phase(work: Path, kills: int) -> dict:
    """Upsert one item per call, kill -9 the server at a random moment, restart, check every acknowledged item."""
    rng = np.random.default_rng(3)
    acked: list[str] = []
    lost_total, n = 0, 0
    for cycle in range(kills):
        port = free_port()
        child = start(work, port)
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

        w = threading.Thread(target=writer)
        w.start()
        time.sleep(0.5 + float(rng.random()))
        child.kill()  # SIGKILL
        stop.set()
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
        print(f"  kill -9 cycle {cycle + 1}: {len(acked)} acknowledged so far, {lost} lost", flush=True)
    return {"kill_cycles": kills, "acknowledged": len(acked), "lost": lost_total}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
@click.option("--kills", default=5, help="kill -9 cycles.")
@click.option("--json", "json_path", default=str(RESULTS / "redteam.json"), help="Where the figures go.")
def main(seconds, kills, json_path):
    work = Path(tempfile.mkdtemp(prefix="zspace-redteam-"))
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
        finally:
            child.stop()
        print(f"kill -9: {kills} cycles", flush=True)
        kill = kill_phase(work, kills)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [{"figure": "distinct bad inputs", "value": bad["distinct_bad_inputs"]},
            {"figure": "bad requests sent", "value": bad["bad_requests_sent"]},
            {"figure": "answered INTERNAL", "value": bad["internal"]},
            {"figure": "good calls under the bad load", "value": bad["good_calls"]},
            {"figure": "good calls failed", "value": bad["good_failures"]},
            {"figure": "kill -9 cycles", "value": kill["kill_cycles"]},
            {"figure": "acknowledged upserts", "value": kill["acknowledged"]},
            {"figure": "acknowledged upserts lost", "value": kill["lost"]},
            {"figure": "peak RSS before amplification, MB", "value": round(amp["peak_rss_mb_before"], 1)},
            *({"figure": f"Search {k}: status, s, peak RSS MB", "value": f"{v['status']}, {v['seconds']:.3f}, {v['peak_rss_mb']:.1f}"}
              for k, v in amp.items() if isinstance(v, dict)),
            {"figure": "GetItem p50 / p99 / max ms while images decode",
             "value": f"{starve['getitem_p50_ms']:.1f} / {starve['getitem_p99_ms']:.1f} / {starve['getitem_max_ms']:.1f}"}]
    print(table(rows, ["figure", "value"], "Red-team run, repeated"))
    print("statuses of the bad requests:", bad["statuses"])
    ok = bad["internal"] == 0 and bad["good_failures"] == 0 and kill["lost"] == 0
    print("verdict:", "all held" if ok else "NOT held", flush=True)
    write_json(Path(json_path), {"benchmark": "redteam", "machine": machine(), "bad_inputs": bad, "kill": kill,
                                 "amplification": amp, "starvation": starve, "held": ok})


if __name__ == "__main__":
    main()
