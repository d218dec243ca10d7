"""The OpenAPI 3.1 document of the HTTP endpoints, served at /openapi.json.

Written out rather than generated: the JSON shapes are a contract of their own (http_api.py
says how each maps onto zspace.v1), and a test checks that every route the server
registers is documented here and every documented path is served.
"""

from __future__ import annotations

from aiohttp import web

from zspace.service.http import json_answer

TENSOR = {"oneOf": [
    {"type": "array", "items": {"type": "array", "items": {"type": "number"}}, "description": "rows of numbers"},
    {"type": "object", "required": ["b64", "shape"], "description": "raw little-endian bytes",
     "properties": {"b64": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                    "dtype": {"enum": ["float32", "float16", "uint8"], "default": "float32"}}}]}
INPUTS = {"type": "object", "description": "exactly one of tensor, images (base64 PNG/JPEG) or texts",
          "properties": {"tensor": {"$ref": "#/components/schemas/Tensor"},
                         "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                         "texts": {"type": "array", "items": {"type": "string"}}}}
FILTER = {"description": "the filter language: 'label == 3', a list of such conditions (all must hold), "
                         "{\"label\": 3}, or [{field, op, value}]",
          "oneOf": [{"type": "string"}, {"type": "array"}, {"type": "object"}]}
ERROR = {"type": "object", "required": ["error", "code"],
         "properties": {"error": {"type": "string"}, "code": {"type": "string", "description": "the gRPC status code"},
                        "field": {"type": "string", "description": "the request field the error is about"}}}
DECODED = {"type": "object", "properties": {
    "version": {"type": "integer"}, "latents": {"type": "array"}, "outputs": {"type": "array"},
    "png": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
    "words": {"type": "array", "description": "top_words: per row, [word, weight] pairs"}}}
DECODE_OPTIONS = {"version": {"type": "integer"}, "return_png": {"type": "boolean"},
                  "output_dtype": {"enum": ["float32", "float16"]},
                  "tensors": {"type": "boolean", "default": True, "description": "false: leave the decoded rows out"},
                  "top_words": {"type": "integer", "description": "document models: each row's N heaviest words"}}


def body(properties: dict, required=(), files: bool = False) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    content = {"application/json": {"schema": schema}}
    if files:
        content["multipart/form-data"] = {"schema": {"type": "object", "description":
                                                     "every file part is an image of inputs; other parts as in JSON"}}
    return {"required": bool(required), "content": content}


def op(summary: str, request: dict | None = None, answer: dict | None = None, params=(), binary: bool = False,
       tag: str = "zspace") -> dict:
    out = {"summary": summary, "tags": [tag], "responses": {
        "200": {"description": "OK", "content": {"application/octet-stream" if binary else "application/json":
                                                 {"schema": answer or {"type": "object"}}}},
        "default": {"description": "an error: the HTTP status of its gRPC code",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}
    if request:
        out["requestBody"] = request
    if params:
        out["parameters"] = list(params)
    return out


def path_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def query(name: str, kind: str = "string", description: str = "", many: bool = False) -> dict:
    schema = {"type": "array", "items": {"type": kind}} if many else {"type": kind}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def document(version: str) -> dict:
    model, index, version_q = path_param("model"), path_param("index"), query("version", "integer", "0: the latest")
    m, i = "/v1/models/{model}", "/v1/indexes/{index}"
    inputs_ref = {"$ref": "#/components/schemas/Inputs"}
    tensor_ref = {"$ref": "#/components/schemas/Tensor"}
    paths = {
        "/v1/models": {"get": op("Every loaded model (ListModels)")},
        m: {"get": op("One model (GetModel)", params=[model, version_q])},
        m + "/manifest": {"get": op("A model's manifest and its training figures", params=[model, version_q])},
        m + "/figures/{file}": {"get": op("One training figure (PNG)", params=[model, path_param("file"), version_q],
                                          binary=True)},
        m + "/encode": {"post": op("Inputs to latent codes (Encode)", body(
            {"version": {"type": "integer"}, "inputs": inputs_ref, "output_dtype": {"enum": ["float32", "float16"]}},
            ["inputs"], files=True), params=[model])},
        m + "/decode": {"post": op("Codes to outputs (Decode)", body({"latents": tensor_ref, **DECODE_OPTIONS},
                                                                     ["latents"]), DECODED, [model])},
        m + "/reconstruct": {"post": op("Inputs through the model (Reconstruct)", body(
            {"inputs": inputs_ref, **DECODE_OPTIONS}, ["inputs"], files=True), DECODED, [model])},
        m + "/generate": {"post": op("Samples from the prior (Generate)", body(
            {"count": {"type": "integer"}, "seed": {"type": "integer"}, "temperature": {"type": "number"},
             **DECODE_OPTIONS}), DECODED, [model])},
        m + "/interpolate": {"post": op("The decoded path between two items or codes (Interpolate)", body(
            {"inputs": inputs_ref, "latents": tensor_ref, "steps": {"type": "integer"}, "spherical": {"type": "boolean"},
             **DECODE_OPTIONS}, files=True), DECODED, [model])},
        m + "/score": {"post": op("Anomaly scores (Score)", body({"version": {"type": "integer"}, "inputs": inputs_ref},
                                                                ["inputs"], files=True), params=[model])},
        "/v1/indexes": {"get": op("Every served index (ListIndexes)")},
        i: {"get": op("One index (IndexStats)", params=[index])},
        i + "/search": {"post": op("Nearest items (Search)", body(
            {"inputs": inputs_ref, "vectors": tensor_ref, "key": {"type": "string"}, "k": {"type": "integer"},
             "filter": {"$ref": "#/components/schemas/Filter"}, "explain": {"type": "boolean"}}, files=True),
            params=[index])},
        i + "/items": {"post": op("Add or replace items (Upsert)", body(
            {"keys": {"type": "array", "items": {"type": "string"}}, "inputs": inputs_ref, "vectors": tensor_ref,
             "payloads": {"type": "array", "items": {"type": "object"}}}, ["keys"], files=True), params=[index])},
        i + "/items/{key}": {"get": op("One stored item (GetItem)", params=[index, path_param("key")]),
                             "delete": op("Delete one item (Delete)", params=[index, path_param("key")])},
        i + "/delete": {"post": op("Delete items (Delete)", body({"keys": {"type": "array", "items": {"type": "string"}}},
                                                               ["keys"]), params=[index])},
        i + "/views": {"post": op("What items look like: stored image, decoded code or decoded words", body(
            {"keys": {"type": "array", "items": {"type": "string"}}}, ["keys"]), params=[index], tag="explorer")},
        i + "/map": {"get": op("The index's 2-D map: method, rows, bounds", params=[index], tag="explorer")},
        i + "/map/points": {"get": op("Every row's x, y as float32 pairs (NaN: an emptied row)", params=[index],
                                      binary=True, tag="explorer")},
        i + "/map/colours": {"get": op("A payload field's value per row, as colour categories or numbers",
                                       params=[index, query("field", description="a payload field")], tag="explorer")},
        i + "/map/mask": {"get": op("Which rows match a filter: one bit per row, least significant first",
                                    params=[index, query("where", description="a condition, repeatable", many=True)],
                                    binary=True, tag="explorer")},
        i + "/map/find": {"get": op("The map row of an item key", params=[index, query("key")], tag="explorer")},
        i + "/map/rows/{row}": {"get": op("One row's item and its view", params=[index, path_param("row")],
                                          tag="explorer")},
        "/v2": {"get": op("Server metadata", tag="kserve")},
        "/v2/health/live": {"get": op("Liveness (no token)", tag="kserve")},
        "/v2/health/ready": {"get": op("Readiness: 200 or 503 (no token)", tag="kserve")},
        "/v2/systemsharedmemory/status": {"get": op("Registered shared memory regions", tag="kserve")},
        "/v2/systemsharedmemory/region/{region}/status": {"get": op("One region", params=[path_param("region")], tag="kserve")},
        "/v2/systemsharedmemory/region/{region}/register": {"post": op(
            "Register a region", body({"key": {"type": "string"}, "offset": {"type": "integer"},
                                       "byte_size": {"type": "integer"}}, ["key", "byte_size"]),
            params=[path_param("region")], tag="kserve")},
        "/v2/systemsharedmemory/unregister": {"post": op("Unregister every region", tag="kserve")},
        "/v2/systemsharedmemory/region/{region}/unregister": {"post": op("Unregister a region",
                                                                         params=[path_param("region")], tag="kserve")},
    }
    infer = {"description": "KServe v2 inference request: inputs [{name, shape, datatype, data | parameters."
                            "binary_data_size}], outputs [{name, parameters.binary_data}]; binary data follows the "
                            "JSON header (header Inference-Header-Content-Length)",
             "content": {"application/json": {"schema": {"type": "object"}},
                         "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    for base, params in (("/v2/models/{name}", [path_param("name")]),
                         ("/v2/models/{name}/versions/{version}", [path_param("name"), path_param("version")])):
        paths[base] = {"get": op("Model metadata (NAME.encoder, NAME.decoder)", params=params, tag="kserve")}
        paths[base + "/ready"] = {"get": op("Model readiness: 200 or 503", params=params, tag="kserve")}
        paths[base + "/config"] = {"get": op("Model configuration", params=params, tag="kserve")}
        paths[base + "/infer"] = {"post": op("Inference", infer, params=params, tag="kserve")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "zspace", "version": version, "description":
                 "Latent codes over HTTP: zspace.v1's operations as JSON (/v1), KServe v2's REST binding (/v2), "
                 "and what the web explorer (/ui/) reads. With a token configured every path but /v2/health, "
                 "/ui and this document needs 'Authorization: Bearer TOKEN'."},
        "components": {"schemas": {"Tensor": TENSOR, "Inputs": INPUTS, "Filter": FILTER, "Error": ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


class OpenApiRoutes:
    def __init__(self, version: str):
        self.doc = document(version)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/openapi.json", self.openapi)]

    async def openapi(self, request):
        return json_answer(self.doc)
