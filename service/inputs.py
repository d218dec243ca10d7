"""Request fields -> arrays and back: the checks every RPC shares.

A field that is wrong raises InvalidArgument naming the field and what was
expected; the RPC wrapper (rpc.py) turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from zspace.errors import UserError
from zspace.index.contract import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, json_depth, payload_json
from zspace.service.config import Limits
from zspace.service.pixels import pixel_budget
from zspace.service.shared_memory import REGIONS
from zspace.transforms import image_pixels
from zspace.v1 import zspace_pb2 as pb


class InvalidArgument(UserError):
    """A request field the client must fix; the message names it."""


# Wire dtype -> (numpy little-endian dtype, bytes per element).
WIRE = {pb.FLOAT32: ("<f4", 4), pb.UINT8: ("u1", 1), pb.FLOAT16: ("<f2", 2)}


def tensor_to_array(t: pb.Tensor, field: str, ndim: int = 2, cols: int | None = None, max_rows: int | None = None,
                    uint8_max: float | None = None, raw_uint8: bool = False) -> np.ndarray:
    """A Tensor message -> float32 array, checking dtype, shape, byte length and finiteness.

    UINT8 is accepted only where `uint8_max` says how to read it (8-bit images: value / 255, as the
    image transform itself divides, so a uint8 tensor and its float32 form give the same features),
    or, with raw_uint8, kept as the bytes it is (packed bits for a hamming index)."""
    if t.dtype not in WIRE:
        raise InvalidArgument(f"{field}.dtype: unknown value {t.dtype}; expected FLOAT32, UINT8 or FLOAT16")
    if t.dtype == pb.UINT8 and uint8_max is None and not raw_uint8:
        raise InvalidArgument(f"{field}.dtype: UINT8 is for 8-bit images as model inputs; send FLOAT32 or FLOAT16 here")
    wire, size = WIRE[t.dtype]
    shape = list(t.shape)
    if len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape: expected {ndim} dimensions [batch, {cols or 'dim'}], got {shape}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape: dimensions must be non-negative, got {shape}")
    if shape[0] == 0:
        raise InvalidArgument(f"{field}: empty batch (shape {shape}); send at least one row")
    if max_rows is not None and shape[0] > max_rows:
        raise InvalidArgument(f"{field}: batch of {shape[0]} rows is over the limit of {max_rows}")
    if cols is not None and shape[1] != cols:
        raise InvalidArgument(f"{field}.shape: expected [batch, {cols}], got {shape}")
    want = size
    for d in shape:
        want *= d
    if t.HasField("shared"):
        ref = t.shared
        if t.data:
            raise InvalidArgument(f"{field}: give data or shared, not both")
        if ref.byte_size != want:
            raise InvalidArgument(f"{field}.shared.byte_size: {ref.byte_size} bytes do not match shape {shape} "
                                  f"(expected {want} bytes of {pb.DType.Name(t.dtype).lower()})")
        arr = REGIONS.read(ref.region, ref.offset, want, wire, f"{field}.shared").reshape(shape)
    else:
        data = t.data  # each access copies the bytes out of the message: once is enough
        if len(data) != want:
            raise InvalidArgument(f"{field}.data: {len(data)} bytes do not match shape {shape} "
                                  f"(expected {want} bytes of {pb.DType.Name(t.dtype).lower()})")
        arr = np.frombuffer(data, dtype=wire).reshape(shape)
    if raw_uint8 and t.dtype == pb.UINT8:
        return arr
    return as_float32(arr, uint8_max if t.dtype == pb.UINT8 else None, f"{field}.data")


def as_float32(arr: np.ndarray, uint8_max: float | None, field: str) -> np.ndarray:
    """Wire values as the model's float32 features: 8-bit values divided by `uint8_max` (a given scale means
    the values are uint8 and cannot be NaN), floats checked finite. Shared by zspace.v1 and KServe inputs."""
    if uint8_max is not None:
        return arr.astype(np.float32) / np.float32(uint8_max)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}: contains NaN or infinity")
    return arr


def array_to_tensor(a: np.ndarray, dtype: int = pb.FLOAT32) -> pb.Tensor:
    """An answer's array as a Tensor of `dtype` (FLOAT32, or FLOAT16 on request)."""
    a = np.ascontiguousarray(a, dtype=WIRE[dtype][0])
    return pb.Tensor(shape=list(a.shape), data=a.tobytes(), dtype=dtype)


