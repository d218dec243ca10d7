"""zspace.v1's operations as JSON over HTTP, under /v1 (the shapes are in /openapi.json).

Each endpoint builds the RPC's request message from the JSON (field names as in the
.proto, so an error that names `latents` or `k` names the JSON field too), calls the
RPC's own handler and turns its answer into JSON:

- tensors as rows of numbers (`[[0.1, 0.2], ...]`), or `{"b64": ..., "shape": [n, d],
  "dtype": "float32" | "float16" | "uint8"}` for raw little-endian bytes;
- images as base64 strings in `inputs.images`, or posted as files (multipart/form-data:
  every file part is an image, in order; the other parts are the JSON fields);
- PNGs in answers as base64 strings; `"tensors": false` leaves the decoded rows out
  (a browser that only shows the PNGs); `"top_words": N` adds, for a document model,
  each decoded row's N heaviest words.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import numpy as np
from aiohttp import web

from zspace.errors import shown
from zspace.index.filters import as_filter, condition
from zspace.service.http import call, json_answer, json_off_loop, off_loop, read_json
from zspace.service.inputs import WIRE, InvalidArgument
from zspace.v1 import zspace_pb2 as pb

DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8}
OPS = {"==": pb.Condition.EQ, "!=": pb.Condition.NE, "in": pb.Condition.IN, "<": pb.Condition.LT,
       "<=": pb.Condition.LE, ">": pb.Condition.GT, ">=": pb.Condition.GE}


# ------------------------------------------------------------------ JSON -> messages

def tensor(value, field: str) -> pb.Tensor:
    """Rows of numbers, or {"b64", "shape", "dtype"}, as a Tensor message."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"b64", "shape", "dtype"})
        if unknown:
            raise InvalidArgument(f"{field}.{unknown[0]}: unknown; a tensor is rows of numbers or {{b64, shape, dtype}}")
        dtype = value.get("dtype", "float32")
        if dtype not in DTYPES:
            raise InvalidArgument(f"{field}.dtype: expected one of {', '.join(DTYPES)}, got {shown(str(dtype))}")
        shape = value.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise InvalidArgument(f"{field}.shape: expected a list of sizes, as [rows, columns]")
        try:
            data = base64.b64decode(value.get("b64", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidArgument(f"{field}.b64: not base64") from None
        return pb.Tensor(shape=shape, data=data, dtype=DTYPES[dtype])
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise InvalidArgument(f"{field}: expected a list of rows of numbers, as [[0.1, 0.2], [0.3, 0.4]]")
    width = len(value[0])
    for i, row in enumerate(value):
        if len(row) != width:
            raise InvalidArgument(f"{field}[{i}]: {len(row)} numbers, but row 0 has {width}; every row has the same width")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise InvalidArgument(f"{field}[{i}]: expected numbers only")
    arr = np.asarray(value, dtype=np.float32)
    return pb.Tensor(shape=list(arr.shape), data=arr.tobytes(), dtype=pb.FLOAT32)


def inputs(value, field: str = "inputs") -> pb.Inputs:
    """{"tensor": rows} | {"images": [base64, ...]} | {"texts": ["...", ...]}."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("tensor", "images", "texts"):
        raise InvalidArgument(f"{field}: expected one of {{\"tensor\": rows}}, {{\"images\": [base64 PNG or JPEG]}} "
                              "or {\"texts\": [strings]} (or post images as files)")
    kind, items = next(iter(value.items()))
    if kind == "tensor":
        return pb.Inputs(tensor=tensor(items, f"{field}.tensor"))
    if not isinstance(items, list):
        raise InvalidArgument(f"{field}.{kind}: expected a list")
    if kind == "texts":
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InvalidArgument(f"{field}.texts[{i}]: expected a string")
        return pb.Inputs(texts=pb.TextList(texts=items))
    images = []
    for i, b in enumerate(items):
        if not isinstance(b, str):
            raise InvalidArgument(f"{field}.images[{i}]: expected a base64 string of a PNG or JPEG")
        if b.startswith("data:"):
            b = b.partition(",")[2]  # a data URL, as a browser's FileReader makes it
        try:
            images.append(base64.b64decode(b, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{field}.images[{i}]: not base64") from None
    return pb.Inputs(images=pb.ImageList(images=images))


def model_ref(request: web.Request, body: dict) -> pb.ModelRef:
    return pb.ModelRef(name=request.match_info["model"], version=integer(body.get("version", request.query.get("version", 0)), "version"))


def integer(value, field: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{field}: expected an integer, got {shown(json.dumps(value))}")
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"{field}: expected an integer, got {shown(value)}") from None


def number(value, field: str, default: float = 0.0) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{field}: expected a number, got {shown(json.dumps(value))}")
    return float(value)


def flag(value, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field}: expected true or false, got {shown(json.dumps(value))}")
    return value


def out_dtype(body: dict) -> int:
    name = body.get("output_dtype", "float32")
    if name not in ("float32", "float16"):
        raise InvalidArgument(f"output_dtype: expected float32 or float16, got {shown(str(name))}")
    return DTYPES[name]


def check_fields(body, allowed: tuple[str, ...]) -> dict:
    """The body is an object of known fields: a misspelt option is an error, not silently ignored."""
    if not isinstance(body, dict):
        raise InvalidArgument(f"body: expected a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in allowed:
            raise InvalidArgument(f"{name}: unknown field (expected some of {', '.join(allowed)})")
    return body


def search_filter(value) -> pb.Filter:
    """The filter language in any of its JSON shapes: "label == 3", ["label == 3", "year >= 2000"],
    {"label": 3}, or conditions [{"field", "op", "value"}]; checked by filters.as_filter, errors naming the part."""
    if isinstance(value, list):
        value = [condition_of(c, f"filter[{i}]") if isinstance(c, dict) else c for i, c in enumerate(value)]
    elif not isinstance(value, (str, dict)):
        raise InvalidArgument("filter: expected a condition, a list of them or {field: value}")
    checked = as_filter(value, "filter")
    return pb.Filter(all=[pb.Condition(field=c.field, op=OPS[c.op], value_json=json.dumps(c.value)) for c in checked])


def condition_of(c: dict, part: str):
    """{"field", "op" (default ==), "value"} as a checked condition."""
    if not (set(c) <= {"field", "op", "value"} and "field" in c and "value" in c):
        raise InvalidArgument(f"{part}: expected {{\"field\", \"op\", \"value\"}}")
    if not isinstance(c["field"], str) or c.get("op", "==") not in OPS:
        raise InvalidArgument(f"{part}: expected a field name and an op, one of {', '.join(OPS)}")
    return condition(c["field"], c.get("op", "=="), c["value"], part)


# ------------------------------------------------------------------ messages -> JSON

def rows(t: pb.Tensor) -> list:
    if not t.shape:
        return []
    return np.frombuffer(t.data, WIRE[t.dtype][0]).reshape(list(t.shape)).astype(np.float64 if t.dtype != pb.UINT8 else np.int64).tolist()


def plain(message) -> dict:
    """A flat message (ModelInfo, IndexInfo) as a dict; numbers stay numbers (protobuf's JSON makes int64 text)."""
    out = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        out[f.name] = list(value) if hasattr(value, "extend") else value  # repeated fields are containers
    return out


def model_info(info: pb.ModelInfo) -> dict:
    out = plain(info)
    out["metrics"] = json.loads(out.pop("metrics_json") or "{}")
    return out


def top_words(x_hat: np.ndarray, vocab: list[str], n: int) -> list[list[list]]:
    """Each decoded document's n heaviest words, [word, weight], heaviest first."""
    order = np.argsort(-x_hat, axis=1)[:, :n]
    return [[[vocab[j], round(float(row[j]), 4)] for j in idx] for row, idx in zip(x_hat, order)]


# ------------------------------------------------------------------ the endpoints

class ApiRoutes:
    """The /v1 endpoints; `models`, `indexes`: the ModelRpcs and IndexRpcs gRPC serves."""

    def __init__(self, models, indexes):
        self.models, self.indexes = models, indexes

    def routes(self) -> list[web.RouteDef]:
        m, i = "/v1/models/{model}", "/v1/indexes/{index}"
        return [
            web.get("/v1/models", self.list_models), web.get(m, self.get_model),
            web.post(m + "/encode", self.encode), web.post(m + "/decode", self.decode),
            web.post(m + "/reconstruct", self.reconstruct), web.post(m + "/generate", self.generate),
            web.post(m + "/interpolate", self.interpolate), web.post(m + "/score", self.score),
            web.get("/v1/indexes", self.list_indexes), web.get(i, self.index_stats),
            web.post(i + "/search", self.search), web.post(i + "/items", self.upsert),
            web.post(i + "/delete", self.delete), web.get(i + "/items/{key:.+}", self.get_item),
            web.delete(i + "/items/{key:.+}", self.delete_one),
        ]

    # -------------------------------------------------------------- bodies

    async def body(self, request: web.Request, allowed: tuple[str, ...]) -> dict:
        """The JSON body, or a multipart form whose file parts are `inputs.images` (in order)."""
        if request.content_type == "multipart/form-data":
            form = await request.post()
            body, images = {}, []
            for name, value in form.items():
                if hasattr(value, "file"):
                    images.append(await asyncio.to_thread(value.file.read))
                else:
                    try:
                        body[name] = json.loads(value)
                    except ValueError:
                        body[name] = value  # a bare string field (a key, a filter)
            check_fields(body, allowed)
            if images:
                if "inputs" in allowed and "inputs" not in body:
                    body["inputs"] = {"images": [base64.b64encode(b).decode() for b in images]}
                else:
                    raise InvalidArgument("files: this endpoint takes no images" if "inputs" not in allowed else
                                          "files: give the images as files or as inputs, not both")
            return body
        return check_fields(await read_json(request), allowed)

    async def _decoding(self, request: web.Request, rpc, make, allowed: tuple[str, ...]) -> web.Response:
        """The decoding RPCs (Decode, Reconstruct, Generate, Interpolate): one answer shape."""
        body = await self.body(request, allowed + ("version", "return_png", "output_dtype", "tensors", "top_words"))
        message = await off_loop(request.content_length or 0, make, body)
        message.model.CopyFrom(model_ref(request, body))
        message.return_png = flag(body.get("return_png"), "return_png")
        message.output_dtype = out_dtype(body)
        words = integer(body.get("top_words"), "top_words")
        if not 0 <= words <= 100:
            raise InvalidArgument(f"top_words: expected 0 to 100, got {words}")
        answer = await call(rpc, message, request)
        out = {"version": answer.version, "latents": rows(answer.latents)}
        with_tensors = body.get("tensors", True)
        if with_tensors or words:
            x_hat = np.frombuffer(answer.outputs.tensor.data, WIRE[answer.outputs.tensor.dtype][0]).reshape(
                list(answer.outputs.tensor.shape))
            if with_tensors:
                out["outputs"] = x_hat.astype(np.float64).tolist()
            if words:
                rt = self.models.repo.get(message.model.name, answer.version)
                if rt.modality != "text":
                    raise InvalidArgument(f"top_words: model {rt.name} outputs {rt.modality}s, not documents")
                out["words"] = top_words(x_hat, rt.transform.vocab, words)
        if answer.outputs.png:
            out["png"] = [base64.b64encode(p).decode() for p in answer.outputs.png]
        return await json_off_loop(out, len(answer.outputs.tensor.data) * 3 if with_tensors else 0)

    # -------------------------------------------------------------- models

    async def list_models(self, request):
        answer = await call(self.models.ListModels, pb.ListModelsRequest(), request)
        return json_answer({"models": [model_info(m) for m in answer.models],
                            "broken": [{"path": b.path, "error": b.error} for b in answer.broken]})

    async def get_model(self, request):
        info = await call(self.models.GetModel, pb.GetModelRequest(model=model_ref(request, {})), request)
        return json_answer(model_info(info))

    async def encode(self, request):
        body = await self.body(request, ("version", "inputs", "output_dtype"))
        ins = await off_loop(request.content_length or 0, inputs, body.get("inputs"))
        answer = await call(self.models.Encode, pb.EncodeRequest(model=model_ref(request, body), inputs=ins,
                                                                 output_dtype=out_dtype(body)), request)
        out = {"version": answer.version, "mean": rows(answer.mean)}
        if answer.HasField("logvar"):
            out["logvar"] = rows(answer.logvar)
        if answer.HasField("bits"):
            out["bits"] = rows(answer.bits)
        return await json_off_loop(out, len(answer.mean.data) * 6)

    async def decode(self, request):
        return await self._decoding(request, self.models.Decode,
                                    lambda b: pb.DecodeRequest(latents=tensor(b.get("latents"), "latents")), ("latents",))

    async def reconstruct(self, request):
        return await self._decoding(request, self.models.Reconstruct,
                                    lambda b: pb.ReconstructRequest(inputs=inputs(b.get("inputs"))), ("inputs",))

    async def generate(self, request):
        def make(b):
            return pb.GenerateRequest(count=integer(b.get("count"), "count", 1), seed=integer(b.get("seed"), "seed"),
                                      temperature=number(b.get("temperature"), "temperature"))
        return await self._decoding(request, self.models.Generate, make, ("count", "seed", "temperature"))

    async def interpolate(self, request):
        def make(b):
            m = pb.InterpolateRequest(steps=integer(b.get("steps"), "steps", 8), spherical=flag(b.get("spherical"), "spherical"))
            if "latents" in b and "inputs" in b:
                raise InvalidArgument("endpoints: give inputs (two items) or latents ([2, latent_dim]), not both")
            if "latents" in b:
                m.latents.CopyFrom(tensor(b["latents"], "latents"))
            elif "inputs" in b:
                m.inputs.CopyFrom(inputs(b["inputs"]))
            return m
        return await self._decoding(request, self.models.Interpolate, make, ("inputs", "latents", "steps", "spherical"))

    async def score(self, request):
        body = await self.body(request, ("version", "inputs"))
        ins = await off_loop(request.content_length or 0, inputs, body.get("inputs"))
        answer = await call(self.models.Score, pb.ScoreRequest(model=model_ref(request, body), inputs=ins), request)
        return json_answer({"version": answer.version, "scores": list(answer.scores), "score_kind": answer.score_kind})

    # -------------------------------------------------------------- indexes

    async def list_indexes(self, request):
        answer = await call(self.indexes.ListIndexes, pb.ListIndexesRequest(), request)
        return json_answer({"indexes": [plain(i) for i in answer.indexes],
                            "broken": [{"path": b.path, "error": b.error} for b in answer.broken]})

    async def index_stats(self, request):
        info = await call(self.indexes.IndexStats, pb.IndexStatsRequest(index=request.match_info["index"]), request)
        return json_answer(plain(info))

    async def search(self, request):
        body = await self.body(request, ("inputs", "vectors", "key", "k", "filter", "explain"))

        def make(b):
            m = pb.SearchRequest(index=request.match_info["index"], k=integer(b.get("k"), "k", 10),
                                 explain=flag(b.get("explain"), "explain"))
            given = [q for q in ("inputs", "vectors", "key") if q in b]
            if len(given) != 1:
                raise InvalidArgument("query: give exactly one of inputs, vectors or key")
            if given[0] == "key":
                if not isinstance(b["key"], str):
                    raise InvalidArgument("key: expected a string")
                m.key = b["key"]
            elif given[0] == "vectors":
                m.vectors.CopyFrom(tensor(b["vectors"], "vectors"))
            else:
                m.inputs.CopyFrom(inputs(b["inputs"]))
            if b.get("filter") not in (None, "", []):
                m.filter.CopyFrom(search_filter(b["filter"]))
            return m

        message = await off_loop(request.content_length or 0, make, body)
        answer = await call(self.indexes.Search, message, request)
        results = [[{"key": h.key, "distance": h.distance, "payload": json.loads(h.payload_json or "{}")}
                    for h in row.hits] for row in answer.results]
        out = {"results": results}
        if answer.plan_json:
            out["plan"] = json.loads(answer.plan_json)
        return json_answer(out)

    async def upsert(self, request):
        body = await self.body(request, ("keys", "inputs", "vectors", "payloads"))

        def make(b):
            keys = b.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise InvalidArgument("keys: expected a list of strings, one per item")
            payloads = b.get("payloads") or []
            if not isinstance(payloads, list) or not all(isinstance(p, dict) for p in payloads):
                raise InvalidArgument("payloads: expected a list of JSON objects, one per item (or none)")
            texts = []
            for i, p in enumerate(payloads):
                try:
                    texts.append(json.dumps(p, allow_nan=False))
                except ValueError:
                    raise InvalidArgument(f"payloads[{i}]: NaN and infinities are not JSON; use null or a string") from None
            m = pb.UpsertRequest(index=request.match_info["index"], keys=keys, payloads_json=texts)
            if ("vectors" in b) == ("inputs" in b):
                raise InvalidArgument("items: give inputs or vectors")
            if "vectors" in b:
                m.vectors.CopyFrom(tensor(b["vectors"], "vectors"))
            else:
                m.inputs.CopyFrom(inputs(b["inputs"]))
            return m

        message = await off_loop(request.content_length or 0, make, body)
        answer = await call(self.indexes.Upsert, message, request)
        return json_answer({"count": answer.count})

    async def delete(self, request):
        body = await self.body(request, ("keys",))
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidArgument("keys: expected a list of strings")
        answer = await call(self.indexes.Delete, pb.DeleteRequest(index=request.match_info["index"], keys=keys), request)
        return json_answer({"count": answer.count})

    async def delete_one(self, request):
        message = pb.DeleteRequest(index=request.match_info["index"], keys=[request.match_info["key"]])
        answer = await call(self.indexes.Delete, message, request)
        return json_answer({"count": answer.count})

    async def get_item(self, request):
        message = pb.GetItemRequest(index=request.match_info["index"], key=request.match_info["key"])
        item = await call(self.indexes.GetItem, message, request)
        return json_answer({"key": item.key, "vector": rows(item.vector)[0], "payload": json.loads(item.payload_json)})

