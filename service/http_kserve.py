"""KServe v2's HTTP/REST binding (the Open Inference Protocol), over the same KServeRpcs gRPC serves.

Requests become `inference.*Request` messages and answers are written back as the REST
binding's JSON: tensors as `data` (flat, row-major) or, with the binary-data extension,
as raw bytes after the JSON header (`Inference-Header-Content-Length` gives the header's
length; an input's `binary_data_size` parameter its bytes; an output asked with
`binary_data: true`, or every output with the request parameter `binary_data_output`,
comes back the same way). A request parameter `timeout` (microseconds, as tritonclient
sends it) is the call's deadline. Health answers 200 or 503 without a token, as gRPC's.
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import web

from zspace.errors import shown
from zspace.kserve import grpc_service_pb2 as kpb
from zspace.service.http import call, json_answer, off_loop, read_json
from zspace.service.inputs import InvalidArgument
from zspace.service.kserve import DATATYPES
from zspace.service.rpc import InvalidRequest

HEADER = "Inference-Header-Content-Length"


def parameters_into(target, params, field: str) -> None:
    """JSON parameters into a message's `parameters` map (bool, int64, double or string)."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise InvalidArgument(f"{field}.parameters: expected an object")
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidArgument(f"{field}.parameters.{key}: expected a bool, number or string")


def infer_request(name: str, version: str, head: dict, binary: memoryview) -> tuple[kpb.ModelInferRequest, set, bool, float | None]:
    """(the message, outputs asked as binary data, all outputs binary, timeout in seconds) from the REST body."""
    if not isinstance(head, dict):
        raise InvalidArgument("body: expected a JSON object with inputs")
    m = kpb.ModelInferRequest(model_name=name, model_version=version)
    if "id" in head:
        if not isinstance(head["id"], str):
            raise InvalidArgument("id: expected a string")
        m.id = head["id"]
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("parameters: expected an object")
    all_binary = params.get("binary_data_output") is True
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise InvalidArgument("parameters.timeout: expected microseconds, a non-negative number")
    parameters_into(m.parameters, {k: v for k, v in params.items() if k not in ("binary_data_output", "timeout")}, "")
    ins = head.get("inputs")
    if not isinstance(ins, list) or not ins:
        raise InvalidArgument("inputs: expected a list of tensors, each {name, shape, datatype, data}")
    cursor, raw = 0, []
    for i, t in enumerate(ins):
        field = f"inputs[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise InvalidArgument(f"{field}: expected {{name, shape, datatype, data}}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidArgument(f"{field}.shape: expected a list of non-negative sizes")
        tensor = m.inputs.add(name=t["name"], datatype=t["datatype"], shape=shape)
        tparams = dict(t.get("parameters") or {})
        size = tparams.pop("binary_data_size", None)
        parameters_into(tensor.parameters, tparams, field)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or cursor + size > len(binary):
                raise InvalidArgument(f"{field}.parameters.binary_data_size: {size} bytes, but {len(binary) - cursor} "
                                      "bytes of binary data follow the JSON header for it")
            raw.append(bytes(binary[cursor:cursor + size]))
            cursor += size
        elif "data" in t:
            if t["datatype"] not in DATATYPES:
                continue  # the handler refuses the datatype by name
            wire, typed = DATATYPES[t["datatype"]]
            try:
                values = np.asarray(t["data"], dtype=np.float64 if np.dtype(wire).kind == "f" else None).ravel()
            except (ValueError, TypeError):
                raise InvalidArgument(f"{field}.data: expected numbers (nested or flat, row-major)") from None
            if values.dtype.kind not in "fiub":
                raise InvalidArgument(f"{field}.data: expected numbers, got {values.dtype.kind!r} values")
            if t["datatype"] == "UINT8" and values.size and (values.dtype.kind == "f" or values.min() < 0 or values.max() > 255):
                raise InvalidArgument(f"{field}.data: UINT8 values are integers 0 to 255")
            if typed is not None:  # the typed contents the gRPC binding has for it
                getattr(tensor.contents, typed).extend(values.astype(np.float32 if typed == "fp32_contents" else np.uint32).tolist())
            else:  # FP16 has no typed field: raw bytes, as the binary extension would send them
                raw.append(values.astype(wire).tobytes())
        elif "shared_memory_region" not in tparams:
            raise InvalidArgument(f"{field}: give data, or binary data (parameters.binary_data_size), or a shared "
                                  "memory region")
    if cursor != len(binary):
        raise InvalidArgument(f"body: {len(binary) - cursor} bytes of binary data after the JSON header that no input "
                              "claims (binary_data_size)")
    if raw:
        if len(raw) != len(m.inputs):
            raise InvalidArgument("inputs: give every input as binary data, or none")
        m.raw_input_contents.extend(raw)
    binary_outputs = set()
    outs = head.get("outputs") or []
    if not isinstance(outs, list):
        raise InvalidArgument("outputs: expected a list of {name, parameters}")
    for i, o in enumerate(outs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidArgument(f"outputs[{i}]: expected {{name, parameters}}")
        oparams = dict(o.get("parameters") or {})
        if oparams.pop("binary_data", False) is True:
            binary_outputs.add(o["name"])
        oparams.pop("classification", None)
        parameters_into(m.outputs.add(name=o["name"]).parameters, oparams, f"outputs[{i}]")
    return m, binary_outputs, all_binary, (timeout / 1e6 if timeout else None)


def infer_answer(r: kpb.ModelInferResponse, binary: set, all_binary: bool) -> web.Response:
    """The REST answer: JSON, with binary outputs appended after it when asked."""
    out = {"model_name": r.model_name, "model_version": r.model_version, "outputs": []}
    if r.id:
        out["id"] = r.id
    blobs, raw = [], iter(r.raw_output_contents)
    for o in r.outputs:
        entry = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if "shared_memory_region" in o.parameters:
            entry["parameters"] = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in o.parameters.items()}
        else:
            data = next(raw)
            if all_binary or o.name in binary:
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = np.frombuffer(data, DATATYPES[o.datatype][0]).astype(
                    np.float64 if o.datatype.startswith("FP") else np.int64).tolist()
        out["outputs"].append(entry)
    head = json.dumps(out, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=head, content_type="application/json")
    return web.Response(body=head + b"".join(blobs), content_type="application/octet-stream",
                        headers={HEADER: str(len(head))})


