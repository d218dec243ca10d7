"""A Python client for the zspace service: numpy arrays in and out.

    from zspace.service.client import ZSpaceClient
    with ZSpaceClient("127.0.0.1:50051") as c:
        mean, logvar = c.encode("digits", x)                # x: float32 [batch, input_dim]
        images = c.generate("digits", count=16, seed=0).x   # [16, input_dim]

Transient failures (UNAVAILABLE: server starting, restarting, draining) are
retried by gRPC itself with exponential backoff (the channel's retry policy).
Any other failure raises grpc.RpcError with the server's status and message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zspace.errors import UserError
from zspace.index.filters import as_filter
from zspace.index.hits import Hit
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc

# numpy dtype -> wire dtype; anything else travels as float32.
DTYPES = {np.dtype(np.uint8): (pb.UINT8, "u1"), np.dtype(np.float16): (pb.FLOAT16, "<f2")}
WIRE_NUMPY = {pb.FLOAT32: "<f4", pb.UINT8: "u1", pb.FLOAT16: "<f2"}


def to_tensor(a: np.ndarray) -> pb.Tensor:
    """An array as a Tensor: uint8 (8-bit images, a quarter of the bytes) and float16 travel as they are,
    everything else as float32."""
    a = np.asarray(a)
    dtype, wire = DTYPES.get(a.dtype, (pb.FLOAT32, "<f4"))
    a = np.ascontiguousarray(a, dtype=wire)
    if a.ndim == 1:
        a = a[None]
    return pb.Tensor(shape=list(a.shape), data=a.tobytes(), dtype=dtype)


def from_tensor(t: pb.Tensor) -> np.ndarray:
    """A Tensor as an array of its own dtype (float16 answers stay float16)."""
    return np.frombuffer(t.data, dtype=WIRE_NUMPY[t.dtype]).reshape(list(t.shape)).copy()


def wire_dtype(name: str) -> int:
    if name not in ("float32", "float16"):
        raise ValueError(f"output_dtype: expected float32 or float16, got {name!r}")
    return pb.FLOAT16 if name == "float16" else pb.FLOAT32


def make_inputs(x: np.ndarray | None = None, images: list[bytes] | None = None, texts: list[str] | None = None) -> pb.Inputs:
    given = [v is not None for v in (x, images, texts)]
    if sum(given) != 1:
        raise ValueError("give exactly one of x (array), images (PNG/JPEG bytes) or texts")
    if x is not None:
        return pb.Inputs(tensor=to_tensor(x))
    if images is not None:
        return pb.Inputs(images=pb.ImageList(images=list(images)))
    return pb.Inputs(texts=pb.TextList(texts=list(texts)))


@dataclass
class Decoded:
    x: np.ndarray          # outputs in data space [batch, input_dim]
    latents: np.ndarray    # the decoded codes [batch, latent_dim]
    png: list[bytes] = field(default_factory=list)
    version: int = 0


def _decoded(resp: pb.DecodeResponse) -> Decoded:
    return Decoded(from_tensor(resp.outputs.tensor), from_tensor(resp.latents), list(resp.outputs.png), resp.version)


def channel_target(target: str) -> tuple[str, bool]:
    """(the gRPC target, whether calls should be balanced over several servers).

    "HOST:PORT" is one server. "H1:P1,H2:P2,..." lists replicas: their addresses go into
    gRPC's own `ipv4:`/`ipv6:` target (names are resolved once, here), and the channel
    balances calls round robin over them, without a proxy. "dns:///NAME:PORT" asks DNS,
    which gRPC re-resolves (a Kubernetes headless service, compose's service name), and
    is balanced round robin too."""
    import socket

    if target.startswith("dns:"):
        return target, True
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if len(parts) < 2:
        return target, False
    families, addresses = set(), []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise UserError(f"--target: {part!r} is not HOST:PORT")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise UserError(f"--target: cannot resolve {host!r} ({exc.strerror})") from None
        families.add(family)
        addresses.append(f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}")
    if len(families) > 1:
        raise UserError("--target: a mix of IPv4 and IPv6 replicas; list one family, or use dns:///NAME:PORT")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    return f"{scheme}:{','.join(addresses)}", True


def retry_config(attempts: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": "zspace.v1.ZSpace"}, {"service": "grpc.health.v1.Health"}],
        "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


OPERATORS = {"==": pb.Condition.EQ, "!=": pb.Condition.NE, "in": pb.Condition.IN, "<": pb.Condition.LT,
             "<=": pb.Condition.LE, ">": pb.Condition.GT, ">=": pb.Condition.GE}


def filter_message(where) -> pb.Filter:
    """A search filter in any shape zspace.index.filters.as_filter takes, as the request's Filter message:
    {"label": 3} (each field an equality, a list meaning IN), "year >= 2000" or a list of such
    strings (AND), or Conditions. A malformed filter raises FilterError (a ValueError) here, before
    anything is sent."""
    message = pb.Filter()
    for c in as_filter(where):
        message.all.add(field=c.field, op=OPERATORS[c.op], value_json=json.dumps(list(c.value) if c.op == "in" else c.value))
    return message


class ZSpaceClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 timeout: float | None = 30.0, retries: int = 5, max_message_mb: int = 64,
                 options: list[tuple[str, object]] | None = None, tls_server_name: str | None = None):
        limit = max_message_mb * 1024 * 1024
        opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        target, balanced = channel_target(target)  # several replicas: round robin over them (see channel_target)
        if balanced:
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if retries > 1:  # gRPC wants at least 2 attempts in a retry policy; 1 means no retries
            opts += [("grpc.enable_retries", 1), ("grpc.service_config", retry_config(retries))]
        else:
            opts += [("grpc.enable_retries", 0)]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        opts += options or []
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.ZSpaceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def __enter__(self) -> ZSpaceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)

    # -------------------------------------------------------------- RPCs

    def health(self, service: str = "") -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def list_models(self) -> pb.ListModelsResponse:
        return self._call("ListModels", pb.ListModelsRequest())

    def get_model(self, model: str, version: int = 0) -> pb.ModelInfo:
        return self._call("GetModel", pb.GetModelRequest(model=pb.ModelRef(name=model, version=version)))

    def encode_all(self, model: str, x=None, *, images=None, texts=None, version: int = 0,
                   output_dtype: str = "float32") -> dict[str, np.ndarray]:
        """Every code Encode answers, by name: mean; logvar (VAE kinds); bits (hash models: uint8, packed)."""
        resp = self._call("Encode", pb.EncodeRequest(model=pb.ModelRef(name=model, version=version),
                                                     inputs=make_inputs(x, images, texts),
                                                     output_dtype=wire_dtype(output_dtype)))
        return {name: from_tensor(getattr(resp, name)) for name in ("mean", "logvar", "bits") if resp.HasField(name)}

    def encode(self, model: str, x=None, *, images=None, texts=None, version: int = 0, output_dtype: str = "float32"):
        """-> (mean [batch, K], logvar [batch, K] or None). x as uint8 (8-bit images) travels at a quarter of the bytes;
        output_dtype="float16" halves the answer's."""
        codes = self.encode_all(model, x, images=images, texts=texts, version=version, output_dtype=output_dtype)
        return codes["mean"], codes.get("logvar")

    def encode_bits(self, model: str, x=None, *, images=None, texts=None, version: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A hash model's codes: (each bit's probability [batch, bits] float32, the bits packed 8 to a byte
        [batch, bits / 8] uint8, numpy.packbits order); the packed bits are what a hamming index stores."""
        codes = self.encode_all(model, x, images=images, texts=texts, version=version)
        if "bits" not in codes:
            raise ValueError(f"{model}: not a hash model (its Encode answers no bits)")
        return codes["mean"], codes["bits"]

    def decode(self, model: str, z: np.ndarray, version: int = 0, return_png: bool = False,
               output_dtype: str = "float32") -> Decoded:
        return _decoded(self._call("Decode", pb.DecodeRequest(
            model=pb.ModelRef(name=model, version=version), latents=to_tensor(z), return_png=return_png,
            output_dtype=wire_dtype(output_dtype))))

    def reconstruct(self, model: str, x=None, *, images=None, texts=None, version: int = 0, return_png: bool = False) -> Decoded:
        return _decoded(self._call("Reconstruct", pb.ReconstructRequest(
            model=pb.ModelRef(name=model, version=version), inputs=make_inputs(x, images, texts), return_png=return_png)))

    def generate(self, model: str, count: int, seed: int = 0, temperature: float = 1.0, version: int = 0,
                 return_png: bool = False) -> Decoded:
        return _decoded(self._call("Generate", pb.GenerateRequest(
            model=pb.ModelRef(name=model, version=version), count=count, seed=seed, temperature=temperature,
            return_png=return_png)))

    def interpolate(self, model: str, x=None, *, images=None, texts=None, latents=None, steps: int = 8,
                    spherical: bool = False, version: int = 0, return_png: bool = False) -> Decoded:
        req = pb.InterpolateRequest(model=pb.ModelRef(name=model, version=version), steps=steps,
                                    spherical=spherical, return_png=return_png)
        if latents is not None:
            req.latents.CopyFrom(to_tensor(latents))
        else:
            req.inputs.CopyFrom(make_inputs(x, images, texts))
        return _decoded(self._call("Interpolate", req))

    def score(self, model: str, x=None, *, images=None, texts=None, version: int = 0) -> tuple[np.ndarray, str]:
        resp = self._call("Score", pb.ScoreRequest(model=pb.ModelRef(name=model, version=version),
                                                   inputs=make_inputs(x, images, texts)))
        return np.asarray(resp.scores, np.float32), resp.score_kind

    # -------------------------------------------------------------- indexes

    def list_indexes(self) -> pb.ListIndexesResponse:
        return self._call("ListIndexes", pb.ListIndexesRequest())

    def index_stats(self, index: str) -> pb.IndexInfo:
        return self._call("IndexStats", pb.IndexStatsRequest(index=index))

    def search(self, index: str, x=None, *, images=None, texts=None, vectors=None, key: str | None = None,
               k: int = 10, where=None) -> list[list[Hit]]:
        """Nearest stored items per query: [Hit(key, distance, payload), ...], nearest first.

        where: a payload filter, every condition holding: {"label": "coat"}, {"cat": [1, 2]} (IN),
        "year >= 2000", ["label == 3", "year < 2000"]; a number and its string match each other
        (7 and "7")."""
        return self.search_explained(index, x, images=images, texts=texts, vectors=vectors, key=key, k=k,
                                     where=where)[0]

    def search_explained(self, index: str, x=None, *, images=None, texts=None, vectors=None, key: str | None = None,
                         k: int = 10, where=None, explain: bool = False) -> tuple[list[list[Hit]], dict | None]:
        """search(), and with explain=True the server's plan of the filter (how many items it matches, which
        fields came from payload indexes, exact or ANN)."""
        req = pb.SearchRequest(index=index, k=k, explain=explain)
        if key is not None:
            req.key = key
        elif vectors is not None:
            req.vectors.CopyFrom(to_tensor(vectors))
        else:
            req.inputs.CopyFrom(make_inputs(x, images, texts))
        if where is not None:
            req.filter.CopyFrom(filter_message(where))
        resp = self._call("Search", req)
        hits = [[Hit(h.key, h.distance, json.loads(h.payload_json)) for h in hits.hits] for hits in resp.results]
        return hits, (json.loads(resp.plan_json) if resp.plan_json else None)

    def upsert(self, index: str, keys: list[str], x=None, *, images=None, texts=None, vectors=None,
               payloads: list[dict] | None = None) -> int:
        req = pb.UpsertRequest(index=index, keys=list(keys), payloads_json=[json.dumps(p) for p in payloads or []])
        if vectors is not None:
            req.vectors.CopyFrom(to_tensor(vectors))
        else:
            req.inputs.CopyFrom(make_inputs(x, images, texts))
        return self._call("Upsert", req).count

    def delete(self, index: str, keys: list[str]) -> int:
        return self._call("Delete", pb.DeleteRequest(index=index, keys=list(keys))).count

    def get_item(self, index: str, key: str) -> tuple[np.ndarray, dict]:
        item = self._call("GetItem", pb.GetItemRequest(index=index, key=key))
        return from_tensor(item.vector)[0], json.loads(item.payload_json)
