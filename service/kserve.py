"""The KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`) beside zspace.v1, on the same port.

Clients, load generators and gateways built for Triton, KServe or MLServer work
unchanged. Each bundle shows its two graphs as two models, `NAME.encoder` (input:
the features, outputs: the code, and log σ² for VAE kinds) and `NAME.decoder`
(input: codes, output: the reconstruction), under the graphs' own tensor names;
`model_version` "" is the latest loaded version. A request goes through the same
model batchers, limits, byte budget, auth, metrics and deadline as zspace.v1
(`@rpc`), so both protocols share one queue per graph.

Inputs come as `raw_input_contents` or typed `contents`, in FP32, FP16 (raw only:
the protocol has no typed field for it) or UINT8 (8-bit images only, divided by
255 as the bundle's image transform does). Outputs are FP32, as raw contents.
"""

from __future__ import annotations

import numpy as np

from zspace.errors import NotFound, shown
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.service.config import Limits
from zspace.service.inputs import InvalidArgument, as_float32, uint8_max
from zspace.service.repository import ModelRepository, ModelRuntime
from zspace.service.rpc import RpcHandlers, check_answer_size, rpc

GRAPHS = ("encoder", "decoder")
# Datatype -> (numpy little-endian dtype, the typed `contents` field, or None where only raw bytes exist).
DATATYPES = {"FP32": ("<f4", "fp32_contents"), "FP16": ("<f2", None), "UINT8": ("u1", "uint_contents")}
PLATFORM = "onnxruntime_onnx"