class SharedOutput:
    """Where a request asked its answer's tensors to go (`output`, a SharedRegion): written back to back, each
    Tensor of the answer saying where its bytes are. `room` is checked before any work (`check`)."""

    def __init__(self, ref: pb.SharedRegion | None, field: str):
        self.ref, self.field, self.cursor = ref, field, 0

    @classmethod
    def of(cls, request, field: str = "output") -> SharedOutput:
        """The request's answer region; none when it gives none or has no such field (Generate, Interpolate)."""
        given = field in request.DESCRIPTOR.fields_by_name and request.HasField(field)
        return cls(getattr(request, field) if given else None, field)

    def check(self, nbytes: int) -> None:
        """The answer's tensors, NBYTES in all, fit the region given (refused before the work is done)."""
        if self.ref is not None and nbytes > self.ref.byte_size:
            raise InvalidArgument(f"{self.field}.byte_size: the answer needs {nbytes} bytes, {self.ref.byte_size} given")

    def tensor(self, a: np.ndarray, dtype: int = pb.FLOAT32) -> pb.Tensor:
        """A as a Tensor: in the message, or written into the region at the cursor."""
        if self.ref is None:
            return array_to_tensor(a, dtype)
        a = np.ascontiguousarray(a, dtype=WIRE[dtype][0])
        offset = self.ref.offset + self.cursor
        REGIONS.write(self.ref.region, offset, self.ref.byte_size - self.cursor, a, self.field)
        self.cursor += a.nbytes
        return pb.Tensor(shape=list(a.shape), dtype=dtype,
                         shared=pb.SharedRegion(region=self.ref.region, offset=offset, byte_size=a.nbytes))


def output_dtype(request, field: str = "output_dtype") -> int:
    """The dtype a request asks its answer in: FLOAT32 (default) or FLOAT16."""
    dtype = getattr(request, field)
    if dtype not in (pb.FLOAT32, pb.FLOAT16):
        raise InvalidArgument(f"{field}: expected FLOAT32 or FLOAT16, got {pb.DType.Name(dtype) if dtype in WIRE else dtype}")
    return dtype


def uint8_max(rt) -> float | None:
    """How a model reads 8-bit inputs: images in [0, 1] are pixel / 255; other models take no UINT8."""
    return 255.0 if rt.modality == "image" else None


def input_rows(inputs: pb.Inputs) -> int:
    """How many items an Inputs message holds, from its fields alone (nothing decoded): what a request's
    cheap checks (hits, keys, answer size) need before any image is decoded or text weighed."""
    kind = inputs.WhichOneof("kind")
    if kind == "tensor":
        return max(0, int(inputs.tensor.shape[0])) if len(inputs.tensor.shape) else 0
    if kind == "images":
        return len(inputs.images.images)
    if kind == "texts":
        return len(inputs.texts.texts)
    return 0


async def features(rt, inputs: pb.Inputs, field: str, limits: Limits) -> np.ndarray:
    """Any of the three input forms -> float32 [batch, input_dim] through the model's own transform.

    `rt` is a loaded model (repository.ModelRuntime). Decoding images and
    weighting words take milliseconds, so they run in a thread."""
    kind = inputs.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{field}: set one of tensor, images or texts")
    if kind == "tensor":
        return tensor_to_array(inputs.tensor, f"{field}.tensor", cols=rt.input_dim, max_rows=limits.max_rows,
                               uint8_max=uint8_max(rt))
    items = list(inputs.images.images) if kind == "images" else list(inputs.texts.texts)
    if not items:
        raise InvalidArgument(f"{field}.{kind}: empty batch; send at least one")
    if len(items) > limits.max_rows:
        raise InvalidArgument(f"{field}.{kind}: {len(items)} items are over the limit of {limits.max_rows}")
    if kind == "images":
        if rt.modality != "image":
            raise InvalidArgument(f"{field}.images: model {rt.name} takes {rt.modality} inputs, not images")
        return await decode_images(rt, items, f"{field}.images", limits)
    if rt.modality != "text":
        raise InvalidArgument(f"{field}.texts: model {rt.name} takes {rt.modality} inputs, not texts")
    return await asyncio.get_running_loop().run_in_executor(featurise_pool(), weigh_texts, rt, items, field,
                                                             limits.max_text_chars)


