"""The gRPC service end to end: a real server on a free loopback port, real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import self_signed, train_run
from PIL import Image
from serving import free_port, start_thread

from testbed.servers import ServerChild, serve_command
from zspace.bundle import load_bundle
from zspace.data import load_dataset
from zspace.runtime import onnx_session
from zspace.service.client import ZSpaceClient, to_tensor
from zspace.service.config import BatchConfig
from zspace.training.export import export_run
from zspace.transforms import ImageTransform, transform_from_dict
from zspace.v1 import zspace_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def serving_provider() -> str:
    """The provider `zspace serve --device auto` uses on this machine (CUDA where a GPU and onnxruntime-gpu are)."""
    from zspace.runtime import providers_for

    first = providers_for("auto")[0]
    return first if isinstance(first, str) else first[0]


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Served results against in-process ONNX Runtime on the CPU: identical on the CPU; on a GPU provider within
    the bundle's parity bound (CUDA's sums depend on batch shape, and the server merges batches)."""
    from zspace.runtime import PARITY_TOLERANCE

    if serving_provider() == "CPUExecutionProvider":
        assert np.array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=PARITY_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def repo(vae_run, tmp_path_factory, jsonl_corpus) -> Path:
    """digits/1 (VAE), docs/1 (text AE) and one broken bundle."""
    root = tmp_path_factory.mktemp("models")
    export_run(vae_run, root, "digits")
    text_run = train_run(tmp_path_factory.mktemp("runs") / "docs", data=f"texts:{jsonl_corpus}", model="ae",
                         latent_dim=2, hidden=(16,), epochs=2, vocab_size=30)
    export_run(text_run, root, "docs")
    broken = root / "broken" / "1"
    shutil.copytree(root / "digits" / "1", broken)
    (broken / "encoder.onnx").write_bytes(b"not an onnx graph")
    return root


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory) -> Path:
    from helpers import make_docs

    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in make_docs()) + "\n")
    return path


@pytest.fixture(scope="module")
def server(repo):
    with start_thread(repo, batch=BatchConfig(max_delay_ms=5.0, max_batch=64)) as s:
        yield s


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    return np.ascontiguousarray(load_dataset("digits").x_test[:16])


def ort(repo: Path, name: str, graph: str, feed: np.ndarray) -> list[np.ndarray]:
    bundle = load_bundle(repo / name / "1")
    return onnx_session(bundle.graph(graph)).run(None, {"x" if graph == "encoder" else "z": feed})


