"""The ZSpace gRPC servicer: validate, featurise, run through the batchers, answer.

Every RPC goes through `_call`, which maps failures to status codes in one
place: a bad field -> INVALID_ARGUMENT naming it, an unknown model ->
NOT_FOUND, a full queue -> RESOURCE_EXHAUSTED. Nothing a client sends can
raise out of here: an unexpected error becomes INTERNAL and is logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from zspace.service.batcher import QueueFull
from zspace.service.repository import ModelRepository, ModelRuntime
from zspace.errors import UserError
from zspace.likelihood import kl_standard_normal, log_likelihood, target_of
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc

log = logging.getLogger("zspace.serve")


@dataclass
class Limits:
    max_rows: int = 4096        # rows per request (tensor, images, texts)
    max_generate: int = 4096    # Generate.count
    max_steps: int = 1024       # Interpolate.steps
    max_text_chars: int = 1_000_000
    max_k: int = 1000           # Search.k


class InvalidArgument(Exception):
    pass


def tensor_to_array(t: pb.Tensor, field: str, ndim: int = 2, cols: int | None = None, max_rows: int | None = None) -> np.ndarray:
    """A Tensor message -> float32 array, checking shape, byte length and finiteness."""
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
    want = 4
    for d in shape:
        want *= d
    data = t.data  # each access copies the bytes out of the message: once is enough
    if len(data) != want:
        raise InvalidArgument(f"{field}.data: {len(data)} bytes do not match shape {shape} "
                              f"(expected {want} bytes of little-endian float32)")
    arr = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}.data: contains NaN or infinity")
    return arr


def array_to_tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), data=a.tobytes())


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between two vectors (falls back to a line when they are parallel)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a, b) / max(na * nb, 1e-12))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(omega)


@functools.cache
def _has_model(message_type) -> bool:
    """Whether a request type has a `model` field (hasattr costs an exception on those without)."""
    return "model" in message_type.DESCRIPTOR.fields_by_name


def search_response(results: list[list[tuple[str, float, str]]]) -> pb.SearchResponse:
    """Hits -> SearchResponse, filled in place: half the time of building each Hit and copying it in."""
    response = pb.SearchResponse()
    for hits in results:
        add = response.results.add().hits.add
        for key, distance, payload in hits:
            add(key=key, distance=distance, payload_json=payload)
    return response


class ModelServicer(pb_grpc.ZSpaceServicer):
    def __init__(self, repo: ModelRepository, limits: Limits, metrics=None, indexes=None):
        self.repo, self.limits, self.metrics, self.indexes = repo, limits, metrics, indexes

    # ------------------------------------------------------------ plumbing

    async def _call(self, method: str, request, context, body):
        model = request.model.name if _has_model(type(request)) else ""
        t0 = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            return await body()
        except InvalidArgument as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except UserError as exc:  # e.g. an undecodable image from the transforms
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except KeyError as exc:
            code, message = grpc.StatusCode.NOT_FOUND, exc.args[0]
        except QueueFull as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}; retry later"
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # a bug, not the client's fault: log it, keep serving
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"{method}: internal error (logged on the server)"
        finally:
            if self.metrics:  # label only loaded names: clients must not grow the series without bound
                label = model if model in self.repo.models else ("" if not model else "unknown")
                self.metrics.observe(method, label, code.name, time.monotonic() - t0)
        await context.abort(code, message)

    def _model(self, ref: pb.ModelRef) -> ModelRuntime:
        if not ref.name:
            raise InvalidArgument("model.name: required (see ListModels)")
        if ref.version < 0:
            raise InvalidArgument(f"model.version: expected 0 (latest) or a positive version, got {ref.version}")
        return self.repo.get(ref.name, int(ref.version))

    async def _features(self, rt: ModelRuntime, inputs: pb.Inputs, field: str = "inputs") -> np.ndarray:
        """Any of the three input forms -> float32 [batch, input_dim] through the bundle's transform."""
        kind = inputs.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f"{field}: set one of tensor, images or texts")
        if kind == "tensor":
            return tensor_to_array(inputs.tensor, f"{field}.tensor", cols=rt.input_dim, max_rows=self.limits.max_rows)
        items = list(inputs.images.images) if kind == "images" else list(inputs.texts.texts)
        if not items:
            raise InvalidArgument(f"{field}.{kind}: empty batch; send at least one")
        if len(items) > self.limits.max_rows:
            raise InvalidArgument(f"{field}.{kind}: {len(items)} items are over the limit of {self.limits.max_rows}")
        if kind == "images":
            if rt.modality != "image":
                raise InvalidArgument(f"{field}.images: model {rt.name} takes {rt.modality} inputs, not images")
            return await asyncio.to_thread(
                lambda: np.stack([rt.transform.from_bytes(b, f"{field}.images[{i}]") for i, b in enumerate(items)]))
        if rt.modality != "text":
            raise InvalidArgument(f"{field}.texts: model {rt.name} takes {rt.modality} inputs, not texts")
        for i, text in enumerate(items):
            if not text.strip():
                raise InvalidArgument(f"{field}.texts[{i}]: empty text")
            if len(text) > self.limits.max_text_chars:
                raise InvalidArgument(f"{field}.texts[{i}]: {len(text)} characters, over the limit of {self.limits.max_text_chars}")
        return await asyncio.to_thread(rt.transform.apply, items)

    async def _outputs(self, rt: ModelRuntime, x_hat: np.ndarray, return_png: bool) -> pb.Outputs:
        out = pb.Outputs(tensor=array_to_tensor(x_hat))
        if return_png:
            if rt.modality != "image":
                raise InvalidArgument(f"return_png: model {rt.name} outputs {rt.modality}s, not images")
            out.png.extend(await asyncio.to_thread(lambda: [rt.transform.to_png(row) for row in x_hat]))
        return out

    async def _decoded(self, rt: ModelRuntime, z: np.ndarray, return_png: bool) -> pb.DecodeResponse:
        """Decode latents through the batcher; the answer every decoding RPC gives."""
        x_hat = await rt.decode(z)
        return pb.DecodeResponse(outputs=await self._outputs(rt, x_hat, return_png),
                                 latents=array_to_tensor(z), version=rt.version)

    def _info(self, rt: ModelRuntime) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=rt.name, version=rt.version, versions=sorted(self.repo.models.get(rt.name, {})),
            kind=rt.kind, modality=rt.modality, input_dim=rt.input_dim,
            input_shape=rt.manifest.get("input_shape") or [], latent_dim=rt.latent_dim,
            execution_provider=rt.provider, metrics_json=json.dumps(rt.manifest.get("metrics", {})),
            prior=rt.manifest["prior"]["type"],
        )

    # ------------------------------------------------------------ RPCs

    async def ListModels(self, request, context):
        async def body():
            broken = [pb.BrokenModel(path=p, error=e) for p, e in sorted(self.repo.broken.items())]
            return pb.ListModelsResponse(models=[self._info(rt) for rt in self.repo.loaded()], broken=broken)

        return await self._call("ListModels", request, context, body)

    async def GetModel(self, request, context):
        async def body():
            return self._info(self._model(request.model))

        return await self._call("GetModel", request, context, body)

    async def Encode(self, request, context):
        async def body():
            rt = self._model(request.model)
            mean, logvar = await rt.encode(await self._features(rt, request.inputs))
            resp = pb.EncodeResponse(mean=array_to_tensor(mean), version=rt.version)
            if logvar is not None:
                resp.logvar.CopyFrom(array_to_tensor(logvar))
            return resp

        return await self._call("Encode", request, context, body)

    async def Decode(self, request, context):
        async def body():
            rt = self._model(request.model)
            z = tensor_to_array(request.latents, "latents", cols=rt.latent_dim, max_rows=self.limits.max_rows)
            return await self._decoded(rt, z, request.return_png)

        return await self._call("Decode", request, context, body)

    async def Reconstruct(self, request, context):
        async def body():
            rt = self._model(request.model)
            mean, _ = await rt.encode(await self._features(rt, request.inputs))
            return await self._decoded(rt, mean, request.return_png)

        return await self._call("Reconstruct", request, context, body)

    async def Generate(self, request, context):
        async def body():
            rt = self._model(request.model)
            if not 0 < request.count <= self.limits.max_generate:
                raise InvalidArgument(f"count: expected 1 to {self.limits.max_generate}, got {request.count}")
            temperature = request.temperature or 1.0
            if not (np.isfinite(temperature) and temperature > 0):
                raise InvalidArgument(f"temperature: expected a positive number (0 means 1.0), got {request.temperature}")
            z = rt.sample_prior(int(request.count), int(request.seed), float(temperature))
            return await self._decoded(rt, z, request.return_png)

        return await self._call("Generate", request, context, body)

    async def Interpolate(self, request, context):
        async def body():
            rt = self._model(request.model)
            if not 2 <= request.steps <= self.limits.max_steps:
                raise InvalidArgument(f"steps: expected 2 to {self.limits.max_steps} points, got {request.steps}")
            which = request.WhichOneof("endpoints")
            if which == "latents":
                ends = tensor_to_array(request.latents, "latents", cols=rt.latent_dim)
            elif which == "inputs":
                ends = (await rt.encode(await self._features(rt, request.inputs)))[0]
            else:
                raise InvalidArgument("endpoints: set inputs (two items) or latents ([2, latent_dim])")
            if len(ends) != 2:
                raise InvalidArgument(f"{which}: expected exactly 2 endpoints, got {len(ends)}")
            t = np.linspace(0.0, 1.0, int(request.steps))
            path = slerp(ends[0], ends[1], t) if request.spherical else (1 - t)[:, None] * ends[0] + t[:, None] * ends[1]
            return await self._decoded(rt, path.astype(np.float32), request.return_png)

        return await self._call("Interpolate", request, context, body)

    async def Score(self, request, context):
        async def body():
            rt = self._model(request.model)
            x = await self._features(rt, request.inputs)
            mean, logvar = await rt.encode(x)
            x_hat = await rt.decode(mean)
            if rt.is_vae:
                # Deterministic negative ELBO: -log p(x | z = mean) + KL(q(z|x) || N(0, I)).
                scores = -log_likelihood(x, x_hat, rt.likelihood, rt.out_logvar) + kl_standard_normal(mean, logvar)
                kind = "neg_elbo"
            else:
                scores = ((x_hat - target_of(x, rt.likelihood)) ** 2).sum(-1)
                kind = "squared_error"
            return pb.ScoreResponse(scores=scores.astype(np.float32).tolist(), score_kind=kind, version=rt.version)

        return await self._call("Score", request, context, body)