def weigh_texts(rt, texts: list[str], field: str, max_chars: int) -> np.ndarray:
    """Texts checked and weighted through the model's transform (in the pool: the work grows with the text)."""
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise InvalidArgument(f"{field}.texts[{i}]: {len(text)} characters, over the limit of {max_chars}")
        if not text.strip():
            raise InvalidArgument(f"{field}.texts[{i}]: empty text")
    return rt.transform.apply(texts)


_POOL: ThreadPoolExecutor | None = None


def featurise_pool() -> ThreadPoolExecutor:
    """The threads that decode images and weigh words: as many as cores, and only for that.

    Decoding cannot be interrupted once it runs. In a pool of its own, a flood of huge
    images waits here and never takes the threads that index reads and writes use
    (asyncio's default pool), so GetItem and Upsert keep their latency meanwhile."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="featurise")
    return _POOL


async def decode_images(rt, items: list[bytes], field: str, limits: Limits) -> np.ndarray:
    """Images -> features, one image per hop to the pool; nothing of their content is read on the event loop.

    The pixels of the whole request are counted from the headers first, in the pool
    (nothing decoded yet), and bounded; then each image reserves its pixels of the
    server's decode budget (service.pixels) and is decoded in turn, so a request whose
    deadline passes (the @rpc wrapper cancels it) stops before its next image."""
    loop, pool = asyncio.get_running_loop(), featurise_pool()
    sizes = await loop.run_in_executor(pool, request_pixels, items, field, limits.max_request_pixels)
    budget = pixel_budget(limits.max_decode_pixels)
    rows = []
    for i, (data, pixels) in enumerate(zip(items, sizes)):
        async with budget.reserve(pixels):
            rows.append(await loop.run_in_executor(pool, rt.transform.from_bytes, data, f"{field}[{i}]"))
    return np.stack(rows)


def request_pixels(items: list[bytes], field: str, limit: int) -> list[int]:
    """Each image's pixel count from its header; InvalidArgument once the request's sum passes `limit`."""
    sizes, total = [], 0
    for i, data in enumerate(items):
        sizes.append(image_pixels(data, f"{field}[{i}]"))
        total += sizes[-1]
        if total > limit:
            raise InvalidArgument(f"{field}: more than {limit} pixels in all by image {i}; "
                                  "send fewer or smaller images per request")
    return sizes


def parse_payloads(payloads_json, n: int) -> list[dict]:
    if not payloads_json:
        return [{} for _ in range(n)]
    if len(payloads_json) != n:
        raise InvalidArgument(f"payloads_json: {len(payloads_json)} payloads for {n} items; give one per key or none")
    out = []
    for i, text in enumerate(payloads_json):
        out.append(parse_json(text, f"payloads_json[{i}]", MAX_PAYLOAD_BYTES))
        if not isinstance(out[-1], dict):
            raise InvalidArgument(f"payloads_json[{i}]: must be a JSON object, got {type(out[-1]).__name__}")
        payload_json(out[-1], f"payloads_json[{i}]")  # every rule the store applies, before any work is done
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, field: str, max_bytes: int):
    """Standard JSON from a client: bounded in size, no NaN/Infinity, no nesting that exhausts the stack."""
    if len(text) > max_bytes:
        raise InvalidArgument(f"{field}: {len(text)} characters, over the limit of {max_bytes}")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:  # NaN, Infinity
        raise InvalidArgument(f"{field}: {exc}; use null or a string") from None
    except RecursionError:
        raise InvalidArgument(f"{field}: nested too deeply") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{field}: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value