def png_bytes(arr: np.ndarray, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((arr.reshape(size) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ every RPC


def test_health_and_models(client):
    assert client.health() == "SERVING"
    assert client.health("zspace.v1.ZSpace") == "SERVING"
    resp = client.list_models()
    names = {(m.name, m.version) for m in resp.models}
    assert names == {("digits", 1), ("docs", 1)}
    assert [b.path.endswith("broken/1") for b in resp.broken] == [True]
    info = client.get_model("digits")
    assert info.kind == "vae" and list(info.input_shape) == [1, 8, 8] and info.latent_dim == 4
    assert info.execution_provider == serving_provider()
    assert "test_sq_error" in json.loads(info.metrics_json)


def test_encode_equals_in_process_onnx_runtime(client, repo, digits_x):
    mean, logvar = client.encode("digits", digits_x)
    want_mean, want_logvar = ort(repo, "digits", "encoder", digits_x)
    assert_same(mean, want_mean)
    assert_same(logvar, want_logvar)


def test_encode_images_uses_the_bundle_transform(client, repo, digits_x):
    pngs = [png_bytes(row) for row in digits_x[:4]]
    mean, _ = client.encode("digits", images=pngs)
    transform = ImageTransform((1, 8, 8))
    feats = np.stack([transform.from_bytes(p) for p in pngs])
    assert_same(mean, ort(repo, "digits", "encoder", feats)[0])
    big = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(big, format="JPEG")
    assert client.encode("digits", images=[big.getvalue()])[0].shape == (1, 4)


def test_encode_texts_uses_the_stored_vocabulary(client, repo):
    texts = ["orbit rocket launch nasa moon", "recipe bake flour oven"]
    mean, logvar = client.encode("docs", texts=texts)
    transform = transform_from_dict(load_bundle(repo / "docs" / "1").manifest["transform"])
    assert logvar is None
    assert_same(mean, ort(repo, "docs", "encoder", transform.apply(texts))[0])


def test_decode_reconstruct_and_png(client, repo, digits_x):
    z = client.encode("digits", digits_x)[0]
    dec = client.decode("digits", z, return_png=True)
    assert_same(dec.x, ort(repo, "digits", "decoder", z)[0])
    assert len(dec.png) == 16 and Image.open(io.BytesIO(dec.png[0])).size == (8, 8)
    rec = client.reconstruct("digits", digits_x)
    assert_same(rec.x, dec.x)
    assert_same(rec.latents, z)


def test_generate_is_seeded_and_follows_the_prior(client, repo):
    a = client.generate("digits", count=8, seed=3)
    b = client.generate("digits", count=8, seed=3)
    c = client.generate("digits", count=8, seed=4)
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, c.x)
    want_z = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    assert np.allclose(a.latents, want_z)
    assert_same(a.x, ort(repo, "digits", "decoder", a.latents)[0])
    cold = client.generate("digits", count=8, seed=3, temperature=0.5)
    assert np.allclose(cold.latents, want_z * 0.5)


def test_interpolate_linear_and_spherical(client, digits_x):
    ends = client.encode("digits", digits_x[:2])[0]
    line = client.interpolate("digits", digits_x[:2], steps=5)
    assert line.x.shape == (5, 64)
    assert np.allclose(line.latents[0], ends[0], atol=1e-6) and np.allclose(line.latents[-1], ends[1], atol=1e-6)
    assert np.allclose(line.latents[2], (ends[0] + ends[1]) / 2, atol=1e-6)
    arc = client.interpolate("digits", latents=ends, steps=5, spherical=True)
    assert np.allclose(arc.latents[-1], ends[1], atol=1e-5) and not np.allclose(arc.latents[2], line.latents[2])


def test_score_flags_the_unusual(client, digits_x):
    scores, kind = client.score("digits", digits_x)
    assert kind == "neg_elbo" and scores.shape == (16,)
    noise = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    assert client.score("digits", noise)[0].min() > np.median(scores)
    text_scores, text_kind = client.score("docs", texts=["orbit rocket", "brake tire engine"])
    assert text_kind == "squared_error" and text_scores.shape == (2,)


# ------------------------------------------------------------------ batching and bad input


def test_batching_merges_concurrent_requests(server, client, digits_x):
    def one(i):
        return client.encode("digits", digits_x[i % 16 : i % 16 + 1])[0]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(256)))
    assert all(r.shape == (1, 4) for r in results)
    text = server.metrics_text()
    count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith('zspace_batch_rows_count{graph="encoder",model="digits"}')))
    total = float(next(line.split()[-1] for line in text.splitlines() if line.startswith('zspace_batch_rows_sum{graph="encoder",model="digits"}')))
    assert total / count > 1.0, f"mean rows per ONNX Runtime call {total / count:.2f}: nothing was merged"
    assert 'zspace_requests_total{code="OK",method="Encode",model="digits"}' in text