def parse_payloads(payloads_json, n: int) -> list[dict]:
    if not payloads_json:
        return [{} for _ in range(n)]
    if len(payloads_json) != n:
        raise InvalidArgument(f"payloads_json: {len(payloads_json)} payloads for {n} items; give one per key or none")
    out = []
    for i, text in enumerate(payloads_json):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"payloads_json[{i}]: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"payloads_json[{i}]: must be a JSON object, got {type(value).__name__}")
        out.append(value)
    return out


class IndexServicerMixin:
    """Search, Upsert, Delete, GetItem, ListIndexes, IndexStats over the registry's indexes.

    FAISS and SQLite calls block, so they run in threads; the index itself
    serialises writes and lets searches run together.
    """

    def _index_info(self, name: str, index) -> pb.IndexInfo:
        st = index.stats()
        return pb.IndexInfo(name=name, model=st["model"]["name"], model_version=st["model"]["version"], dim=st["dim"],
                            metric=st["metric"], factory=st["factory"], count=st["count"], trained=st["trained"],
                            note=st["training_note"] or "")

    def _index(self, name: str):
        if not name:
            raise InvalidArgument("index: required (see ListIndexes)")
        return self.indexes.get(name)

    async def _codes(self, index, inputs: pb.Inputs, field: str) -> np.ndarray:
        """Raw inputs -> codes through the index's own model and its batcher (VAE kinds: means)."""
        model = index.manifest["model"]
        rt = self.repo.get(model["name"], int(model["version"]))
        return (await rt.encode(await self._features(rt, inputs, field)))[0]

    async def _query_codes(self, index, request, which: str) -> np.ndarray:
        """The `inputs` (encoded by the index's model) or `vectors` field of a request, as codes."""
        if which == "inputs":
            return await self._codes(index, request.inputs, "inputs")
        return tensor_to_array(request.vectors, "vectors", cols=index.dim, max_rows=self.limits.max_rows)

    async def ListIndexes(self, request, context):
        async def body():
            infos = [self._index_info(n, ix) for n, ix in sorted(self.indexes.indexes.items())]
            broken = [pb.BrokenModel(path=p, error=e) for p, e in sorted(self.indexes.broken.items())]
            return pb.ListIndexesResponse(indexes=infos, broken=broken)

        return await self._call("ListIndexes", request, context, body)

    async def IndexStats(self, request, context):
        async def body():
            return self._index_info(request.index, self._index(request.index))

        return await self._call("IndexStats", request, context, body)

    async def Search(self, request, context):
        async def body():
            index = self._index(request.index)
            if not 1 <= request.k <= self.limits.max_k:
                raise InvalidArgument(f"k: expected 1 to {self.limits.max_k}, got {request.k}")
            which = request.WhichOneof("query")
            if which in ("inputs", "vectors"):
                q = await self._query_codes(index, request, which)
            elif which == "key":
                if not request.key:
                    raise InvalidArgument("key: must be a non-empty string")
                q = (await asyncio.to_thread(index.get, request.key)).vector[None]
            else:
                raise InvalidArgument("query: set one of inputs, vectors or key")
            where = None
            if request.filter_field:
                try:
                    where = (request.filter_field, json.loads(request.filter_value_json))
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"filter_value_json: not valid JSON ({exc.msg})") from None
            if where is None:
                results = await self.indexes.search(request.index, q, int(request.k))
            else:
                results = await asyncio.to_thread(index.search, q, int(request.k), where, as_json=True)
            return search_response(results)

        return await self._call("Search", request, context, body)

    async def Upsert(self, request, context):
        async def body():
            index = self._index(request.index)
            keys = list(request.keys)
            which = request.WhichOneof("items")
            if which is None:
                raise InvalidArgument("items: set inputs or vectors")
            codes = await self._query_codes(index, request, which)
            if len(keys) != len(codes):
                raise InvalidArgument(f"keys: {len(keys)} keys for {len(codes)} items; give one key per item")
            payloads = parse_payloads(list(request.payloads_json), len(keys))
            await asyncio.to_thread(index.upsert, keys, codes, payloads)
            return pb.UpsertResponse(count=index.stats()["count"])

        return await self._call("Upsert", request, context, body)

    async def Delete(self, request, context):
        async def body():
            index = self._index(request.index)
            keys = list(request.keys)
            if not keys:
                raise InvalidArgument("keys: give at least one key")
            for i, key in enumerate(keys):
                if not key:
                    raise InvalidArgument(f"keys[{i}]: must be a non-empty string")
            await asyncio.to_thread(index.delete, keys)
            return pb.DeleteResponse(count=index.stats()["count"])

        return await self._call("Delete", request, context, body)

    async def GetItem(self, request, context):
        async def body():
            index = self._index(request.index)
            if not request.key:
                raise InvalidArgument("key: must be a non-empty string")
            item = await asyncio.to_thread(index.get, request.key)
            return pb.Item(key=item.key, vector=array_to_tensor(item.vector[None]), payload_json=json.dumps(item.payload))

        return await self._call("GetItem", request, context, body)


class ZSpaceServicer(IndexServicerMixin, ModelServicer):
    """The whole ZSpace service: model RPCs and index RPCs."""
