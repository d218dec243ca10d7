"""HTTP beside gRPC (`--http-port`): zspace.v1 as JSON, KServe v2 REST driven by the real tritonclient.http,
errors as the gRPC code's status with the field named, the token, TLS, metrics, workers and the OpenAPI document."""

from __future__ import annotations

import base64
import io
import json
import ssl

import grpc
import numpy as np
import pytest
from helpers import http_call, self_signed
from PIL import Image
from serving import digits_served, start_thread

from zspace.data import load_dataset
from zspace.service.client import ZSpaceClient
from zspace.service.config import Limits
from zspace.service.http import HTTP_STATUS


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    return np.ascontiguousarray(load_dataset("digits").x_test[:6], dtype=np.float32)


@pytest.fixture(scope="module")
def served(vae_bundle, tmp_path_factory):
    with digits_served(vae_bundle, tmp_path_factory.mktemp("http"), http_port=0, limits=Limits(max_rows=32)) as s:
        s.base = f"http://127.0.0.1:{s.server.http_port}"
        yield s


def call(s, path: str, method: str = "GET", body=None, **kw):
    status, headers, data = http_call(s.base + path, method, json_body=body, **kw)
    return status, (json.loads(data) if data and headers.get("Content-Type", "").startswith("application/json") else data)


def png_of(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(row.reshape(8, 8) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ zspace.v1 as JSON

def test_models_and_encode_agree_with_grpc(served, digits_x):
    status, listing = call(served, "/v1/models")
    assert status == 200 and listing["models"][0]["name"] == "digits" and listing["broken"] == []
    assert listing["models"][0]["latent_dim"] == 4 and "test_sq_error" in listing["models"][0]["metrics"]
    status, one = call(served, "/v1/models/digits?version=1")
    assert status == 200 and one["version"] == 1 and one["kind"] == "vae"

    status, enc = call(served, "/v1/models/digits/encode", "POST", {"inputs": {"tensor": digits_x[:3].tolist()}})
    assert status == 200 and set(enc) == {"version", "mean", "logvar"}
    with ZSpaceClient(served.target) as c:
        mean, logvar = c.encode("digits", digits_x[:3])
    np.testing.assert_allclose(enc["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(enc["logvar"], logvar, atol=1e-6)

    raw = {"b64": base64.b64encode(digits_x[:3].tobytes()).decode(), "shape": [3, 64], "dtype": "float32"}
    status, enc_raw = call(served, "/v1/models/digits/encode", "POST", {"inputs": {"tensor": raw}})
    assert status == 200 and enc_raw["mean"] == enc["mean"]


def test_images_as_base64_and_as_posted_files_give_the_same_codes(served, digits_x):
    pngs = [png_of(r) for r in digits_x[:2]]
    status, as_json = call(served, "/v1/models/digits/encode", "POST",
                           {"inputs": {"images": [base64.b64encode(p).decode() for p in pngs]}})
    assert status == 200 and len(as_json["mean"]) == 2
    status, as_files = call(served, "/v1/models/digits/encode", "POST", files=[("a", pngs[0]), ("b", pngs[1])])
    assert status == 200 and as_files["mean"] == as_json["mean"]
    # A query posted as a file, with the other fields as form fields: the explorer's "drop an image".
    status, hits = call(served, "/v1/indexes/digits/search", "POST", files=[("image", pngs[0])], fields={"k": "5"})
    assert status == 200 and len(hits["results"][0]) == 5


def test_decoding_endpoints(served, digits_x):
    z = [[0.0, 0.5, -0.5, 1.0]]
    status, dec = call(served, "/v1/models/digits/decode", "POST", {"latents": z, "return_png": True})
    assert status == 200 and np.asarray(dec["outputs"]).shape == (1, 64) and dec["latents"] == z
    assert Image.open(io.BytesIO(base64.b64decode(dec["png"][0]))).size == (8, 8)
    status, pngs_only = call(served, "/v1/models/digits/decode", "POST", {"latents": z, "return_png": True, "tensors": False})
    assert status == 200 and "outputs" not in pngs_only and pngs_only["png"] == dec["png"]
    status, rec = call(served, "/v1/models/digits/reconstruct", "POST", {"inputs": {"tensor": digits_x[:2].tolist()}})
    assert status == 200 and np.asarray(rec["outputs"]).shape == (2, 64)
    status, gen = call(served, "/v1/models/digits/generate", "POST", {"count": 3, "seed": 7, "return_png": True})
    status2, gen2 = call(served, "/v1/models/digits/generate", "POST", {"count": 3, "seed": 7, "return_png": True})
    assert status == status2 == 200 and len(gen["png"]) == 3 and gen["latents"] == gen2["latents"]
    status, path = call(served, "/v1/models/digits/interpolate", "POST",
                        {"latents": [[0, 0, 0, 0], [1, 1, 1, 1]], "steps": 5, "spherical": False})
    assert status == 200 and np.allclose(np.asarray(path["latents"])[:, 0], [0, 0.25, 0.5, 0.75, 1])
    status, scores = call(served, "/v1/models/digits/score", "POST", {"inputs": {"tensor": digits_x[:2].tolist()}})
    assert status == 200 and len(scores["scores"]) == 2 and scores["score_kind"] == "neg_elbo"


def test_index_endpoints_write_read_and_filter(served):
    status, listing = call(served, "/v1/indexes")
    assert status == 200 and listing["indexes"][0]["name"] == "digits"
    status, stats = call(served, "/v1/indexes/digits")
    count = stats["count"]
    keys = ["http/a", "http/b"]
    status, up = call(served, "/v1/indexes/digits/items", "POST",
                      {"keys": keys, "vectors": [[9, 9, 9, 9], [9, 9, 9, 9.1]], "payloads": [{"label": "x"}, {"label": "y"}]})
    assert status == 200 and up["count"] == count + 2
    status, item = call(served, "/v1/indexes/digits/items/http/a")
    assert status == 200 and item["vector"] == [9, 9, 9, 9] and item["payload"] == {"label": "x"}
    for flt in ("label == y", ["label == y"], {"label": "y"}, [{"field": "label", "op": "==", "value": "y"}]):
        status, hits = call(served, "/v1/indexes/digits/search", "POST", {"vectors": [[9, 9, 9, 9]], "k": 3, "filter": flt})
        assert status == 200 and [h["key"] for h in hits["results"][0]] == ["http/b"], flt
    status, hits = call(served, "/v1/indexes/digits/search", "POST", {"key": "http/a", "k": 2, "explain": True})
    assert status == 200 and hits["results"][0][0]["key"] == "http/a" and "plan" in hits
    status, gone = call(served, "/v1/indexes/digits/items/http/a", "DELETE")
    assert status == 200 and gone["count"] == count + 1
    status, gone = call(served, "/v1/indexes/digits/delete", "POST", {"keys": ["http/b"]})
    assert status == 200 and gone["count"] == count
    status, missing = call(served, "/v1/indexes/digits/items/http/a")
    assert status == 404 and missing["code"] == "NOT_FOUND"


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize(("method", "path", "body", "status", "code", "field"), [
    ("POST", "/v1/models/digits/generate", {"count": 0}, 400, "INVALID_ARGUMENT", "count"),
    ("POST", "/v1/models/digits/generate", {"count": "many"}, 400, "INVALID_ARGUMENT", "count"),
    ("POST", "/v1/models/digits/generate", {"cuont": 3}, 400, "INVALID_ARGUMENT", "cuont"),
    ("POST", "/v1/models/nope/generate", {"count": 1}, 404, "NOT_FOUND", None),
    ("POST", "/v1/models/digits/decode", {"latents": [[1, 2, 3]]}, 400, "INVALID_ARGUMENT", "latents.shape"),
    ("POST", "/v1/models/digits/decode", {"latents": [[1, 2, 3, 4], [1]]}, 400, "INVALID_ARGUMENT", "latents[1]"),
    ("POST", "/v1/models/digits/encode", {"inputs": {"images": ["bm90IGFuIGltYWdl"]}}, 400, "INVALID_ARGUMENT", "inputs.images[0]"),
    ("POST", "/v1/models/digits/encode", {"inputs": {"texts": ["a"]}}, 400, "INVALID_ARGUMENT", "inputs.texts"),
    ("POST", "/v1/models/digits/encode", {"inputs": {"tensor": [[0.0] * 64] * 33}}, 400, "INVALID_ARGUMENT", "inputs.tensor"),
    ("POST", "/v1/indexes/digits/search", {"key": "digits/test/0", "k": 0}, 400, "INVALID_ARGUMENT", "k"),
    ("POST", "/v1/indexes/digits/search", {"key": "digits/test/0", "filter": "label ~ 3"}, 400, "INVALID_ARGUMENT", "filter"),
    ("POST", "/v1/indexes/digits/search", {"key": "digits/test/0", "filter": ["label == 3", "x ~ 1"]}, 400,
     "INVALID_ARGUMENT", "filter[1]"),
    ("POST", "/v1/indexes/nope/search", {"key": "x"}, 404, "NOT_FOUND", None),
    ("POST", "/v1/indexes/digits/items", {"keys": ["a"], "vectors": [[1, 2, 3, 4]], "payloads": [{"x": float("nan")}]},
     400, "INVALID_ARGUMENT", "payloads[0]"),
    ("GET", "/v1/nothing-here", None, 404, "NOT_FOUND", None),
    ("DELETE", "/v1/models", None, 405, "UNIMPLEMENTED", None),
])
def test_bad_requests_get_the_grpc_codes_status_and_name_the_field(served, method, path, body, status, code, field):
    got, answer = call(served, path, method, body)
    assert got == status and answer["code"] == code, answer
    assert answer.get("field") == field, answer
    if status != 405:  # an HTTP method the path lacks keeps HTTP's own status
        assert HTTP_STATUS[getattr(grpc.StatusCode, code)] == status


def test_invalid_json_and_oversized_bodies(served):
    status, _, data = http_call(served.base + "/v1/models/digits/generate", "POST", data=b"{not json",
                                headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"].startswith("body: not valid JSON")
    status, _, data = http_call(served.base + "/v1/models/digits/generate", "POST", data=b"[1, 2]",
                                headers={"Content-Type": "application/json"})
    assert status == 400 and "expected a JSON object" in json.loads(data)["error"]
    big = b'{"latents": "' + b"x" * (65 << 20) + b'"}'
    status, _, data = http_call(served.base + "/v1/models/digits/decode", "POST", data=big,
                                headers={"Content-Type": "application/json"})
    assert status == 413 and json.loads(data)["code"] == "RESOURCE_EXHAUSTED"
    status, answer = call(served, "/v1/models/digits/generate", "POST", {"count": 1})  # and the server still serves
    assert status == 200


def test_http_and_grpc_refuse_the_same_request_with_the_same_code(served):
    """The same mistakes through both protocols: the HTTP status is the gRPC code's."""
    from zspace.v1 import zspace_pb2 as pb

    cases = [("/v1/models/digits/decode", {"latents": [[1.0, 2.0]]},
              lambda c: c.stub.Decode(pb.DecodeRequest(model=pb.ModelRef(name="digits"),
                                                       latents=pb.Tensor(shape=[1, 2], data=np.zeros(2, np.float32).tobytes())))),
             ("/v1/models/digits/interpolate", {"latents": [[0, 0, 0, 0], [1, 1, 1, 1]], "steps": 1},
              lambda c: c.stub.Interpolate(pb.InterpolateRequest(
                  model=pb.ModelRef(name="digits"), steps=1,
                  latents=pb.Tensor(shape=[2, 4], data=np.zeros(8, np.float32).tobytes())))),
             ("/v1/indexes/digits/items/none-such", None, lambda c: c.stub.GetItem(pb.GetItemRequest(index="digits", key="none-such")))]
    with ZSpaceClient(served.target, retries=1) as c:
        for path, body, rpc in cases:
            with pytest.raises(grpc.RpcError) as err:
                rpc(c)
            status, answer = call(served, path, "POST" if body is not None else "GET", body)
            assert answer["code"] == err.value.code().name and status == HTTP_STATUS[err.value.code()]
            assert answer["error"] == err.value.details()


# ------------------------------------------------------------------ KServe v2 REST, with tritonclient.http

def test_tritonclient_http_infers_like_grpc(served, digits_x):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = th.InferenceServerClient(f"127.0.0.1:{served.server.http_port}")
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits.encoder") and not c.is_model_ready("nope.encoder")
    assert c.get_server_metadata()["name"] == "zspace"
    meta = c.get_model_metadata("digits.encoder")
    assert meta["inputs"][0]["shape"] == [-1, 64] and [o["name"] for o in meta["outputs"]] == ["mean", "logvar"]
    assert c.get_model_config("digits.decoder")["max_batch_size"] == 32
    with ZSpaceClient(served.target) as g:
        mean, logvar = g.encode("digits", digits_x)
    for binary in (True, False):
        x = th.InferInput("x", list(digits_x.shape), "FP32")
        x.set_data_from_numpy(digits_x, binary_data=binary)
        outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("mean", "logvar")]
        r = c.infer("digits.encoder", [x], outputs=outs, model_version="1", request_id="r1")
        np.testing.assert_allclose(r.as_numpy("mean"), mean, atol=1e-6)
        np.testing.assert_allclose(r.as_numpy("logvar"), logvar, atol=1e-6)
        assert r.get_response()["id"] == "r1"
    z = th.InferInput("z", [2, 4], "FP16")
    z.set_data_from_numpy(np.zeros((2, 4), np.float16))
    assert c.infer("digits.decoder", [z]).as_numpy("x_hat").shape == (2, 64)
    bad = th.InferInput("x", [2, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 63), np.float32))
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits.encoder", [bad])
    assert err.value.status() == "400" and "unexpected shape [2, 63]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        c.infer("nope.encoder", [bad])
    assert err.value.status() == "404"
    c.close()


def test_kserve_rest_json_by_hand(served, digits_x):
    """The REST binding without a client library: nested data, and the binary-data extension's framing checked."""
    body = {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": digits_x[:2].tolist()}]}
    status, r = call(served, "/v2/models/digits.encoder/versions/1/infer", "POST", body)
    assert status == 200 and [o["name"] for o in r["outputs"]] == ["mean", "logvar"] and r["model_version"] == "1"
    assert np.asarray(r["outputs"][0]["data"]).shape == (8,)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]}).encode()
    status, _, data = http_call(served.base + "/v2/models/digits.encoder/infer", "POST", data=head + b"\0" * 200,
                                headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "binary_data_size" in json.loads(data)["error"]
    status, _, data = http_call(served.base + "/v2/models/digits.encoder/infer", "POST", data=head + b"\0" * 300,
                                headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "no input claims" in json.loads(data)["error"]
    status, r = call(served, "/v2/models/digits.encoder/infer", "POST", {"inputs": [{"name": "x", "shape": [1, 64],
                                                                                    "datatype": "BYTES", "data": ["a"]}]})
    assert status == 400 and "datatype 'BYTES' is not accepted" in r["error"]


def test_kserve_rest_system_shared_memory(served, digits_x):
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    c = th.InferenceServerClient(f"127.0.0.1:{served.server.http_port}")
    handle = shm.create_shared_memory_region("zs_http_in", "/zs_http_in", digits_x.nbytes)
    try:
        shm.set_shared_memory_region(handle, [digits_x])
        c.register_system_shared_memory("zs_http_in", "/zs_http_in", digits_x.nbytes)
        assert [r["name"] for r in c.get_system_shared_memory_status()] == ["zs_http_in"]
        x = th.InferInput("x", list(digits_x.shape), "FP32")
        x.set_shared_memory("zs_http_in", digits_x.nbytes)
        r = c.infer("digits.encoder", [x], outputs=[th.InferRequestedOutput("mean")])
        with ZSpaceClient(served.target) as g:
            np.testing.assert_allclose(r.as_numpy("mean"), g.encode("digits", digits_x)[0], atol=1e-6)
        c.unregister_system_shared_memory("zs_http_in")
        assert c.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(handle)
        c.close()


# ------------------------------------------------------------------ the token, TLS, metrics, OpenAPI

def test_token_tls_and_metrics(vae_bundle, tmp_path, digits_x):
    cert, key = self_signed(tmp_path)
    s = start_thread(vae_bundle.parents[1], http_port=0, tls_cert=cert, tls_key=key, token="s3cret")
    try:
        base = f"https://localhost:{s.server.http_port}"
        tls = ssl.create_default_context(cafile=str(cert))
        status, _, data = http_call(base + "/v1/models", context=tls)
        assert status == 401 and json.loads(data)["code"] == "UNAUTHENTICATED"
        status, headers, _ = http_call(base + "/v1/models", headers={"Authorization": "Bearer wrong"}, context=tls)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, data = http_call(base + "/v2/models/digits.encoder", context=tls)
        assert status == 401
        for open_path in ("/v2/health/live", "/v2/health/ready", "/ui/", "/ui/app.js", "/openapi.json"):
            assert http_call(base + open_path, context=tls)[0] == 200, open_path
        status, _, data = http_call(base + "/v1/models/digits/encode", "POST", json_body={"inputs": {"tensor": digits_x[:1].tolist()}},
                                    headers={"Authorization": "Bearer s3cret"}, context=tls)
        assert status == 200 and len(json.loads(data)["mean"][0]) == 4
        with pytest.raises(OSError):  # plain HTTP to the TLS port
            http_call(f"http://127.0.0.1:{s.server.http_port}/v2/health/live")
        assert 'zspace_requests_total{code="OK",method="Encode",model="digits"} 1.0' in s.metrics_text()  # one set of metrics
    finally:
        s.stop()


def test_openapi_documents_every_route_and_nothing_else(served):
    status, doc = call(served, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    app = served.server.http.app
    served_paths = {r.resource.canonical.replace("{key:.+}", "{key}") for r in app.router.routes()
                    if r.resource is not None and r.resource.canonical.startswith(("/v1", "/v2"))}
    assert served_paths == set(doc["paths"])
    for path, ops in doc["paths"].items():
        methods = {r.method.lower() for r in app.router.routes() if r.resource is not None and
                   r.resource.canonical.replace("{key:.+}", "{key}") == path and r.method != "HEAD"}
        assert methods == set(ops), path


def test_http_port_in_use_is_named(vae_bundle, served):
    from zspace.errors import UserError

    with pytest.raises(UserError, match="--http-port: cannot listen"):
        start_thread(vae_bundle.parents[1], http_port=served.server.http_port)


def test_hostile_bodies_never_reach_a_server_error(served):
    """Deep nesting, wrong types in every field, random bytes: each answered 4xx, and the server keeps serving."""
    rng = np.random.default_rng(0)
    deep = b"[" * 100_000 + b"]" * 100_000
    odd_values = [None, True, -1, 2**70, 1e308, "x", [], {}, [[]], [[None]], [["1"]], {"b64": "!!", "shape": [1]},
                  {"tensor": 1}, {"images": [1]}, {"texts": [None]}, [[float("inf")]]]
    fields = ["latents", "inputs", "vectors", "key", "k", "filter", "count", "seed", "steps", "keys", "payloads",
              "return_png", "top_words", "output_dtype", "version", "temperature", "spherical", "explain", "tensors"]
    paths = ["/v1/models/digits/encode", "/v1/models/digits/decode", "/v1/models/digits/generate",
             "/v1/models/digits/interpolate", "/v1/models/digits/reconstruct", "/v1/models/digits/score",
             "/v1/indexes/digits/search", "/v1/indexes/digits/items", "/v1/indexes/digits/delete",
             "/v1/indexes/digits/views", "/v2/models/digits.encoder/infer", "/v2/models/digits.decoder/infer"]
    seen = set()
    for path in paths:
        bodies = [deep, rng.bytes(64), b"\xff\xfe", b"null", b"{}", b'{"inputs": [{"name": "x"}]}']
        for _ in range(12):
            body = {f: odd_values[int(rng.integers(len(odd_values)))] for f in rng.choice(fields, 3, replace=False)}
            bodies.append(json.dumps(body, allow_nan=True).encode())
        for body in bodies:
            status, _, data = http_call(served.base + path, "POST", data=body, headers={"Content-Type": "application/json"})
            assert status == 200 or 400 <= status < 500, (path, body[:80], status, data[:300])  # {} may be valid
            if status != 200:
                seen.add(json.loads(data)["code"])
    assert seen <= {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}, seen
    assert call(served, "/v1/models/digits/generate", "POST", {"count": 1})[0] == 200
