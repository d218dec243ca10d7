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
import os
import threading
import weakref
from contextlib import contextmanager
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


def wire_array(a) -> tuple[np.ndarray, int]:
    """(an array as it travels, its wire dtype): uint8 (8-bit images, a quarter of the bytes) and float16 as
    they are, everything else as float32; one row becomes a batch of one."""
    a = np.asarray(a)
    dtype, wire = DTYPES.get(a.dtype, (pb.FLOAT32, "<f4"))
    a = np.ascontiguousarray(a, dtype=wire)
    return (a[None] if a.ndim == 1 else a), dtype


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def to_tensor(a: np.ndarray) -> pb.Tensor:
    """An array as a Tensor in the message (see wire_array)."""
    a, dtype = wire_array(a)
    return pb.Tensor(shape=list(a.shape), data=a.tobytes(), dtype=dtype)


def from_tensor(t: pb.Tensor, shared: SharedBuffer | None = None) -> np.ndarray:
    """A Tensor as an array of its own dtype (float16 answers stay float16); one the server wrote into
    shared memory is copied out of SHARED, the buffer the request gave it."""
    if t.HasField("shared"):
        if shared is None or t.shared.region != shared.name:
            raise ValueError(f"the answer is in shared memory region {t.shared.region!r}, which this call did not give")
        return shared.read(t.shared.offset, t.shared.byte_size, WIRE_NUMPY[t.dtype]).reshape(list(t.shape))
    return np.frombuffer(t.data, dtype=WIRE_NUMPY[t.dtype]).reshape(list(t.shape)).copy()


SHARED_MIN_BYTES = 64 << 10  # smaller requests travel in the message: registering and copying would cost more
ALIGN = 64


def new_segment(path: Path, size: int):
    """A new POSIX shared memory segment of SIZE bytes at PATH (/dev/shm/NAME, only for this user), mapped."""
    import mmap

    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class SharedBuffer:
    """A POSIX shared memory segment this client made and registered with the server as one region.

    A request writes its tensor at the start and asks for the answer after it; one buffer serves one call at a
    time (the client keeps a pool). The segment's name is removed when the buffer is closed, or at exit."""

    def __init__(self, client: ZSpaceClient, size: int):
        import uuid

        self.name = f"zspace-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.size = size
        self.path = Path("/dev/shm") / self.name
        self.mapping = new_segment(self.path, size)
        self._unlink = weakref.finalize(self, self.path.unlink, missing_ok=True)  # at close, or at exit
        try:
            client._call("RegisterSharedMemory", pb.RegisterSharedMemoryRequest(region=pb.SharedMemoryRegion(
                name=self.name, key="/" + self.name, offset=0, byte_size=size)))
        except BaseException:
            self._release()
            raise

    def write(self, offset: int, a: np.ndarray) -> pb.SharedRegion:
        flat = a.reshape(-1).view(np.uint8)
        self.mapping[offset : offset + flat.nbytes] = flat.data
        return pb.SharedRegion(region=self.name, offset=offset, byte_size=flat.nbytes)

    def read(self, offset: int, size: int, dtype: str) -> np.ndarray:
        return np.frombuffer(self.mapping[offset : offset + size], dtype=dtype)  # a bytes copy: the buffer is reused

    def close(self, client: ZSpaceClient | None) -> None:
        if client is not None:
            try:  # briefly: a client closing after its server went away must not wait out retries
                client.stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=self.name), timeout=2,
                                                   metadata=client.metadata)
            except grpc.RpcError:
                pass  # the server is gone or restarted: it holds nothing of ours any more
        self._release()

    def _release(self) -> None:
        self.mapping.close()
        self._unlink()


def region_trouble(exc: grpc.RpcError) -> bool:
    """Whether a call failed because of its shared memory (a region the server does not know, a segment it lost,
    an answer's room too small) rather than its content: those are worth one more try with a fresh buffer."""
    details = exc.details() or ""
    return ((exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and "shared memory" in details)
            or (exc.code() == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("output.byte_size")))