class KServeHttpRoutes:
    def __init__(self, kserve):
        self.k = kserve

    def routes(self) -> list[web.RouteDef]:
        routes = [web.get("/v2", self.server_metadata), web.get("/v2/health/live", self.live),
                  web.get("/v2/health/ready", self.ready),
                  web.get("/v2/systemsharedmemory/status", self.shm_status),
                  web.get("/v2/systemsharedmemory/region/{region}/status", self.shm_status),
                  web.post("/v2/systemsharedmemory/region/{region}/register", self.shm_register),
                  web.post("/v2/systemsharedmemory/unregister", self.shm_unregister),
                  web.post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister)]
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [web.get(base, self.model_metadata), web.get(base + "/ready", self.model_ready),
                       web.get(base + "/config", self.model_config), web.post(base + "/infer", self.infer)]
        return routes

    @staticmethod
    def _model(request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    async def server_metadata(self, request):
        r = await call(self.k.ServerMetadata, kpb.ServerMetadataRequest(), request)
        return json_answer({"name": r.name, "version": r.version, "extensions": list(r.extensions)})

    async def live(self, request):
        r = await call(self.k.ServerLive, kpb.ServerLiveRequest(), request)
        return json_answer({"live": r.live}, 200 if r.live else 503)

    async def ready(self, request):
        r = await call(self.k.ServerReady, kpb.ServerReadyRequest(), request)
        return json_answer({"ready": r.ready}, 200 if r.ready else 503)

    async def model_ready(self, request):
        name, version = self._model(request)
        r = await call(self.k.ModelReady, kpb.ModelReadyRequest(name=name, version=version), request)
        return json_answer({"name": name, "ready": r.ready}, 200 if r.ready else 503)

    async def model_metadata(self, request):
        name, version = self._model(request)
        r = await call(self.k.ModelMetadata, kpb.ModelMetadataRequest(name=name, version=version), request)

        def tensors(ts):
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
        return json_answer({"name": r.name, "versions": list(r.versions), "platform": r.platform,
                            "inputs": tensors(r.inputs), "outputs": tensors(r.outputs)})

    async def model_config(self, request):
        from google.protobuf.json_format import MessageToDict

        name, version = self._model(request)
        r = await call(self.k.ModelConfig, kpb.ModelConfigRequest(name=name, version=version), request)
        return json_answer(MessageToDict(r.config, preserving_proto_field_name=True))

    async def infer(self, request):
        name, version = self._model(request)
        body = await request.read()
        length = request.headers.get(HEADER)
        if length is not None:
            if not length.isdigit() or int(length) > len(body):
                raise InvalidRequest(f"{HEADER}: {shown(length)} is not a length within the body's {len(body)} bytes")
            head_bytes, binary = body[:int(length)], memoryview(body)[int(length):]
        else:
            head_bytes, binary = body, memoryview(b"")

        def parse():
            try:
                head = json.loads(head_bytes)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"body: the JSON header is not valid JSON ({exc})") from None
            except RecursionError:
                raise InvalidRequest("body: the JSON header is nested too deeply") from None
            return infer_request(name, version, head, binary)

        message, wanted_binary, all_binary, timeout = await off_loop(len(body), parse)
        answer = await call(self.k.ModelInfer, message, request, timeout)
        size = sum(len(c) for c in answer.raw_output_contents)
        return await off_loop(0 if all_binary or wanted_binary else size * 3, infer_answer, answer, wanted_binary, all_binary)

    # -------------------------------------------------------------- system shared memory over REST

    async def shm_status(self, request):
        r = await call(self.k.SystemSharedMemoryStatus,
                       kpb.SystemSharedMemoryStatusRequest(name=request.match_info.get("region", "")), request)
        return json_answer([{"name": s.name, "key": s.key, "offset": s.offset, "byte_size": s.byte_size}
                            for s in r.regions.values()])

    async def shm_register(self, request):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("key"), str):
            raise InvalidArgument("key: required, the shm_open name of the segment")
        for f in ("offset", "byte_size"):
            if isinstance(body.get(f, 0), bool) or not isinstance(body.get(f, 0), int) or body.get(f, 0) < 0:
                raise InvalidArgument(f"{f}: expected a non-negative integer")
        message = kpb.SystemSharedMemoryRegisterRequest(name=request.match_info["region"], key=body["key"],
                                                        offset=body.get("offset", 0), byte_size=body.get("byte_size", 0))
        await call(self.k.SystemSharedMemoryRegister, message, request)
        return json_answer({})

    async def shm_unregister(self, request):
        await call(self.k.SystemSharedMemoryUnregister,
                   kpb.SystemSharedMemoryUnregisterRequest(name=request.match_info.get("region", "")), request)
        return json_answer({})