def _bad_requests(digits_x):
    ref = pb.ModelRef(name="digits")
    good = to_tensor(digits_x[:2])
    nan = digits_x[:2].copy()
    nan[0, 0] = np.nan
    bomb = io.BytesIO()
    Image.new("L", (10000, 10000)).save(bomb, format="PNG")
    return [
        ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="nope"), inputs=pb.Inputs(tensor=good)), "NOT_FOUND", "model 'nope'"),
        ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="digits", version=7), inputs=pb.Inputs(tensor=good)), "NOT_FOUND", "no version 7"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(tensor=to_tensor(digits_x[:2, :10]))), "INVALID_ARGUMENT", "inputs.tensor.shape: expected [batch, 64]"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(tensor=pb.Tensor(shape=[2, 64], data=good.data[:-4]))), "INVALID_ARGUMENT", "do not match shape"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(tensor=to_tensor(nan))), "INVALID_ARGUMENT", "NaN or infinity"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(tensor=pb.Tensor(shape=[0, 64]))), "INVALID_ARGUMENT", "empty batch"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(tensor=to_tensor(np.zeros((5000, 64), np.float32)))), "INVALID_ARGUMENT", "over the limit of 4096"),
        ("Encode", pb.EncodeRequest(model=ref), "INVALID_ARGUMENT", "inputs: set one of"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(images=pb.ImageList(images=[b"\x89PNG garbage"]))), "INVALID_ARGUMENT", "inputs.images[0]: not a PNG or JPEG image"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(images=pb.ImageList(images=[bomb.getvalue()]))), "INVALID_ARGUMENT", "more than the limit"),
        ("Encode", pb.EncodeRequest(model=pb.ModelRef(name="docs"), inputs=pb.Inputs(texts=pb.TextList(texts=["ok", "  "]))), "INVALID_ARGUMENT", "inputs.texts[1]: empty text"),
        ("Encode", pb.EncodeRequest(model=ref, inputs=pb.Inputs(texts=pb.TextList(texts=["hello"]))), "INVALID_ARGUMENT", "takes image inputs, not texts"),
        ("Generate", pb.GenerateRequest(model=ref, count=0), "INVALID_ARGUMENT", "count: expected 1 to 4096, got 0"),
        ("Generate", pb.GenerateRequest(model=ref, count=100000), "INVALID_ARGUMENT", "count: expected 1 to 4096"),
        ("Generate", pb.GenerateRequest(model=ref, count=2, temperature=-1), "INVALID_ARGUMENT", "temperature"),
        ("Decode", pb.DecodeRequest(model=ref, latents=to_tensor(np.zeros((2, 3), np.float32))), "INVALID_ARGUMENT", "latents.shape: expected [batch, 4]"),
        ("Interpolate", pb.InterpolateRequest(model=ref, latents=to_tensor(np.zeros((2, 4), np.float32)), steps=1), "INVALID_ARGUMENT", "steps: expected 2"),
        ("Interpolate", pb.InterpolateRequest(model=ref, latents=to_tensor(np.zeros((3, 4), np.float32)), steps=4), "INVALID_ARGUMENT", "exactly 2 endpoints"),
        ("GetModel", pb.GetModelRequest(model=pb.ModelRef(name="")), "INVALID_ARGUMENT", "model.name: required"),
        ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="docs"), count=2, return_png=True), "INVALID_ARGUMENT", "return_png"),
    ]


def test_bad_input_matrix_while_others_are_served(server, client, digits_x):
    stop = threading.Event()
    outcomes: list[bool] = []

    def steady():
        with ZSpaceClient(server.target, timeout=20) as c:
            while not stop.is_set() and len(outcomes) < 5000:
                mean, _ = c.encode("digits", digits_x[:3])
                outcomes.append(mean.shape == (3, 4))

    workers = [threading.Thread(target=steady) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for method, request, code, message in _bad_requests(digits_x):
            with pytest.raises(grpc.RpcError) as err:
                getattr(client.stub, method)(request, timeout=20)
            assert err.value.code().name == code, (method, err.value.details())
            assert message in err.value.details(), (method, err.value.details())
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert outcomes and all(outcomes), "the good clients kept being served"
    assert client.health() == "SERVING"


def test_queue_limit_and_deadline(repo, digits_x):
    s = start_thread(repo, batch=BatchConfig(max_delay_ms=300.0, max_batch=64, max_queue_rows=4))
    try:
        with ZSpaceClient(s.target, timeout=20, retries=1) as c:
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(c.encode, "digits", digits_x[:2]) for _ in range(8)]
                codes = []
                for f in futures:
                    try:
                        f.result()
                        codes.append("OK")
                    except grpc.RpcError as exc:
                        codes.append(exc.code().name)
                        assert "rows are waiting for this model in requests up to 64 rows (limit 4)" in exc.details()
            assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
            with pytest.raises(grpc.RpcError) as err:
                c.stub.Encode(pb.EncodeRequest(model=pb.ModelRef(name="digits"), inputs=pb.Inputs(tensor=to_tensor(digits_x[:1]))), timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert c.encode("digits", digits_x[:1])[0].shape == (1, 4)
    finally:
        s.stop()


# ------------------------------------------------------------------ operations


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"zspace.v1.ZSpace", "grpc.health.v1.Health"} <= services


