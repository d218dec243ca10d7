"""The index contract: what every backend (FAISS + SQLite here, Milvus) is and checks, in one place.

A backend is a class with the surface of `LatentCodeIndex` below; the service, the index
CLI and builds use nothing else of it. What any backend must refuse, it refuses with the
checks of this module, so the same request gets the same answer from either; the
limits are numbers here, once. `index/backends.py` opens and builds an index by backend
name: a third backend is a module of its own plus one entry there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from zspace.errors import shown
from zspace.index.errors import IndexError_

FORMAT_VERSION = 1
METRICS = ("l2", "cosine", "hamming")  # hamming: binary codes (a hash model's bits), FAISS IndexBinary
BACKENDS = ("faiss", "milvus")


@dataclass
class Item:
    """One stored item: its id (0 where a backend has none of its own), key, code and payload."""

    id: int
    key: str
    vector: np.ndarray
    payload: dict


@runtime_checkable
class LatentCodeIndex(Protocol):
    """The surface every backend offers (LatentIndex, MilvusIndex)."""

    path: Path
    manifest: dict
    dim: int
    metric: str
    factory: str
    binary: bool          # codes are bits (metric hamming): callers send packed bits
    cheap_queries: bool   # a few queries take microseconds: worth answering on an event loop

    @property
    def model(self) -> tuple[str, int]: ...

    def upsert(self, keys: list[str], vectors: np.ndarray, payloads: list[dict], maintain: bool = True) -> None: ...

    def delete(self, keys: list[str]) -> None: ...

    def get(self, key: str) -> Item: ...

    def search(self, queries: np.ndarray, k: int, where=None, nprobe: int = 16,
               ef_search: int = 16, blocking: bool = True, one_thread: bool | None = None,
               as_json: bool = False) -> list[list]: ...

    def explain(self, where, k: int = 10, nprobe: int = 16, ef_search: int = 16) -> dict: ...

    def add_fields(self, fields) -> None: ...

    def stats(self) -> dict: ...

    def moved(self) -> bool: ...

    def finish_build(self) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


def check_manifest(m: object, path: Path) -> None:
    """index.json's fields, each checked by name: a hand-edited or foreign file is refused, not half-used."""
    where = f"{path}/index.json"
    if not isinstance(m, dict):
        raise IndexError_(f"{where}: expected a JSON object")
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("version"), int):
        raise IndexError_(f"{where}: field 'model' needs a name and an integer version")
    if not isinstance(m.get("dim"), int) or isinstance(m.get("dim"), bool) or m["dim"] < 1:
        raise IndexError_(f"{where}: field 'dim' must be a positive integer, got {m.get('dim')!r}")
    if m.get("metric") not in METRICS:
        raise IndexError_(f"{where}: field 'metric' must be l2, cosine or hamming, got {m.get('metric')!r}")
    if not isinstance(m.get("factory"), str):
        raise IndexError_(f"{where}: field 'factory' must be a FAISS factory string, got {m.get('factory')!r}")
    if m.get("backend", "faiss") not in BACKENDS:
        raise IndexError_(f"{where}: field 'backend' must be one of {', '.join(BACKENDS)}, got {m.get('backend')!r}")


