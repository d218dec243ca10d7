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

The system shared-memory extension (service/shared_memory.py) lets a local client
register a region once and name it in inputs and outputs (parameters
`shared_memory_region`, `_offset`, `_byte_size`), as `tritonclient.utils.shared_memory`
does: the tensors then never travel in a message. CUDA shared memory is answered
UNIMPLEMENTED: the sessions here read host memory.
"""

from __future__ import annotations

import grpc
import numpy as np

from zspace.errors import NotFound, shown
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.service.config import Limits
from zspace.service.inputs import InvalidArgument, as_float32, uint8_max
from zspace.service.repository import ModelRepository, ModelRuntime
from zspace.service.rpc import RpcHandlers, StatusError, check_answer_size, rpc
from zspace.service.shared_memory import REGIONS, SharedMemoryRegistry, check_sharing

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


class NoCudaSharedMemory(StatusError):
    code = grpc.StatusCode.UNIMPLEMENTED


def shared_ref(parameters, field: str) -> tuple[str, int, int] | None:
    """(region, offset, byte size) of a tensor whose data is in shared memory, from its parameters (the KServe
    shared-memory extension's names); None when it names no region."""
    if "shared_memory_region" not in parameters:
        extra = sorted(k for k in parameters if k.startswith("shared_memory_"))
        if extra:
            raise InvalidArgument(f"{field}: parameter {extra[0]} without shared_memory_region")
        return None

    def number(key: str, default: int | None) -> int:
        if key not in parameters:
            if default is None:
                raise InvalidArgument(f"{field}: shared_memory_region needs {key}")
            return default
        p = parameters[key]
        which = p.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param") or getattr(p, which) < 0:
            raise InvalidArgument(f"{field}: parameter {key} must be a non-negative integer")
        return getattr(p, which)

    region = parameters["shared_memory_region"]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{field}: parameter shared_memory_region must be a string (the registered name)")
    return region.string_param, number("shared_memory_offset", 0), number("shared_memory_byte_size", None)


def parse_version(version: str) -> int:
    """"" -> 0 (the latest); a positive integer as text -> that version."""
    if version == "":
        return 0
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "١" (which int() reads as 1).
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgument(f"model_version: expected a positive integer or empty (the latest), got {shown(version)}")
    return int(version)


class KServeRpcs(RpcHandlers):
    RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
            "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
            "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")

    def __init__(self, repo: ModelRepository, limits: Limits, ready, version: str, metrics=None, admission=None,
                 regions: SharedMemoryRegistry = REGIONS, sharing: str = "local"):
        """ready: () -> bool, what gRPC health says (models loaded; in a group, every worker serving); sharing: who
        may register shared memory (shared_memory.SHARING)."""
        super().__init__(metrics, admission)
        self.repo, self.limits, self.ready, self.version, self.regions = repo, limits, ready, version, regions
        self.sharing = sharing

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
        return kpb.ServerMetadataResponse(name="zspace", version=self.version, extensions=["model_configuration"] + (["system_shared_memory"] if self.sharing != "off" else []))

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
        # The answer's size is known now, before any work: bounded like every answer (the message limit), and
        # an output asked into shared memory must fit the room given for it.
        widths = {n: w * (1 if t == "UINT8" else 4) for n, w, t in outputs}
        shared = {o.name: ref for o in request.outputs if (ref := shared_ref(o.parameters, f"output '{o.name}'"))}
        for name, (_, _, room) in shared.items():
            if len(x) * widths[name] > room:
                raise InvalidArgument(f"output '{name}': {len(x) * widths[name]} bytes for {len(x)} rows, the shared "
                                      f"memory given for it holds {room} (shared_memory_byte_size)")
        check_answer_size(len(x) * sum(widths[n] for n in wanted if n not in shared), self.limits, "ModelInfer")
        known = [n for n, _, _ in outputs]
        if graph == "encoder":
            results = dict(zip(known, await rt.encode_outputs(x)))
        else:
            results = {known[0]: await rt.decode(x)}
        types = {n: t for n, _, t in outputs}
        response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(rt.version), id=request.id)
        # Outputs in the message first: raw_output_contents[i] belongs to outputs[i], and one written to shared
        # memory has no contents, so it goes after them (clients find outputs by name).
        for name in sorted(wanted, key=lambda n: n in shared):
            out = np.ascontiguousarray(results[name], dtype="u1" if types[name] == "UINT8" else "<f4")
            tensor = response.outputs.add(name=name, datatype=types[name], shape=list(out.shape))
            if name in shared:
                region, offset, room = shared[name]
                self.regions.write(region, offset, room, out, f"output '{name}'")
                tensor.parameters["shared_memory_region"].string_param = region
                tensor.parameters["shared_memory_offset"].int64_param = offset
                tensor.parameters["shared_memory_byte_size"].int64_param = out.nbytes
            else:
                response.raw_output_contents.append(out.tobytes())
        return response

    # -------------------------------------------------------------- shared memory (the KServe v2 extensions)

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        check_sharing(self.sharing, context.peer())
        self.regions.register(request.name, request.key, request.offset, request.byte_size)
        return kpb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        response = kpb.SystemSharedMemoryStatusResponse()
        for r in self.regions.status(request.name):
            response.regions[r.name].CopyFrom(kpb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return response

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        self.regions.unregister(request.name)
        return kpb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(f"CUDA shared memory region {shown(request.name)} is not registered (this server takes none)")
        return kpb.CudaSharedMemoryStatusResponse()

    @rpc
    async def CudaSharedMemoryRegister(self, request, context):
        raise NoCudaSharedMemory("CUDA shared memory is not served by zspace yet (ONNX Runtime's sessions here take "
                                 "host memory); register system shared memory instead (SystemSharedMemoryRegister)")

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        if request.name:
            raise NotFound(f"CUDA shared memory region {shown(request.name)} is not registered (this server takes none)")
        return kpb.CudaSharedMemoryUnregisterResponse()

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
        ref = shared_ref(t.parameters, f"input '{in_name}'")
        if ref is not None:
            region, offset, byte_size = ref
            expected = count * np.dtype(wire).itemsize
            if request.raw_input_contents or t.HasField("contents"):
                raise InvalidArgument(f"input '{in_name}': its data is in shared memory region {shown(region)}; send "
                                      "no raw_input_contents or contents for it")
            if byte_size != expected:
                raise InvalidArgument(f"input '{in_name}': shared_memory_byte_size {byte_size}, expecting {expected} "
                                      f"for shape {shape} of {t.datatype}")
            arr = self.regions.read(region, offset, byte_size, wire, f"input '{in_name}'")
        elif request.raw_input_contents:
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