def test_hot_reload_adds_and_replaces_without_failing_requests(repo, vae_run, digits_x, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(repo / "digits", models / "digits")
    s = start_thread(models)
    stop = threading.Event()
    failures: list[str] = []

    def steady():
        with ZSpaceClient(s.target, timeout=20) as c:
            while not stop.is_set():
                try:
                    c.encode("digits", digits_x[:2])
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)

    worker = threading.Thread(target=steady)
    worker.start()
    try:
        with ZSpaceClient(s.target) as c:
            assert [m.version for m in c.list_models().models] == [1]
            export_run(vae_run, models, "digits")  # version 2 appears
            s.rescan()
            assert c.get_model("digits").version == 2
            shutil.rmtree(models / "digits" / "1")
            s.rescan()
            assert [m.version for m in c.list_models().models] == [2]
            stop.set()
            worker.join(30)
            assert failures == [], "no request may fail while bundles come and go"
            # A damaged replacement (the manifest untouched) is noticed at the next rescan and reported,
            # and the version loaded before keeps serving; once the files are whole again, it reloads.
            good = (models / "digits" / "2" / "decoder.onnx").read_bytes()
            (models / "digits" / "2" / "decoder.onnx").write_bytes(b"corrupted")
            s.rescan()
            resp = c.list_models()
            assert [b.path for b in resp.broken] == ["digits/2"] and [m.version for m in resp.models] == [2]
            assert "decoder.onnx has SHA-256" in resp.broken[0].error and "keeps serving" in resp.broken[0].error
            assert str(models) not in resp.broken[0].error, "no host paths in what clients see"
            assert c.health() == "SERVING" and c.encode("digits", digits_x[:1])[0].shape == (1, 4)
            (models / "digits" / "2" / "decoder.onnx").write_bytes(good)
            s.rescan()
            assert not c.list_models().broken
            # A repository that vanishes for a poll unloads nothing.
            shutil.move(models, tmp_path / "elsewhere")
            s.rescan()
            assert [m.version for m in c.list_models().models] == [2] and c.health() == "SERVING"
            shutil.move(tmp_path / "elsewhere", models)
    finally:
        stop.set()
        worker.join(30)
        s.stop()


def test_tls_and_bearer_token(repo, digits_x, tmp_path):
    cert, key = self_signed(tmp_path)
    s = start_thread(repo, tls_cert=cert, tls_key=key, token="s3cret")
    try:
        target = s.target
        tls = {"tls_ca": cert, "tls_server_name": "localhost"}
        with ZSpaceClient(target, token="s3cret", **tls) as c:
            assert c.encode("digits", digits_x[:2])[0].shape == (2, 4)
        with ZSpaceClient(target, token="wrong", retries=1, **tls) as c:
            assert c.health() == "SERVING"  # health is exempt
            with pytest.raises(grpc.RpcError) as err:
                c.encode("digits", digits_x[:2])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ZSpaceClient(target, retries=1, **tls) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.list_models()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ZSpaceClient(target, token="s3cret", retries=1, timeout=3) as c:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as err:
                c.list_models()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_drains_in_flight_requests(repo, digits_x, loop):
    port = free_port()
    proc = ServerChild(serve_command(repo, port, "--metrics-port", "0", "--max-delay-ms", "1500", "--grace-s", "10",
                                     "--poll-s", "0", "--loop", loop), port, capture=True)
    try:
        proc.wait_serving()
        with ZSpaceClient(proc.target, timeout=20, retries=1) as c:
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                future = pool.submit(c.encode, "digits", digits_x[:1])  # waits ~1.5 s in the batch queue
                time.sleep(0.5)
                proc.terminate()
                mean, _ = future.result(timeout=20)
        assert mean.shape == (1, 4) and time.monotonic() - started >= 1.0
        code, out = proc.wait()
        assert code == 0, out
        assert "draining" in out and "stopped" in out
        assert f"({loop} loop)" in out
    finally:
        proc.kill()