def graph_io(rt: ModelRuntime, graph: str) -> tuple[str, int, list[tuple[str, int, str]]]:
    """(input name, input width, [(output name, output width, datatype)]) of one graph, names as the graph
    has them. A hash model's encoder also gives its bits, packed 8 to a byte: UINT8, latent_dim / 8 wide."""
    session = rt.runtime.encoder if graph == "encoder" else rt.runtime.decoder
    width_in, width_out = (rt.input_dim, rt.latent_dim) if graph == "encoder" else (rt.latent_dim, rt.input_dim)
    outputs = [(o.name, width_out // 8, "UINT8") if o.type == "tensor(uint8)" else (o.name, width_out, "FP32")
               for o in session.get_outputs()]
    return session.get_inputs()[0].name, width_in, outputs


def parse_version(version: str) -> int:
    """"" -> 0 (the latest); a positive integer as text -> that version."""
    if version == "":
        return 0
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "١" (which int() reads as 1).
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgument(f"model_version: expected a positive integer or empty (the latest), got {shown(version)}")
    return int(version)


class KServeRpcs(RpcHandlers):
    RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig")

    def __init__(self, repo: ModelRepository, limits: Limits, ready, version: str, metrics=None, admission=None):
        """ready: () -> bool, what gRPC health says (models loaded; in a group, every worker serving)."""
        super().__init__(metrics, admission)
        self.repo, self.limits, self.ready, self.version = repo, limits, ready, version

    def label(self, request) -> str:
        name = getattr(request, "model_name", None) or getattr(request, "name", "")
        base, _, graph = name.rpartition(".")
        # Only served names: a client must not grow the metric's series without bound.
        return "" if not name else (name if base in self.repo.models and graph in GRAPHS else "unknown")

    def _graph(self, name: str, version: str) -> tuple[ModelRuntime, str]:
        base, dot, graph = name.rpartition(".")
        if not dot or graph not in GRAPHS:
            served = ", ".join(f"{n}.encoder, {n}.decoder" for n in sorted(self.repo.models)) or "none"
            raise NotFound(f"Request for unknown model: {shown(name)} is not found (served: {served})")
        try:
            return self.repo.get(base, parse_version(version)), graph
        except NotFound as exc:
            raise NotFound(f"Request for unknown model: {shown(name)} version {shown(version) if version else 'latest'}: {exc}") from None

    # -------------------------------------------------------------- health and metadata

    @rpc
    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=bool(self.ready()))

    @rpc
    async def ModelReady(self, request, context):
        try:
            self._graph(request.name, request.version)
        except NotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(name="zspace", version=self.version, extensions=["model_configuration"])

    @rpc
    async def ModelMetadata(self, request, context):
        rt, graph = self._graph(request.name, request.version)
        in_name, in_width, outputs = graph_io(rt, graph)
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in sorted(self.repo.models.get(rt.name, {}))], platform=PLATFORM,
            inputs=[tensor(name=in_name, datatype="FP32", shape=[-1, in_width])],
            outputs=[tensor(name=n, datatype=t, shape=[-1, w]) for n, w, t in outputs])

    @rpc
    async def ModelConfig(self, request, context):
        rt, graph = self._graph(request.name, request.version)
        in_name, in_width, outputs = graph_io(rt, graph)
        gpu = rt.provider.startswith("CUDA")
        return kpb.ModelConfigResponse(config=kpb.ModelConfig(
            name=request.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=self.limits.max_rows,
            input=[kpb.ModelInput(name=in_name, data_type=kpb.TYPE_FP32, dims=[in_width])],
            output=[kpb.ModelOutput(name=n, data_type=kpb.TYPE_UINT8 if t == "UINT8" else kpb.TYPE_FP32, dims=[w])
                    for n, w, t in outputs],
            instance_group=[kpb.ModelInstanceGroup(count=rt.batching.instances,
                                                   kind=kpb.ModelInstanceGroup.KIND_GPU if gpu else kpb.ModelInstanceGroup.KIND_CPU)],
            dynamic_batching=kpb.ModelDynamicBatching(preferred_batch_size=[rt.batching.max_batch],
                                                      max_queue_delay_microseconds=int(rt.batching.max_delay_ms * 1000))))

    # -------------------------------------------------------------- inference

    @rpc
    async def ModelInfer(self, request, context):
        rt, graph = self._graph(request.model_name, request.model_version)
        in_name, in_width, outputs = graph_io(rt, graph)
        wanted = self._outputs(request, outputs)
        x = self._input(request, rt, graph, in_name, in_width)
        # The answer's size is known now, before any work: bounded like every answer (the message limit).
        row_bytes = sum(w * (1 if t == "UINT8" else 4) for n, w, t in outputs if n in wanted)
        check_answer_size(len(x) * row_bytes, self.limits, "ModelInfer")
        known = [n for n, _, _ in outputs]
        if graph == "encoder":
            results = dict(zip(known, await rt.encode_outputs(x)))
        else:
            results = {known[0]: await rt.decode(x)}
        types = {n: t for n, _, t in outputs}
        response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(rt.version), id=request.id)
        for name in wanted:
            out = np.ascontiguousarray(results[name], dtype="u1" if types[name] == "UINT8" else "<f4")
            response.outputs.add(name=name, datatype=types[name], shape=list(out.shape))
            response.raw_output_contents.append(out.tobytes())
        return response

    def _outputs(self, request, outputs: list[tuple[str, int, str]]) -> list[str]:
        """The output names a request asks for (all, when it names none), each known and named once."""
        known = [n for n, _, _ in outputs]
        if not request.outputs:
            return known
        if len(request.outputs) > len(known):  # checked before the names: a request may list 100,000 of them
            raise InvalidArgument(f"outputs: {len(request.outputs)} requested, but model '{request.model_name}' has "
                                  f"{len(known)} ({', '.join(known)}); ask for each output at most once")
        first: dict[str, int] = {}
        for i, o in enumerate(request.outputs):
            if o.name not in known:
                raise InvalidArgument(f"unexpected inference output {shown(o.name)} for model '{request.model_name}' "
                                      f"(its outputs: {', '.join(known)})")
            if o.name in first:
                raise InvalidArgument(f"outputs[{i}]: {shown(o.name)} repeats outputs[{first[o.name]}]; ask for each "
                                      "output once")
            first[o.name] = i
        return list(first)

    def _input(self, request, rt: ModelRuntime, graph: str, in_name: str, width: int) -> np.ndarray:
        """The one input tensor as float32 [batch, width]: name, datatype, shape, size and values checked."""
        model = request.model_name
        if len(request.inputs) != 1:
            raise InvalidArgument(f"expected 1 input ('{in_name}') for model '{model}', got {len(request.inputs)}")
        t = request.inputs[0]
        if t.name != in_name:
            raise InvalidArgument(f"unexpected inference input {shown(t.name)} for model '{model}' (its input is '{in_name}')")
        if t.datatype not in DATATYPES:
            raise InvalidArgument(f"input '{in_name}': datatype {shown(t.datatype)} is not accepted; "
                                  f"expected {', '.join(DATATYPES)}")
        scale = uint8_max(rt) if graph == "encoder" else None
        if t.datatype == "UINT8" and scale is None:
            raise InvalidArgument(f"input '{in_name}': UINT8 is for 8-bit images as encoder inputs; send FP32 or FP16")
        shape = list(t.shape)
        if len(shape) != 2 or shape[1] != width or shape[0] < 1:
            raise InvalidArgument(f"input '{in_name}': unexpected shape {shape}, expected [-1, {width}] with at least one row")
        if shape[0] > self.limits.max_rows:
            raise InvalidArgument(f"input '{in_name}': batch of {shape[0]} rows is over max_batch_size {self.limits.max_rows}")
        wire, typed = DATATYPES[t.datatype]
        count = shape[0] * width
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(f"raw_input_contents: {len(request.raw_input_contents)} entries for 1 input")
            data = request.raw_input_contents[0]
            expected = count * np.dtype(wire).itemsize
            if len(data) != expected:
                raise InvalidArgument(f"input '{in_name}': unexpected total byte size {len(data)}, expecting {expected} "
                                      f"for shape {shape} of {t.datatype}")
            arr = np.frombuffer(data, dtype=wire)
        else:
            if typed is None:
                raise InvalidArgument(f"input '{in_name}': {t.datatype} data travels as raw_input_contents (the protocol "
                                      "has no typed contents for it)")
            values = getattr(t.contents, typed)
            if len(values) != count:
                raise InvalidArgument(f"input '{in_name}': {len(values)} values in contents.{typed}, expecting {count} "
                                      f"for shape {shape}")
            arr = np.asarray(values, dtype=np.uint32 if t.datatype == "UINT8" else np.float32)
            if t.datatype == "UINT8" and arr.size and arr.max() > 255:
                raise InvalidArgument(f"input '{in_name}': UINT8 values above 255 in contents.uint_contents")
        return as_float32(arr.reshape(shape), scale if t.datatype == "UINT8" else None, f"input '{in_name}'")
