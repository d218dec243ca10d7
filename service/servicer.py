"""The model RPCs of zspace.v1.ZSpace (Encode, Decode, Reconstruct, Generate, Interpolate, Score,
ListModels, GetModel), and `add_zspace_service`, which serves them with the index RPCs (index_rpcs.py)
as the one service.

Each RPC validates its fields, featurises through the model's transform, runs the
graphs through the model's batchers and answers; `@rpc` (rpc.py) maps errors to
status codes and counts the call.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from zspace.bundle import MAX_NAME_CHARS
from zspace.likelihood import kl_standard_normal, log_likelihood, target_of
from zspace.service.config import Limits
from zspace.service.inputs import (
    WIRE,
    InvalidArgument,
    SharedOutput,
    array_to_tensor,
    features,
    input_rows,
    output_dtype,
    tensor_to_array,
)
from zspace.service.repository import ModelRepository, ModelRuntime
from zspace.service.rpc import RpcHandlers, add_service, check_answer_size, rpc
from zspace.service.shared_memory import SharedMemoryRegistry, check_sharing
from zspace.v1 import zspace_pb2 as pb


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between two vectors (falls back to a line when they are parallel)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a, b) / max(na * nb, 1e-12))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(omega)


class ModelRpcs(RpcHandlers):
    RPCS = ("ListModels", "GetModel", "Encode", "Decode", "Reconstruct", "Generate", "Interpolate", "Score")

    def __init__(self, repo: ModelRepository, limits: Limits, metrics=None, admission=None):
        super().__init__(metrics, admission)
        self.repo, self.limits = repo, limits

    def label(self, request) -> str:
        """The model a request names, for metrics: only loaded names, so clients cannot grow the series without bound."""
        ref = getattr(request, "model", None)
        name = ref.name if ref is not None else ""
        return name if not name or name in self.repo.models else "unknown"

    def _model(self, ref: pb.ModelRef) -> ModelRuntime:
        if not ref.name:
            raise InvalidArgument("model.name: required (see ListModels)")
        if len(ref.name) > MAX_NAME_CHARS:  # no loaded model has a longer name
            raise InvalidArgument(f"model.name: {len(ref.name)} characters, over the limit of {MAX_NAME_CHARS}")
        if ref.version < 0:
            raise InvalidArgument(f"model.version: expected 0 (latest) or a positive version, got {ref.version}")
        return self.repo.get(ref.name, int(ref.version))

    def _check_decoded_size(self, rt: ModelRuntime, rows: int, request) -> None:
        """A decoding RPC's answer (rows of outputs, their latents, PNGs if asked), bounded before it is built.

        A PNG of 8-bit pixels is at most its raw bytes plus zlib's and the format's small overheads."""
        item = WIRE[output_dtype(request)][1]
        png = rt.input_dim + rt.input_dim // 64 + 1024 if request.return_png else 0
        shared = SharedOutput.of(request)
        shared.check(rows * rt.input_dim * item)
        inline = 0 if shared.ref is not None else rt.input_dim
        check_answer_size(rows * ((inline + rt.latent_dim) * item + png), self.limits,
                          type(request).__name__.removesuffix("Request"))

    async def _decoded(self, rt: ModelRuntime, z: np.ndarray, request) -> pb.DecodeResponse:
        """Decode latents through the batcher; the answer every decoding RPC gives (PNGs and dtype as asked).
        Each caller has bounded the answer's size already (_check_decoded_size), before its own work."""
        dtype, return_png = output_dtype(request), request.return_png
        x_hat = await rt.decode(z)
        shared = SharedOutput.of(request)
        out = pb.Outputs(tensor=shared.tensor(x_hat, dtype))
        if return_png:
            if rt.modality != "image":
                raise InvalidArgument(f"return_png: model {rt.name} outputs {rt.modality}s, not images")
            out.png.extend(await asyncio.to_thread(lambda: [rt.transform.to_png(row) for row in x_hat]))
        return pb.DecodeResponse(outputs=out, latents=array_to_tensor(z, dtype), version=rt.version)

    def _info(self, rt: ModelRuntime) -> pb.ModelInfo:
        b = rt.bundle
        return pb.ModelInfo(
            name=b.name, version=b.version, versions=sorted(self.repo.models.get(b.name, {})),
            kind=b.kind, modality=b.modality, input_dim=b.input_dim, input_shape=list(b.input_shape or ()),
            latent_dim=b.latent_dim, execution_provider=rt.provider,
            metrics_json=json.dumps(b.manifest.get("metrics", {})), prior=b.prior["type"],
            precision=b.precision, precision_from=b.precision_from or 0,
            answers_latest=self.repo.latest(b.name) == b.version,
        )

    @rpc
    async def ListModels(self, request, context):
        broken = [pb.BrokenModel(path=p, error=e) for p, e in sorted(self.repo.broken.items())]
        return pb.ListModelsResponse(models=[self._info(rt) for rt in self.repo.loaded()], broken=broken)

    @rpc
    async def GetModel(self, request, context):
        return self._info(self._model(request.model))

    @rpc
    async def Encode(self, request, context):
        rt, dtype = self._model(request.model), output_dtype(request)
        shared = SharedOutput.of(request)
        item = WIRE[dtype][1]
        shared.check(input_rows(request.inputs) * (rt.latent_dim * item * (2 if rt.is_vae else 1)
                                                   + (rt.latent_dim // 8 if rt.is_hash else 0)))
        outs = await rt.encode_outputs(await features(rt, request.inputs, "inputs", self.limits))
        resp = pb.EncodeResponse(mean=shared.tensor(outs[0], dtype), version=rt.version)
        if rt.is_vae:
            resp.logvar.CopyFrom(shared.tensor(outs[1], dtype))
        if rt.is_hash:
            resp.bits.CopyFrom(shared.tensor(outs[1], pb.UINT8))
        return resp

    @rpc
    async def Decode(self, request, context):
        rt = self._model(request.model)
        z = tensor_to_array(request.latents, "latents", cols=rt.latent_dim, max_rows=self.limits.max_rows)
        self._check_decoded_size(rt, len(z), request)
        return await self._decoded(rt, z, request)

    @rpc
    async def Reconstruct(self, request, context):
        rt = self._model(request.model)
        self._check_decoded_size(rt, input_rows(request.inputs), request)  # before any image is decoded
        mean, _ = await rt.encode(await features(rt, request.inputs, "inputs", self.limits))
        return await self._decoded(rt, mean, request)


    @rpc
    async def Generate(self, request, context):
        rt = self._model(request.model)
        if not 0 < request.count <= self.limits.max_generate:
            raise InvalidArgument(f"count: expected 1 to {self.limits.max_generate}, got {request.count}")
        self._check_decoded_size(rt, int(request.count), request)
        temperature = request.temperature or 1.0
        if not (np.isfinite(temperature) and temperature > 0):
            raise InvalidArgument(f"temperature: expected a positive number (0 means 1.0), got {request.temperature}")
        z = rt.sample_prior(int(request.count), int(request.seed), float(temperature))
        return await self._decoded(rt, z, request)

    @rpc
    async def Interpolate(self, request, context):
        rt = self._model(request.model)
        if not 2 <= request.steps <= self.limits.max_steps:
            raise InvalidArgument(f"steps: expected 2 to {self.limits.max_steps} points, got {request.steps}")
        self._check_decoded_size(rt, int(request.steps), request)
        which = request.WhichOneof("endpoints")
        if which == "latents":
            ends = tensor_to_array(request.latents, "latents", cols=rt.latent_dim)
        elif which == "inputs":
            ends = (await rt.encode(await features(rt, request.inputs, "inputs", self.limits)))[0]
        else:
            raise InvalidArgument("endpoints: set inputs (two items) or latents ([2, latent_dim])")
        if len(ends) != 2:
            raise InvalidArgument(f"{which}: expected exactly 2 endpoints, got {len(ends)}")
        t = np.linspace(0.0, 1.0, int(request.steps))
        path = slerp(ends[0], ends[1], t) if request.spherical else (1 - t)[:, None] * ends[0] + t[:, None] * ends[1]
        return await self._decoded(rt, path.astype(np.float32), request)

    @rpc
    async def Score(self, request, context):
        rt = self._model(request.model)
        x = await features(rt, request.inputs, "inputs", self.limits)
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


class SharedMemoryRpcs(RpcHandlers):
    """zspace.v1's registration of shared memory regions; the same registry as KServe's extension."""

    RPCS = ("RegisterSharedMemory", "SharedMemoryStatus", "UnregisterSharedMemory")

    def __init__(self, regions: SharedMemoryRegistry, metrics=None, admission=None, sharing: str = "local"):
        super().__init__(metrics, admission)
        self.regions, self.sharing = regions, sharing

    @staticmethod
    def _message(r) -> pb.SharedMemoryRegion:
        return pb.SharedMemoryRegion(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)

    @rpc
    async def RegisterSharedMemory(self, request, context):
        check_sharing(self.sharing, context.peer())
        r = request.region
        return self._message(self.regions.register(r.name, r.key, r.offset, r.byte_size))

    @rpc
    async def SharedMemoryStatus(self, request, context):
        return pb.SharedMemoryStatusResponse(regions=[self._message(r) for r in self.regions.status(request.name)])

    @rpc
    async def UnregisterSharedMemory(self, request, context):
        self.regions.unregister(request.name)
        return pb.UnregisterSharedMemoryResponse()


def add_zspace_service(server, *parts: RpcHandlers) -> None:
    """Serve zspace.v1.ZSpace on `server`, its methods taken from the parts (model RPCs, index RPCs)."""
    add_service(server, pb.DESCRIPTOR.services_by_name["ZSpace"], pb, *parts)