def test_loop_choice_is_checked():
    from zspace.errors import UserError
    from zspace.service.server import event_loop_factory

    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    assert event_loop_factory("auto") is event_loop_factory("uvloop")  # uvloop comes with the serve extra
    with pytest.raises(UserError, match="--loop: expected auto, uvloop or asyncio"):
        event_loop_factory("trio")


@pytest.mark.parametrize("proto", ["zspace/v1/zspace.proto", "zspace/kserve/grpc_service.proto"])
def test_generated_code_matches_the_proto(tmp_path, proto):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / proto)], check=True)
    stem = proto.removesuffix(".proto")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        fresh = (tmp_path / f"{stem}{suffix}").read_text()
        committed = (ROOT / f"{stem}{suffix}").read_text()
        assert fresh == committed, f"{stem}{suffix} is stale: run `make proto`"
    # The gencode must stay importable under protobuf 6 and 7 (tritonclient needs protobuf < 7).
    assert "# Protobuf Python Version: 6." in (ROOT / f"{stem}_pb2.py").read_text()


# ------------------------------------------------------------------ the client CLI




def test_client_cli_generate_writes_pngs_and_npy(server, tmp_path, cli):
    code, out = cli("client", "--target", server.target, "generate", "--model", "digits", "--count", "16", "--seed", "0",
                    "--out", tmp_path / "samples")
    assert code == 0, out
    assert len(list((tmp_path / "samples").glob("samples_*.png"))) == 16
    assert np.load(tmp_path / "samples" / "samples.npy").shape == (16, 64)


def test_client_cli_round_trip_through_files(server, digits_x, tmp_path, cli):
    pngs = []
    for i in range(2):
        path = tmp_path / f"in{i}.png"
        path.write_bytes(png_bytes(digits_x[i]))
        pngs += ["--png", path]
    assert cli("client", "--target", server.target, "health")[1].strip() == "SERVING"
    code, out = cli("client", "--target", server.target, "models")
    listed = json.loads(out)["models"][0]
    assert code == 0 and listed["name"] == "digits"
    assert listed["precision"] == "fp32" and listed["precision_from"] is None and listed["answers_latest"]
    code, out = cli("client", "--target", server.target, "encode", "--model", "digits", *pngs, "--out", tmp_path)
    assert code == 0, out
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (2, 4) and (tmp_path / "logvar.npy").is_file()
    code, out = cli("client", "--target", server.target, "decode", "--model", "digits", "--npy", tmp_path / "codes.npy",
                    "--out", tmp_path / "dec")
    assert code == 0 and len(list((tmp_path / "dec").glob("*.png"))) == 2
    code, out = cli("client", "--target", server.target, "interpolate", "--model", "digits", *pngs, "--steps", "4",
                    "--out", tmp_path / "path")
    assert code == 0 and np.load(tmp_path / "path" / "path.npy").shape == (4, 64)
    code, out = cli("client", "--target", server.target, "score", "--model", "docs", "--text", "orbit rocket")
    assert code == 0 and json.loads(out)["score_kind"] == "squared_error"


def test_client_cli_reports_status_and_message(server, cli):
    code, out = cli("client", "--target", server.target, "generate", "--model", "digits", "--count", "0")
    assert code == 1 and "INVALID_ARGUMENT: count: expected 1 to 4096, got 0" in out
    code, out = cli("client", "--target", server.target, "generate", "--model", "nope")
    assert code == 1 and out.startswith("NOT_FOUND: model 'nope' is not loaded")


def test_serving_side_never_imports_torch():
    code = ("import sys, zspace.service.server, zspace.service.client, zspace.app.cli, zspace.bundle, zspace.data; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, "torch leaked into the serving side"
