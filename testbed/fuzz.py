"""Property-based fuzzing of every RPC of both protocols (zspace.v1 and KServe v2) against a real server.

Requests are drawn from the services' own descriptors, field by field, so a new RPC or
field is fuzzed without a line here; the values lean towards what breaks servers: odd
Unicode, JSON with lone-surrogate escapes and deep nesting, extreme and non-finite
numbers, huge repetitions of one element, shapes that disagree with their bytes, and
image bytes whose headers lie. Used by tests/test_fuzz.py (bounded in count and time)
and by `python -m benchmarks.redteam --fuzz N` (longer, with a report).

The property: every request is answered within its deadline, with a status that is
not INTERNAL or UNKNOWN (a bug), and the server stays up.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from zspace.kserve import grpc_service_pb2 as kpb
from zspace.v1 import zspace_pb2 as pb

SERVICES = (pb.DESCRIPTOR.services_by_name["ZSpace"], kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
RPCS = [(service, method) for service in SERVICES for method in service.methods]
BAD_STATUSES = ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")  # a bug, or a hang

ODD_TEXTS = ["", "²", "١", "\x00", "\u202e", "\U0001d518\U0001d52b", "é" * 300, "x" * 70_000, '"', "\\", "'; --",
             "../../etc/passwd", "digits\x00", " digits", "DIGITS", "\ufeff", "\U0010ffff"]
NAMES = ["digits", "digits.encoder", "digits.decoder", "digits.", ".encoder", "nope", "nope.encoder"]
VERSIONS = ["", "1", "2", "0", "-1", "²", "١", "01", "1.0", "99999999999999999999999"]
DATATYPES = ["FP32", "FP16", "UINT8", "INT64", "BYTES", "fp32", ""]
JSON_TEXTS = ['{"\\ud800": 1}', '"\\ud800"', '"\\udfff"', '{"a": "\\ud83d\\ude00"}', "NaN", "Infinity", "-0", "1e999",
              '{"a": ' * 100 + "1" + "}" * 100, "[" * 5000 + "]" * 5000, "{}", "[]", "null", "true", "7", '"7"', "{",
              '{"' + "F" * 60_000 + '": 1}', '{"label": 3}', '{"x": "' + "y" * 70_000 + '"}']
INTS = [0, 1, -1, 2, 3, 4, 8, 64, 1000, 1001, 4096, 4097, 65_536, 2**31 - 1, -(2**31), 2**53]
FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, -3e38, float("nan"), float("inf"), float("-inf")]


def png(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG of a gray gradient, or (extra) with more chunks before its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes((x + y) % 256 for x in range(width)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def image_samples() -> list[bytes]:
    good = png(8, 8)
    lying = good[:16] + struct.pack(">II", 100_000, 100_000) + good[24:]  # a header that claims 10 gigapixels
    ztxt = struct.pack(">I", 12) + b"zTXt" + b"k\x00\x00" + zlib.compress(b"x" * 1000)[:9]
    return [good, jpeg(8, 8), png(1, 1), lying, good[:30], good[:8], b"\xff\xd8\xff", b"\xff\xd8\xff\xc0\x00\x11\x08",
            png(4, 4, extra=ztxt * 3), b"GIF89a", b""]


IMAGES = image_samples()


def text(name: str) -> st.SearchStrategy[str]:
    """A proto string: valid Unicode always (protobuf refuses to send lone surrogates), odd otherwise."""
    plain = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
    odd = st.sampled_from(ODD_TEXTS) | plain
    if name in ("name", "model_name"):
        return st.sampled_from(NAMES) | odd
    if name == "index":
        return st.sampled_from(["digits", "nope"]) | odd
    if name in ("version", "model_version"):
        return st.sampled_from(VERSIONS) | odd
    if name == "datatype":
        return st.sampled_from(DATATYPES) | odd
    if name.endswith("_json"):
        return st.sampled_from(JSON_TEXTS) | odd
    if name in ("key", "keys", "filter_field"):
        return st.sampled_from(["digits/test/0", "label", "k", "new/1"]) | odd
    return odd


def scalar(f: FieldDescriptor) -> st.SearchStrategy:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return text(f.name)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from(IMAGES) | st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.sampled_from(FLOATS) | st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values] + [99])
    bits = 32 if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_UINT32) else 64
    lo, hi = (0, 2**bits - 1) if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) else (-(2**(bits - 1)), 2**(bits - 1) - 1)
    return st.sampled_from([i for i in INTS if lo <= i <= hi]) | st.integers(lo, hi)


def tensor() -> st.SearchStrategy[pb.Tensor]:
    """zspace.v1 tensors: mostly consistent (shape, dtype and bytes agree) so the checks behind the first are
    reached, with extreme values; sometimes not."""
    def build(rows: int, cols: int, dtype: int, fill: float, broken: bool) -> pb.Tensor:
        wire = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.UINT8: "u1"}.get(dtype, "<f4")
        with np.errstate(all="ignore"):
            data = np.full((rows, cols), fill if wire != "u1" else 7).astype(wire).tobytes()
        return pb.Tensor(shape=[rows, cols], dtype=dtype, data=data[:-1] if broken else data)
    plain = st.builds(build, st.sampled_from([1, 2, 3, 4096, 4097]), st.sampled_from([4, 64, 5, 1]),
                      st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.UINT8]), st.sampled_from(FLOATS), st.booleans())
    return plain | st.builds(lambda t, ref: pb.Tensor(shape=t.shape, dtype=t.dtype, shared=ref), plain, shared_region())


def shared_region() -> st.SearchStrategy[pb.SharedRegion]:
    """References to shared memory regions: mostly of names nobody registered, with extreme offsets and sizes."""
    return st.builds(pb.SharedRegion, region=text("name"), offset=st.sampled_from([0, 1, 2**40, 2**64 - 1]),
                     byte_size=st.sampled_from([0, 1, 1024, 2**63, 2**64 - 1]))


def infer_request() -> st.SearchStrategy[kpb.ModelInferRequest]:
    """KServe inferences whose input agrees with its bytes, to reach the code after the checks."""
    def build(graph: str, rows: int, datatype: str, fill: float, outputs: list[str], version: str, shm: dict):
        width = 64 if graph == "encoder" else 4
        wire = {"FP32": "<f4", "FP16": "<f2", "UINT8": "u1"}[datatype]
        with np.errstate(all="ignore"):
            data = np.full((rows, width), fill if wire != "u1" else 9).astype(wire).tobytes()
        wanted = kpb.ModelInferRequest.InferRequestedOutputTensor
        request = kpb.ModelInferRequest(
            model_name=f"digits.{graph}", model_version=version, raw_input_contents=[data],
            inputs=[kpb.ModelInferRequest.InferInputTensor(name="x" if graph == "encoder" else "z", datatype=datatype,
                                                           shape=[rows, width])],
            outputs=[wanted(name=n) for n in outputs])
        for key, value in shm.items():  # the shared-memory extension's parameters, on the input and every output
            for tensor in [*request.inputs, *request.outputs]:
                setattr(tensor.parameters[key], {str: "string_param", int: "int64_param", float: "double_param"}[type(value)],
                        value)
        if shm.get("shared_memory_region") is not None and len(shm) > 1:
            del request.raw_input_contents[:]
        return request
    names = st.sampled_from(["mean", "logvar", "x_hat", "nope"])
    outputs = st.lists(names, max_size=3) | st.builds(lambda n, k: [n] * k, names, st.sampled_from([2, 600, 100_000]))
    shm = st.fixed_dictionaries({}, optional={
        "shared_memory_region": text("name") | st.integers(-5, 5),
        "shared_memory_offset": st.sampled_from([0, -1, 2**40, 2**63 - 1, 1.5]),
        "shared_memory_byte_size": st.sampled_from([0, -1, 1024, 2**63 - 1, "x"]),
    })
    return st.builds(build, st.sampled_from(["encoder", "decoder"]), st.sampled_from([1, 7, 4096]),
                     st.sampled_from(["FP32", "FP16", "UINT8"]), st.sampled_from(FLOATS), outputs,
                     st.sampled_from(["", "1", "²"]), shm)


def repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated if hasattr(type(f), "is_repeated") else f.label == FieldDescriptor.LABEL_REPEATED


def value(f: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            key, val = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return st.dictionaries(scalar(key), value(val, depth + 1), max_size=3)
        one = message(f.message_type, depth + 1)
    else:
        one = scalar(f)
    if not repeated(f):
        return one
    if f.name == "shape":
        return st.lists(st.sampled_from([-1, 0, 1, 2, 4, 64, 4096, 2**40]), max_size=4)
    # A few elements, or one small element repeated thousands of times (what a server builds may grow with it).
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        small = st.just(GetMessageClass(f.message_type)())
    elif f.type == FieldDescriptor.TYPE_STRING:
        small = st.sampled_from(["digits/test/0", "a", "²", "mean", ""])
    else:
        small = one
    return st.lists(one, max_size=4) | st.builds(lambda v, n: [v] * n, small, st.sampled_from([50, 5000]))


def message(desc, depth: int = 0) -> st.SearchStrategy:
    cls = GetMessageClass(desc)
    if desc.full_name == "zspace.v1.Tensor":
        return tensor() | st.builds(cls)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: value(f, depth) for f in desc.fields}

    def build(values: dict):
        msg = cls()
        for name, v in values.items():
            f = desc.fields_by_name[name]
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                target = getattr(msg, name)
                for k, item in v.items():
                    target[k].CopyFrom(item)
            elif repeated(f):
                getattr(msg, name).extend(v)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg
    return st.fixed_dictionaries({}, optional=fields).map(build)


def requests() -> st.SearchStrategy[tuple[str, object]]:
    """(full method path, request message) over every RPC of both services."""
    def of(service, method):
        msgs = message(method.input_type)
        if method.name == "ModelInfer":
            msgs = infer_request() | msgs
        return msgs.map(lambda m, path=f"/{service.full_name}/{method.name}": (path, m))
    return st.one_of([of(s, m) for s, m in RPCS])


@dataclass
class Tally:
    """What the fuzzing saw: statuses by RPC, and the requests that answered a bad status."""

    statuses: Counter = field(default_factory=Counter)
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (method, status, the request, shortened)
    tried: int = 0


def send(channel: grpc.Channel, path: str, request, tally: Tally, timeout: float = 20.0) -> str:
    """One request through `channel`; its status name, tallied. The answer's message class is the method's."""
    service, name = path.rsplit("/", 1)
    out = next(m.output_type for s, m in RPCS if m.name == name and f"/{s.full_name}" == service)
    call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=GetMessageClass(out).FromString)
    try:
        call(request, timeout=timeout)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    tally.tried += 1
    tally.statuses[(name, code)] += 1
    if code in BAD_STATUSES:
        tally.bad.append((name, code, str(request)[:300]))
    return code