def is_local(target: str) -> bool:
    """Whether a target is this machine (loopback or a Unix socket): the only servers that can see our
    /dev/shm (and even then not one in a container of its own, which the first registration finds out)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rpartition(":")[0].strip("[]") if ":" in target else target
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


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


def _decoded(resp: pb.DecodeResponse, shared: SharedBuffer | None = None) -> Decoded:
    return Decoded(from_tensor(resp.outputs.tensor, shared), from_tensor(resp.latents), list(resp.outputs.png),
                   resp.version)


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
                 options: list[tuple[str, object]] | None = None, tls_server_name: str | None = None,
                 shared_memory: bool | None = None):
        """shared_memory: big tensors (64 KiB and more) of Encode, Decode and Reconstruct travel through POSIX
        shared memory registered with the server instead of in the messages. None (default): where the target is
        this machine (loopback, unix:PATH), falling back to messages if the server cannot open our segments (one
        in a container); True: always, failing if it cannot; False: never."""
        self.shared_memory = is_local(target) and Path("/dev/shm").is_dir() if shared_memory is None else shared_memory
        self._shared_required = shared_memory is True
        self._buffers: list[SharedBuffer] = []   # idle, for the next call
        self._all_buffers: list[SharedBuffer] = []
        self._buffers_lock = threading.Lock()
        self._models: dict[tuple[str, int], pb.ModelInfo] = {}
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
        with self._buffers_lock:
            buffers, self._buffers, self._all_buffers = self._all_buffers, [], []
        for buffer in buffers:
            buffer.close(self)
        self.channel.close()

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)

    @contextmanager
    def _shared(self, nbytes: int):
        """A registered buffer of at least NBYTES for one call, or None when the call should use messages."""
        if not self.shared_memory or nbytes < SHARED_MIN_BYTES:
            yield None
            return
        with self._buffers_lock:
            fits = [b for b in self._buffers if b.size >= nbytes]
            buffer = min(fits, key=lambda b: b.size) if fits else None
            if buffer is not None:
                self._buffers.remove(buffer)
        if buffer is None:
            try:
                buffer = SharedBuffer(self, max(nbytes, 1 << 20))
            except (OSError, grpc.RpcError):
                if self._shared_required:
                    raise
                self.shared_memory = False  # e.g. the server is in a container: it cannot see our /dev/shm
                yield None
                return
            with self._buffers_lock:
                self._all_buffers.append(buffer)
        try:
            yield buffer
        finally:
            with self._buffers_lock:
                if buffer in self._all_buffers:
                    self._buffers.append(buffer)

    def _dims(self, model: str, version: int) -> pb.ModelInfo:
        """The model's sizes (what its answers take), asked once per model and version."""
        info = self._models.get((model, version))
        if info is None:
            info = self._models[(model, version)] = self.get_model(model, version)
        return info

    def _answer_bytes(self, model: str, version: int, rows: int, rpc: str, item: int = 4) -> int:
        info = self._dims(model, version)
        if rpc == "Encode":
            k = info.latent_dim
            return rows * (k * item * (2 if info.kind in ("vae", "beta_vae") else 1) + (k // 8 if info.kind == "hash" else 0))
        return rows * info.input_dim * item

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
        request = pb.EncodeRequest(model=pb.ModelRef(name=model, version=version), output_dtype=wire_dtype(output_dtype))
        return self._array_rpc("Encode", request, x, images, texts, 2 if output_dtype == "float16" else 4,
                               lambda resp, buffer: {name: from_tensor(getattr(resp, name), buffer)
                                                     for name in ("mean", "logvar", "bits") if resp.HasField(name)})

    def _array_rpc(self, method: str, request, x, images, texts, item: int, read, field: str = "inputs"):
        """Send REQUEST (Encode, Decode, Reconstruct) with its array X in shared memory where that is on and pays
        (else in the message; images and texts always), and read the answer with read(response, buffer).

        A server that restarted has forgotten our regions, and one reloaded with another model may need more room
        for the answer: either way the call is made again once, with a fresh buffer and the model's sizes asked
        again."""
        if x is not None and (images is not None or texts is not None):
            make_inputs(x, images, texts)  # raises: one input form per call
        for attempt in (1, 2):
            with self._array_call(request.model.name, request.model.version, x, method, item) as (tensor, output, buffer):
                if tensor is None:
                    getattr(request, field).CopyFrom(make_inputs(x, images, texts))
                else:
                    (request.latents if field == "latents" else request.inputs.tensor).CopyFrom(tensor)
                    if output is not None:
                        request.output.CopyFrom(output)
                try:
                    return read(self._call(method, request), buffer)
                except grpc.RpcError as exc:
                    if buffer is None or attempt == 2 or not region_trouble(exc):
                        raise
                    self._models.clear()
                    self._discard(buffer)
        raise AssertionError("unreachable")

    def _discard(self, buffer: SharedBuffer) -> None:
        """Drop a buffer the server no longer knows (it restarted): not back into the pool, its segment removed."""
        with self._buffers_lock:
            if buffer in self._all_buffers:
                self._all_buffers.remove(buffer)
        buffer.close(self)

    @contextmanager
    def _array_call(self, model: str, version: int, x, rpc: str, item: int = 4):
        """(tensor, answer region, buffer) for a call on array X: in shared memory when that is on and X is big,
        else a plain tensor (None, None) or, without X, (None, None, None)."""
        if x is None:
            yield None, None, None
            return
        a, dtype = wire_array(x)
        if not self.shared_memory or a.nbytes < SHARED_MIN_BYTES:
            yield to_tensor(a), None, None
            return
        start = aligned(a.nbytes)  # the answer goes after the tensor, in the same buffer
        with self._shared(start + self._answer_bytes(model, version, len(a), rpc, item)) as buffer:
            if buffer is None:  # shared memory turned out not to work here: the message it is
                yield to_tensor(a), None, None
                return
            tensor = pb.Tensor(shape=list(a.shape), dtype=dtype, shared=buffer.write(0, a))
            yield tensor, pb.SharedRegion(region=buffer.name, offset=start, byte_size=buffer.size - start), buffer

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
        request = pb.DecodeRequest(model=pb.ModelRef(name=model, version=version), return_png=return_png,
                                   output_dtype=wire_dtype(output_dtype))
        return self._array_rpc("Decode", request, z, None, None, 2 if output_dtype == "float16" else 4, _decoded,
                               field="latents")

    def reconstruct(self, model: str, x=None, *, images=None, texts=None, version: int = 0, return_png: bool = False) -> Decoded:
        request = pb.ReconstructRequest(model=pb.ModelRef(name=model, version=version), return_png=return_png)
        return self._array_rpc("Reconstruct", request, x, images, texts, 4, _decoded)

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
