from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
FLOAT32: DType
UINT8: DType
FLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("shape", "data", "dtype", "shared")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    dtype: DType
    shared: SharedRegion
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shared: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class SharedRegion(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "key", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: SharedMemoryRegion
    def __init__(self, region: _Optional[_Union[SharedMemoryRegion, _Mapping]] = ...) -> None: ...

class SharedMemoryStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SharedMemoryStatusResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[SharedMemoryRegion]
    def __init__(self, regions: _Optional[_Iterable[_Union[SharedMemoryRegion, _Mapping]]] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageList(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TextList(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class Inputs(_message.Message):
    __slots__ = ("tensor", "images", "texts")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    images: ImageList
    texts: TextList
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Union[ImageList, _Mapping]] = ..., texts: _Optional[_Union[TextList, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("tensor", "png")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "kind", "modality", "input_dim", "input_shape", "latent_dim", "execution_provider", "metrics_json", "prior", "precision", "precision_from", "answers_latest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FROM_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    kind: str
    modality: str
    input_dim: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    latent_dim: int
    execution_provider: str
    metrics_json: str
    prior: str
    precision: str
    precision_from: int
    answers_latest: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., kind: _Optional[str] = ..., modality: _Optional[str] = ..., input_dim: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., latent_dim: _Optional[int] = ..., execution_provider: _Optional[str] = ..., metrics_json: _Optional[str] = ..., prior: _Optional[str] = ..., precision: _Optional[str] = ..., precision_from: _Optional[int] = ..., answers_latest: bool = ...) -> None: ...

class BrokenModel(_message.Message):
    __slots__ = ("path", "error")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    path: str
    error: str
    def __init__(self, path: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "broken")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    broken: _containers.RepeatedCompositeFieldContainer[BrokenModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., broken: _Optional[_Iterable[_Union[BrokenModel, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "inputs", "output_dtype", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: Inputs
    output_dtype: DType
    output: SharedRegion
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., output: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("mean", "logvar", "version", "bits")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    mean: Tensor
    logvar: Tensor
    version: int
    bits: Tensor
    def __init__(self, mean: _Optional[_Union[Tensor, _Mapping]] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., bits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "latents", "return_png", "output_dtype", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    latents: Tensor
    return_png: bool
    output_dtype: DType
    output: SharedRegion
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., return_png: bool = ..., output_dtype: _Optional[_Union[DType, str]] = ..., output: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class ReconstructRequest(_message.Message):
    __slots__ = ("model", "inputs", "return_png", "output_dtype", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: Inputs
    return_png: bool
    output_dtype: DType
    output: SharedRegion
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., return_png: bool = ..., output_dtype: _Optional[_Union[DType, str]] = ..., output: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "count", "seed", "temperature", "return_png", "output_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    count: int
    seed: int
    temperature: float
    return_png: bool
    output_dtype: DType
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., count: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., return_png: bool = ..., output_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("model", "inputs", "latents", "steps", "spherical", "return_png", "output_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPHERICAL_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: Inputs
    latents: Tensor
    steps: int
    spherical: bool
    return_png: bool
    output_dtype: DType
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., spherical: bool = ..., return_png: bool = ..., output_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("outputs", "latents", "version")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    outputs: Outputs
    latents: Tensor
    version: int
    def __init__(self, outputs: _Optional[_Union[Outputs, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: Inputs
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "score_kind", "version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    score_kind: str
    version: int
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., score_kind: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "model", "model_version", "dim", "metric", "factory", "count", "trained", "note", "fields", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    model_version: int
    dim: int
    metric: str
    factory: str
    count: int
    trained: bool
    note: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., factory: _Optional[str] = ..., count: _Optional[int] = ..., trained: bool = ..., note: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes", "broken")
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    broken: _containers.RepeatedCompositeFieldContainer[BrokenModel]
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., broken: _Optional[_Iterable[_Union[BrokenModel, _Mapping]]] = ...) -> None: ...

class IndexStatsRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("index", "inputs", "vectors", "key", "k", "filter_field", "filter_value_json", "filter", "explain")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_FIELD_NUMBER: _ClassVar[int]
    FILTER_VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    index: str
    inputs: Inputs
    vectors: Tensor
    key: str
    k: int
    filter_field: str
    filter_value_json: str
    filter: Filter
    explain: bool
    def __init__(self, index: _Optional[str] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., key: _Optional[str] = ..., k: _Optional[int] = ..., filter_field: _Optional[str] = ..., filter_value_json: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., explain: bool = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, all: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "op", "value_json")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EQ: _ClassVar[Condition.Op]
        NE: _ClassVar[Condition.Op]
        IN: _ClassVar[Condition.Op]
        LT: _ClassVar[Condition.Op]
        LE: _ClassVar[Condition.Op]
        GT: _ClassVar[Condition.Op]
        GE: _ClassVar[Condition.Op]
    EQ: Condition.Op
    NE: Condition.Op
    IN: Condition.Op
    LT: Condition.Op
    LE: Condition.Op
    GT: Condition.Op
    GE: Condition.Op
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    field: str
    op: Condition.Op
    value_json: str
    def __init__(self, field: _Optional[str] = ..., op: _Optional[_Union[Condition.Op, str]] = ..., value_json: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("key", "distance", "payload_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    key: str
    distance: float
    payload_json: str
    def __init__(self, key: _Optional[str] = ..., distance: _Optional[float] = ..., payload_json: _Optional[str] = ...) -> None: ...

class HitList(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "plan_json")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[HitList]
    plan_json: str
    def __init__(self, results: _Optional[_Iterable[_Union[HitList, _Mapping]]] = ..., plan_json: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("index", "inputs", "vectors", "keys", "payloads_json")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_JSON_FIELD_NUMBER: _ClassVar[int]
    index: str
    inputs: Inputs
    vectors: Tensor
    keys: _containers.RepeatedScalarFieldContainer[str]
    payloads_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[str] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Iterable[str]] = ..., payloads_json: _Optional[_Iterable[str]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("index", "keys")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    index: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("index", "key")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    index: str
    key: str
    def __init__(self, index: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("key", "vector", "payload_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    key: str
    vector: Tensor
    payload_json: str
    def __init__(self, key: _Optional[str] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., payload_json: _Optional[str] = ...) -> None: ...
