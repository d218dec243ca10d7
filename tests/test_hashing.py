"""Semantic hashing end to end: a hash model trained and exported, its bits served by Encode, stored in
hamming indexes (BFlat, BHNSW32) built by the CLI, searched and written over gRPC on loopback; and the
refusals: float codes into a hamming index, bits into a float one, binary factories for float codes."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from helpers import train_run
from serving import start_thread

from zspace.bundle import load_bundle
from zspace.runtime import open_runtime
from zspace.service.client import ZSpaceClient
from zspace.training.export import export_run

BITS = 16


@pytest.fixture(scope="module")
def layout(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("hashing")
    run = train_run(root / "runs" / "hash", model="hash", bits=BITS, hidden=(32,), epochs=4)
    export_run(run, root / "models", "dhash")
    for name, factory in (("flat", None), ("graph", "BHNSW32")):
        code, out = cli("index", "build", "--model", root / "models" / "dhash", "--data", "digits",
                        "--out", root / "indexes" / name, *(["--factory", factory] if factory else []))
        assert code == 0, out
    return root


@pytest.fixture(scope="module")
def server(layout):
    with start_thread(layout / "models", indexes=layout / "indexes") as s:
        yield s


def test_the_bundle_gives_probabilities_and_their_packed_bits(layout):
    bundle = load_bundle(layout / "models" / "dhash" / "1")
    assert bundle.kind == "hash" and bundle.latent_dim == BITS and bundle.graphs["encoder"].outputs == ("mean", "bits")
    runtime = open_runtime(bundle)
    x = np.random.default_rng(0).random((50, bundle.input_dim), dtype=np.float32)
    probs, bits = runtime.encode(x)
    assert probs.dtype == np.float32 and bits.dtype == np.uint8 and bits.shape == (50, BITS // 8)
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(bits, np.packbits(probs > 0.5, axis=1))  # high bit first, as numpy packs


def test_cli_builds_hamming_indexes_with_the_right_defaults(layout, cli):
    code, out = cli("index", "stats", layout / "indexes" / "flat")
    st = json.loads(out)
    assert code == 0 and st["metric"] == "hamming" and st["factory"] == "BFlat" and st["dim"] == BITS
    assert st["count"] == 1438
    code, out = cli("index", "search", layout / "indexes" / "graph", "--key", "digits/train/3", "-k", "5")
    hits = json.loads(out)[0]
    assert code == 0 and hits[0]["distance"] == 0  # itself, or an item with the same bits: ties are common in Hamming space
    assert all(float(h["distance"]).is_integer() and 0 <= h["distance"] <= BITS for h in hits)  # bit counts


@pytest.mark.parametrize("extra, says", [
    (["--factory", "HNSW32"], "a float index; a hamming index holds bits"),
    (["--factory", "BIVF4"], "needs training"),
    (["--metric", "l2", "--factory", "BFlat"], "binary index"),
])
def test_cli_refuses_a_factory_of_the_other_kind(layout, cli, tmp_path, extra, says):
    code, out = cli("index", "build", "--model", layout / "models" / "dhash", "--data", "digits",
                    "--out", tmp_path / "ix", *extra)
    assert code == 2 and says in out, out
    assert not (tmp_path / "ix").exists()


def test_hamming_metric_needs_a_hash_model(vae_bundle, cli, tmp_path):
    code, out = cli("index", "build", "--model", vae_bundle, "--data", "digits", "--out", tmp_path / "ix",
                    "--metric", "hamming")
    assert code == 2 and "a hamming index holds the bits of a hash model" in out, out


def test_encode_answers_bits_and_search_by_inputs_bits_and_key(client, layout):
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    probs, bits = client.encode_bits("dhash", x)
    assert probs.shape == (3, BITS) and bits.dtype == np.uint8 and bits.shape == (3, BITS // 8)
    np.testing.assert_array_equal(bits, np.packbits(probs > 0.5, axis=1))
    mean, logvar = client.encode("dhash", x)
    assert logvar is None and np.allclose(mean, probs)  # no bits taken for a log-variance
    for name in ("flat", "graph"):
        by_inputs = client.search(name, x, k=4)
        by_bits = client.search(name, vectors=bits, k=4)
        by_floats = client.search(name, vectors=np.unpackbits(bits, axis=1).astype(np.float32), k=4)
        assert [[h.distance for h in q] for q in by_inputs] == [[h.distance for h in q] for q in by_bits]
        assert [[h.key for h in q] for q in by_bits] == [[h.key for h in q] for q in by_floats]
        assert by_bits[0][0].distance == pytest.approx(min(h.distance for h in by_bits[0]))
        assert client.search(name, key="digits/train/7", k=1)[0][0].distance == 0


def test_upsert_get_and_delete_bits(client):
    bits = np.array([[0b10110000, 0b00000001]], np.uint8)
    assert client.upsert("flat", ["mine/1"], vectors=bits, payloads=[{"tag": "x"}]) == 1439
    vector, payload = client.get_item("flat", "mine/1")
    assert vector.dtype == np.uint8 and vector.tolist() == bits[0].tolist() and payload == {"tag": "x"}
    hit = client.search("flat", vectors=bits, k=1, where=("tag", "x"))[0][0]
    assert hit.key == "mine/1" and hit.distance == 0
    assert client.delete("flat", ["mine/1"]) == 1438


@pytest.mark.parametrize("index, vectors, says", [
    ("flat", np.full((1, BITS), 0.3, np.float32), "a hamming index holds bits (0 or 1) and these are float codes"),
    ("flat", np.zeros((1, 3), np.uint8), "vectors.shape: expected [batch, 2], got [1, 3]"),
    ("graph", np.zeros((1, 5), np.float32), "vectors.shape: expected [batch, 16], got [1, 5]"),
])
def test_a_hamming_index_refuses_float_codes(client, index, vectors, says):
    with pytest.raises(grpc.RpcError) as err:
        client.upsert(index, ["bad/1"], vectors=vectors)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search(index, vectors=vectors, k=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_float_index_refuses_packed_bits(vae_bundle, tmp_path):
    import shutil

    from zspace.index.build import build_index

    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    build_index(tmp_path / "models" / "digits", "digits", tmp_path / "indexes" / "f", split="test", quiet=True).close()
    with start_thread(tmp_path / "models", indexes=tmp_path / "indexes") as s, ZSpaceClient(s.target, timeout=20) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.upsert("f", ["b/1"], vectors=np.zeros((1, 1), np.uint8))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UINT8 (packed bits) is for hamming indexes" in err.value.details()
        with pytest.raises(ValueError, match="not a hash model"):
            c.encode_bits("digits", np.zeros((1, 64), np.float32))


def test_train_options_of_hash_models(cli, tmp_path):
    for args, says in ((["--model", "hash"], "--bits: a hash model's code is whole bytes"),
                       (["--model", "hash", "--bits", "12"], "a positive multiple of 8"),
                       (["--model", "hash", "--bits", "16", "--latent-dim", "4"], "--latent-dim: a hash model's code size is --bits"),
                       (["--model", "ae", "--latent-dim", "4", "--bits", "16"], "--bits: only for --model hash"),
                       (["--model", "ae"], "--latent-dim: required")):
        code, out = cli("train", "--data", "digits", "--epochs", "1", "--out", tmp_path / "r", *args)
        assert code == 2 and says in out, (args, out)


def test_kserve_metadata_names_the_bits_output(server):
    """KServe v2 sees the same graphs: the encoder's second output is UINT8, a byte per 8 bits."""
    from zspace.kserve import grpc_service_pb2 as kpb
    from zspace.kserve import grpc_service_pb2_grpc as kgrpc

    with grpc.insecure_channel(server.target) as channel:
        meta = kgrpc.GRPCInferenceServiceStub(channel).ModelMetadata(kpb.ModelMetadataRequest(name="dhash.encoder"), timeout=20)
        outputs = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
        assert outputs == {"mean": ("FP32", [-1, BITS]), "bits": ("UINT8", [-1, BITS // 8])}
        x = np.random.default_rng(2).random((2, 64), dtype=np.float32)
        req = kpb.ModelInferRequest(model_name="dhash.encoder", raw_input_contents=[x.tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=[2, 64])
        resp = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=20)
        got = dict(zip([o.name for o in resp.outputs], resp.raw_output_contents))
        probs = np.frombuffer(got["mean"], np.float32).reshape(2, BITS)
        np.testing.assert_array_equal(np.frombuffer(got["bits"], np.uint8).reshape(2, 2), np.packbits(probs > 0.5, axis=1))


def test_the_index_layer_names_the_wrong_kind_of_code(tmp_path):
    """The same refusals without the service: LatentIndex over bits, called with what a library user might pass."""
    from zspace.index.errors import IndexError_
    from zspace.index.latent_index import LatentIndex

    index = LatentIndex.create(tmp_path / "ix", "m", 1, BITS, "BFlat", "hamming")
    for vectors, says in ((np.zeros((1, 3), np.uint8), "packed bits of a 16-bit index need shape [n, 2]"),
                          (np.zeros((1, 5), np.float32), "expected bits [n, 16] (0/1) or packed bits [n, 2]"),
                          (np.full((1, BITS), 0.5, np.float32), "these are float codes")):
        with pytest.raises(IndexError_, match=says.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            index.upsert(["k"], vectors, [{}])
    index.upsert(["k"], np.full((1, 2), 255, np.uint8), [{}])  # every bit set
    assert index.search(np.full((1, 2), 255, np.uint8), 1)[0][0].key == "k"
    assert index.search(np.ones((1, BITS), np.float32), 1)[0][0].distance == 0
    index.close()
    floats = LatentIndex.create(tmp_path / "fx", "m", 1, 4)
    with pytest.raises(IndexError_, match="packed bits \\(uint8\\) given to a float index"):
        floats.upsert(["k"], np.zeros((1, 4), np.uint8), [{}])
    floats.close()


def test_evaluate_reports_the_bits_by_hamming_distance(layout, cli, tmp_path):
    code, out = cli("evaluate", layout / "runs" / "hash", "--baselines", "none", "--json", tmp_path / "e.json")
    report = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and "hamming" in out and report["kind"] == "hash"
    assert 0 <= report["bits"]["precision@10"] <= 1 and "5nn_accuracy" in report["bits"]


def test_client_cli_writes_the_bits(server, cli, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(3).random((2, 64), dtype=np.float32))
    code, out = cli("client", "--target", server.target, "encode", "--model", "dhash", "--npy", tmp_path / "x.npy",
                    "--out", tmp_path / "out")
    assert code == 0 and "bits.npy" in out, out
    probs, bits = np.load(tmp_path / "out" / "codes.npy"), np.load(tmp_path / "out" / "bits.npy")
    assert bits.dtype == np.uint8 and bits.shape == (2, BITS // 8)
    np.testing.assert_array_equal(bits, np.packbits(probs > 0.5, axis=1))
    assert not (tmp_path / "out" / "logvar.npy").exists()


def test_bits_may_differ_only_where_a_probability_sits_on_the_threshold():
    """The parity rule of export and of a GPU provider at load, for packed bits."""
    from zspace.runtime import outputs_apart

    probs = np.array([[0.9, 0.1, 0.50004, 0.2, 0.8, 0.3, 0.7, 0.6]], np.float32)
    bits = np.packbits(probs > 0.5, axis=1)
    near = bits ^ np.packbits(np.array([[0, 0, 1, 0, 0, 0, 0, 0]], bool), axis=1)  # flips the bit at p = 0.50004
    far = bits ^ np.packbits(np.array([[1, 0, 0, 0, 0, 0, 0, 0]], bool), axis=1)   # flips the bit at p = 0.9
    assert outputs_apart([probs + 1e-6, near], [probs, bits]) == pytest.approx(1e-6, abs=1e-7)
    assert outputs_apart([probs, far], [probs, bits]) == float("inf")