def read_manifest(path: Path) -> dict:
    """An index folder's index.json, checked field by field."""
    try:
        manifest = json.loads((Path(path) / "index.json").read_text())
    except FileNotFoundError:
        raise IndexError_(f"{path}: not an index (no index.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexError_(f"{path}/index.json: unreadable ({exc})") from None
    check_manifest(manifest, Path(path))
    return manifest


def check_binding(manifest: dict, path: Path, model_name: str | None, model_version: int | None) -> None:
    """An index belongs to one model version: opening it for another is refused, whatever the backend."""
    model = manifest["model"]
    if model_name is not None and (model["name"], model["version"]) != (model_name, model_version):
        raise IndexError_(f"{path}: this index holds codes of {model['name']}/{model['version']}, "
                          f"not {model_name}/{model_version}; codes mean nothing to another model")


# ---------------------------------------------------------------- what every backend checks


MAX_FIELD_CHARS = 256


class FilterError(IndexError_):
    """A payload filter that cannot mean anything: a malformed field, operator or value, or a field no item has.

    The filter language itself is filters.py."""


def check_text(value: str, field: str, error: type[Exception] = IndexError_) -> str:
    """A string that is valid Unicode, or `error` naming the field.

    A JSON escape such as "\\ud800" decodes to a lone surrogate: a Python string that
    cannot be written as UTF-8, so SQLite, gRPC and every reader after them would fail
    on it. It is refused where it comes in, never stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{field}: not valid Unicode (a lone surrogate \\u{ord(value[exc.start]):04x} at character "
                    f"{exc.start})") from None
    return value


MAX_KEY_CHARS = 1024          # an item key
MAX_PAYLOAD_BYTES = 64 << 10  # one payload as JSON: a search answer carries k of them per query
MAX_JSON_DEPTH = 64           # nesting of a payload: our own bound, since how deep Python's json goes depends
                              # on the Python version (benchmarks/README.md, "JSON nesting")


_SCALARS = frozenset((str, int, float, bool, type(None)))
# One encoder for every payload: json.dumps with options builds a new one per call, a quarter of a bulk import's
# JSON time. ensure_ascii=False: see payload_json.
_ENCODER = json.JSONEncoder(sort_keys=True, allow_nan=False, ensure_ascii=False)


def json_depth(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break  # deep enough to refuse: no need to walk the rest
        stack.extend((c, depth + 1) for c in children)
    return deepest


def payload_json(payload: dict, field: str = "payload") -> str:
    """The one JSON form of a payload, stored and served as is; IndexError_ naming `field` if it cannot be one.

    Standard JSON only (no NaN or Infinity: other readers could not parse it), at most
    MAX_PAYLOAD_BYTES, nested at most MAX_JSON_DEPTH levels."""
    if not isinstance(payload, dict):
        raise IndexError_(f"{field}: must be a JSON object, got {type(payload).__name__}")
    # Most payloads are flat (scalars only): their depth is 1 without walking them (a bulk import's hot path).
    flat = _SCALARS.issuperset(map(type, payload.values()))
    if not flat and json_depth(payload) > MAX_JSON_DEPTH:
        raise IndexError_(f"{field}: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    for name in payload:  # filters name top-level fields, and errors list them: each is bounded
        if isinstance(name, str) and len(name) > MAX_FIELD_CHARS:
            raise IndexError_(f"{field}: a field name of {len(name)} characters, over the limit of {MAX_FIELD_CHARS}")
    try:
        # ensure_ascii=False: a lone surrogate then fails the UTF-8 encoding below instead of being stored
        # as an escape that no reader can decode into a string it could use.
        text = _ENCODER.encode(payload)
    except ValueError:
        raise IndexError_(f"{field}: NaN and Infinity are not JSON; use null or a string") from None
    except RecursionError:
        raise IndexError_(f"{field}: nested too deeply") from None
    except TypeError as exc:
        raise IndexError_(f"{field}: not JSON ({exc})") from None
    size = len(text) if text.isascii() else len(check_text(text, field).encode())  # ASCII: no surrogate, 1 byte each
    if size > MAX_PAYLOAD_BYTES:
        raise IndexError_(f"{field}: {size} bytes of JSON, over the limit of {MAX_PAYLOAD_BYTES}")
    return text


def check_key(key: object, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise IndexError_(f"{field}: must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise IndexError_(f"{field}: {len(key)} characters, over the limit of {MAX_KEY_CHARS}")
    return check_text(key, field)


def as_codes(vectors, dim: int, binary: bool, field: str) -> np.ndarray:
    """Codes as the store keeps them, float32 [n, dim], from what a caller gave, refusing the wrong kind.

    A hamming (binary) index of `dim` bits takes packed bits, uint8 [n, dim/8] (numpy's packbits
    order, what a hash model's Encode answers), or the bits themselves as 0/1 values [n, dim];
    a float index takes float codes and refuses packed bits."""
    a = np.asarray(vectors)
    if binary:
        if a.dtype == np.uint8:
            if a.ndim != 2 or a.shape[1] != dim // 8:
                raise IndexError_(f"{field}: packed bits of a {dim}-bit index need shape [n, {dim // 8}], got {list(a.shape)}")
            return np.unpackbits(a, axis=1).astype(np.float32)
        a = a.astype(np.float32)
        if a.ndim != 2 or a.shape[1] != dim:
            raise IndexError_(f"{field}: expected bits [n, {dim}] (0/1) or packed bits [n, {dim // 8}] (uint8), "
                              f"got {list(a.shape)}")
        if not ((a == 0) | (a == 1)).all():
            raise IndexError_(f"{field}: a hamming index holds bits (0 or 1) and these are float codes; "
                              "float codes belong in an l2 or cosine index")
        return a
    if a.dtype == np.uint8:
        raise IndexError_(f"{field}: packed bits (uint8) given to a float index; bits belong in a hamming index "
                          "(--metric hamming, factory BFlat or BHNSW32)")
    a = a.astype(np.float32)
    if a.ndim != 2 or a.shape[1] != dim:
        raise IndexError_(f"{field}: expected shape [n, {dim}], got {list(a.shape)}")
    return a


def check_items(keys: list[str], vectors, payloads: list[dict], dim: int,
                binary: bool = False) -> tuple[np.ndarray, list[str]]:
    """An upsert's items checked, whatever the backend: (vectors as float32, payloads as their one JSON form).

    Each field is named in the error; a key given twice is refused (which row should win is the
    caller's to say, not ours)."""
    vectors = as_codes(vectors, dim, binary, "vectors")
    if len(keys) != len(vectors) or len(payloads) != len(vectors):
        raise IndexError_(f"keys, vectors and payloads must have the same length ({len(keys)}, {len(vectors)}, {len(payloads)})")
    check_keys(keys)
    texts = [payload_json(p, f"payloads[{i}]") for i, p in enumerate(payloads)]
    check_finite(vectors)
    return vectors, texts


def check_keys(keys: list[str]) -> None:
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        check_key(key, f"keys[{i}]")
        if key in first:
            raise IndexError_(f"keys[{i}]: {shown(key)} repeats keys[{first[key]}]; give each key once per request")
        first[key] = i


def check_finite(vectors: np.ndarray) -> None:
    if not np.isfinite(vectors).all():
        raise IndexError_("vectors: contain NaN or infinity")


def check_queries(queries, k: int, dim: int, binary: bool = False) -> np.ndarray:
    """A search's queries as float32 [n, dim] and its k, checked, whatever the backend."""
    queries = as_codes(queries, dim, binary, "queries")
    if k < 1:
        raise IndexError_(f"k: must be at least 1, got {k}")
    return queries


@dataclass(frozen=True)
class IndexSpec:
    """What kind of index a build makes: the backend and its options (Milvus: where, which collection).

    factory and metric None: the backend's default factory, and the metric the model and data call for."""

    backend: str = "faiss"
    factory: str | None = None
    metric: str | None = None
    uri: str | None = None
    collection: str | None = None
    fields: tuple[str, ...] = ()  # payload indexes to declare, NAME:TYPE (fields.py)
