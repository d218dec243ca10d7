"""A latent index kept in Milvus (pymilvus's MilvusClient): the distributed backend.

The index folder holds only index.json, with `"backend": "milvus"`, the URI and
the collection; the items live in Milvus. A URI is a Milvus standalone or cluster
(`http://host:19530`), a `milvus-lite server` (the same protocol), or a local
milvus-lite file (`*.db`: one process at a time; given as a path from the current
folder, e.g. `indexes/NAME/milvus.db`, and recorded relative to the index folder
when inside it, so the folder can move).

Same contract as the FAISS backend (latent_index.LatentIndex): caller-given
string keys, JSON object payloads, the model version bound to the index and
checked on open (it is also stored as a collection property, so two index
folders cannot disagree about one collection), the filter language of filters.py
(translated to a Milvus expression), payload fields declared with a type (checked on
every write; Milvus evaluates the filters itself).

What Milvus decides: the collection is created with consistency level Strong, so
a search sees every write acknowledged before it (read-your-writes, also across
replicas); a write is acknowledged once Milvus has logged it (its write-ahead log:
a kill -9 of zspace loses nothing acknowledged; Milvus's own durability is its
deployment's). Upsert replaces by primary key; delete is by key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from zspace.errors import NotFound, shown
from zspace.files import file_identity, write_atomic
from zspace.index.contract import FilterError, IndexSpec, Item, check_items, check_key, check_queries
from zspace.index.errors import FactoryError, IndexError_, IndexMoved
from zspace.index.fields import coerce, extract, field_specs
from zspace.index.filters import Condition, as_filter, describe, equal_forms
from zspace.index.hits import Hit

MODEL_PROPERTY = "zspace.model"
MILVUS_URI_ENV = "ZSPACE_MILVUS_URI"
_LITE_USERS: dict[str, int] = {}  # milvus-lite file -> clients open on it in this process
_LITE_LOCK = threading.Lock()
KEY_BYTES = 4096  # Milvus VARCHAR bounds bytes; a key is at most 1,024 characters of up to 4 bytes each
METRICS = {"l2": "L2", "cosine": "COSINE"}


def index_params(factory: str) -> tuple[str, dict]:
    """A FAISS-style factory string as a Milvus index: Flat, HNSW<M>, IVF<nlist>,Flat (or a Milvus type name)."""
    f = factory.strip()
    if f.upper() in ("FLAT", "AUTOINDEX"):
        return f.upper(), {}
    if m := re.fullmatch(r"HNSW(\d*)", f, re.IGNORECASE):
        return "HNSW", {"M": int(m.group(1) or 16), "efConstruction": 64}
    if m := re.fullmatch(r"IVF(\d+)(,Flat)?", f, re.IGNORECASE):
        return "IVF_FLAT", {"nlist": int(m.group(1))}
    raise FactoryError(f"factory: {factory!r} has no Milvus counterpart here; use Flat, HNSW<M> or IVF<nlist>,Flat")


def literal(value) -> str:
    """A JSON scalar as a Milvus expression literal: strings quoted and escaped, so a value never becomes syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if any(ord(c) < 32 for c in value):
        raise FilterError("filter value: control characters cannot be matched by the milvus backend")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filter_expression(where) -> str:
    """A filter (any shape filters.as_filter takes) as a Milvus boolean expression over the payload JSON.

    Conditions are joined with `and`; `==` and `in` keep the FAISS backend's number/string
    tolerance (7 matches 7 and "7"); fields were checked to hold no quotes, backslashes or
    control characters, and every value goes through `literal`, so no value is ever syntax."""
    return " and ".join(_condition_expression(c) for c in as_filter(where))


def _condition_expression(c: Condition) -> str:
    path = f'payload["{c.field}"]'
    if c.op in ("<", "<=", ">", ">="):
        return f"{path} {c.op} {literal(c.value)}"
    forms = [f for v in (c.value if c.op == "in" else (c.value,)) for f in equal_forms(v)]
    forms = list(dict.fromkeys(json.dumps(f) for f in forms))  # each once, in order
    if c.op == "!=":  # Milvus 2.3 servers let `!=` match items without the field: `exists` says they must have it
        return f"((exists {path}) and (" + " and ".join(f"{path} != {literal(json.loads(f))}" for f in forms) + "))"
    if len(forms) == 1:
        return f"{path} == {literal(json.loads(forms[0]))}"
    return "(" + " or ".join(f"{path} == {literal(json.loads(f))}" for f in forms) + ")"


def stored_uri(uri: str, folder: Path) -> str:
    """What index.json records for a URI given on the command line: a server URI as it is; a milvus-lite
    file (a path from the current folder, as a user types it) relative to the index folder when inside it,
    so the folder can move, else absolute."""
    if "://" in uri:
        return uri
    file, home = Path(uri).resolve(), Path(folder).resolve()
    return str(file.relative_to(home)) if file.is_relative_to(home) else str(file)


def resolve_uri(uri: str, folder: Path) -> str:
    """A local milvus-lite file is read relative to the index folder; a server URI is used as it is."""
    if "://" in uri:
        return uri
    path = Path(uri)
    return str(path if path.is_absolute() else (Path(folder) / path).resolve())


class MilvusIndex:
    """The Milvus backend: the LatentIndex surface the service and the CLI use."""

    cheap_queries = False  # every search is a network call: never on the event loop
    # None: the collection's level, Strong (read-your-writes). A Milvus 2.3 server answers a Strong search
    # after its next time tick (200 ms apart by default); "Bounded" answers at once from a slightly older view.
    consistency: str | None = None

    def __init__(self, path: Path, manifest: dict, client, collection: str):
        self.path, self.manifest, self.client, self.collection = Path(path), manifest, client, collection
        self.dim, self.metric, self.factory = int(manifest["dim"]), manifest["metric"], manifest["factory"]
        self.binary = False  # float codes only (build_index refuses hamming for this backend)
        self.identity = file_identity(self.path / "index.json")  # None until a deferred build publishes it

    # ------------------------------------------------------------ create / open

    @staticmethod
    def connect(uri: str, folder: Path):
        from pymilvus import MilvusClient

        resolved = resolve_uri(uri, folder)
        try:
            client = MilvusClient(resolved)
            if "://" not in resolved:
                with _LITE_LOCK:
                    _LITE_USERS[resolved] = _LITE_USERS.get(resolved, 0) + 1
                client.zspace_lite_file = resolved
            return client
        except Exception as exc:  # pymilvus raises its own exception types for an unreachable or locked URI
            hint = " (a milvus-lite file serves one process at a time: run `milvus-lite server` for several)" \
                if "://" not in uri else ""
            raise IndexError_(f"milvus: cannot open {uri} ({getattr(exc, 'message', exc)}){hint}") from None

    @classmethod
    def create(cls, path: Path, model_name: str, model_version: int, dim: int, uri: str, collection: str | None = None,
               factory: str = "HNSW32", metric: str = "l2", deferred: bool = False) -> MilvusIndex:
        """A new collection and the folder's index.json naming it. deferred: index.json waits for publish()
        (a build fills the collection first: a folder without index.json is no index to a server)."""
        from pymilvus import DataType

        path = Path(path)
        if (path / "index.json").exists():
            raise IndexError_(f"{path}: an index already exists here")
        if metric not in METRICS:
            raise IndexError_(f"metric: expected l2 or cosine, got {metric!r}")
        kind, params = index_params(factory)
        collection = collection or re.sub(r"[^A-Za-z0-9_]", "_", path.name)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
            raise IndexError_(f"--collection: {collection!r} is not a Milvus collection name (letters, digits, _)")
        path.mkdir(parents=True, exist_ok=True)
        uri = stored_uri(uri, path)
        client = cls.connect(uri, path)
        if client.has_collection(collection):
            raise IndexError_(f"milvus: collection {collection!r} already exists at {uri}; pick another --collection")
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("payload", DataType.JSON)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=kind, metric_type=METRICS[metric], params=params)
        client.create_collection(collection, schema=schema, index_params=index, consistency_level="Strong",
                                 properties={MODEL_PROPERTY: f"{model_name}/{int(model_version)}"})
        manifest = {"format_version": 1, "backend": "milvus", "uri": uri, "collection": collection,
                    "model": {"name": model_name, "version": int(model_version)}, "dim": int(dim), "metric": metric,
                    "factory": factory}
        index = cls(path, manifest, client, collection)
        if not deferred:
            index.publish()
        return index

    def publish(self) -> None:
        """Write the folder's index.json: from now on the folder is an index a server serves."""
        write_atomic(self.path / "index.json", json.dumps(self.manifest, indent=1))
        self.identity = file_identity(self.path / "index.json")

    @classmethod
    def open(cls, path: Path, manifest: dict) -> MilvusIndex:
        for field in ("uri", "collection"):
            if not isinstance(manifest.get(field), str) or not manifest[field]:
                raise IndexError_(f"{path}/index.json: field {field!r} must name the Milvus {field}")
        # A deployment may say where its Milvus is (compose: http://standalone:19530), whatever address
        # the index was built against; a milvus-lite file is the folder's own and is kept.
        uri = manifest["uri"]
        if "://" in uri and os.environ.get(MILVUS_URI_ENV):
            uri = os.environ[MILVUS_URI_ENV]
        client = cls.connect(uri, path)
        collection = manifest["collection"]
        try:
            if not client.has_collection(collection):
                raise IndexError_(f"{path}: collection {collection!r} does not exist at {uri}")
            bound = str(client.describe_collection(collection).get("properties", {}).get(MODEL_PROPERTY, ""))
            want = f"{manifest['model']['name']}/{manifest['model']['version']}"
            if bound != want:
                raise IndexError_(f"{path}: collection {collection!r} holds codes of {bound or 'an unknown model'}, "
                                  f"index.json says {want}; codes mean nothing to another model")
            client.load_collection(collection)  # a collection must be loaded to be searched, also after a restart
        except BaseException:
            disconnect(client)
            raise
        return cls(path, manifest, client, collection)

    # ------------------------------------------------------------ the backend entry points (index/backends.py)

    @classmethod
    def open_folder(cls, path: Path, manifest: dict, snapshots: bool, follow: bool) -> MilvusIndex:
        return cls.open(path, manifest)  # no local copy: snapshots and follow do not apply

    @staticmethod
    def default_factory(metric: str) -> str:
        return "HNSW32"

    @staticmethod
    def check_spec(spec: IndexSpec, out: Path) -> None:
        if not spec.uri:
            raise IndexError_(f"--backend milvus needs --uri: a milvus-lite file (e.g. {out}/milvus.db) or http://host:19530")
        if spec.metric == "hamming":
            raise IndexError_("--metric hamming: the Milvus backend here stores float codes; use --backend faiss")

    @classmethod
    def build(cls, out: Path, spec: IndexSpec, model: tuple[str, int], dim: int, metric: str, fill) -> MilvusIndex:
        """The collection is filled first and index.json written last, so a watcher sees no index until it is
        complete; a failed build drops the collection and removes what it wrote."""
        cls.check_spec(replace(spec, metric=metric), out)  # the metric as resolved: a hash model's is hamming
        existed = out.exists()
        field_specs(spec.fields)
        index = cls.create(out, model[0], model[1], dim, spec.uri, spec.collection, spec.factory or "HNSW32", metric,
                           deferred=True)
        index.manifest["fields"] = [str(f) for f in field_specs(spec.fields)]
        try:
            fill(index)
            index.publish()
        except BaseException:
            index.client.drop_collection(index.collection)
            index.close()
            (out / "index.json").unlink(missing_ok=True)
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            raise
        return index

    # ------------------------------------------------------------ the LatentIndex surface

    @property
    def model(self) -> tuple[str, int]:
        return self.manifest["model"]["name"], int(self.manifest["model"]["version"])

    def moved(self) -> bool:
        """Whether the folder's index.json was replaced or removed since it was opened: it may name another
        collection now, and writes through this object would go to the old one."""
        return file_identity(self.path / "index.json") != self.identity

    def _check_here(self) -> None:
        if self.moved():
            raise IndexMoved(f"{self.path}: the index folder was replaced or removed after it was opened; "
                             "nothing was written")

    @property
    def specs(self):
        return field_specs(self.manifest.get("fields", []), f"{self.path}/index.json fields")

    @property
    def fields(self) -> list[str]:
        return [str(s) for s in self.specs]

    def add_fields(self, fields) -> None:
        """Declare payload fields: every stored payload is checked against the type first (a value that
        does not fit refuses the declaration, naming the item), then index.json records them."""
        specs = field_specs(fields)
        known = {s.name for s in self.specs}
        for spec in specs:
            if spec.name in known:
                raise IndexError_(f"field {shown(spec.name)} is already indexed")
        self._check_here()
        it = self.client.query_iterator(self.collection, batch_size=10_000, filter="", output_fields=["key", "payload"])
        try:
            while rows := it.next():
                for row in rows:
                    for spec in specs:
                        try:
                            coerce(spec, row["payload"].get(spec.name), spec.name)
                        except IndexError_ as exc:
                            raise IndexError_(f"item {shown(row['key'])}: {exc}; nothing was declared") from None
        finally:
            it.close()
        self.manifest = {**self.manifest, "fields": [*self.fields, *map(str, specs)]}
        if self.identity is not None:  # published: record the declaration (a build publishes it with the rest)
            self.publish()

    def explain(self, where, k: int = 10, nprobe: int = 16, ef_search: int = 16) -> dict:
        """What a search with this filter asks Milvus, and how many items it matches."""
        where = as_filter(where)
        expr = filter_expression(where)
        total = self.count()
        matches = int(self.client.query(self.collection, filter=expr, output_fields=["count(*)"])[0]["count(*)"]) \
            if where else total
        return {"filter": describe(where), "backend": "milvus", "expression": expr, "total": total,
                "matches": matches, "selectivity": round(matches / total, 6) if total else 0.0,
                "strategy": "milvus evaluates the expression", "indexed": [], "scanned": [],
                "fields": self.fields}

    def upsert(self, keys: list[str], vectors: np.ndarray, payloads: list[dict], maintain: bool = True) -> None:
        vectors, texts = check_items(keys, vectors, payloads, self.dim)
        extract(self.specs, payloads)  # declared fields hold values of their type, as in the FAISS backend
        self._check_here()
        rows = [{"key": k, "vector": v, "payload": json.loads(t)} for k, v, t in zip(keys, vectors.tolist(), texts)]
        self.client.upsert(self.collection, rows)

    def delete(self, keys: list[str]) -> None:
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
        self._check_here()
        found = {r["key"] for r in self.client.get(self.collection, ids=list(keys), output_fields=["key"])}
        for key in keys:
            if key not in found:
                raise NotFound(f"key {shown(key)} is not in the index")
        self.client.delete(self.collection, ids=list(keys))

    def get(self, key: str) -> Item:
        check_key(key, "key")
        rows = self.client.get(self.collection, ids=[key], output_fields=["vector", "payload"])
        if not rows:
            raise NotFound(f"key {shown(key)} is not in the index")
        return Item(0, key, np.asarray(rows[0]["vector"], np.float32), rows[0]["payload"])

    def search(self, queries: np.ndarray, k: int, where=None, nprobe: int = 16,
               ef_search: int = 16, blocking: bool = True, one_thread: bool | None = None, as_json: bool = False):
        """-> per query a list of Hit(key, distance, payload), nearest first (cosine distance = 1 - cos, as FAISS's)."""
        queries = check_queries(queries, k, self.dim)
        expr = filter_expression(where)
        levels = {"consistency_level": self.consistency} if self.consistency else {}
        found = self.client.search(self.collection, data=queries.tolist(), limit=int(k), filter=expr,
                                   output_fields=["payload"],
                                   search_params={"params": {"ef": max(ef_search, k), "nprobe": nprobe}}, **levels)
        cosine = self.metric == "cosine"
        out = []
        for row in found:
            hits = []
            for h in row:
                payload = h["entity"]["payload"]
                distance = 1.0 - h["distance"] if cosine else h["distance"]
                hits.append(Hit(h["key"] if "key" in h else h["id"], float(distance),
                                json.dumps(payload, sort_keys=True) if as_json else payload))
            out.append(hits)
        return out

    def count(self) -> int:
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def stats(self) -> dict:
        return {"model": self.manifest["model"], "dim": self.dim, "metric": self.metric, "factory": self.factory,
                "backend": "milvus", "uri": self.manifest["uri"], "collection": self.collection,
                "count": self.count(), "fields": self.fields, "trained": True, "training_note": None}

    def finish_build(self) -> None:
        self.client.flush(self.collection)  # sealed segments, indexed: the first searches do not build them

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        disconnect(self.client)


def disconnect(client) -> None:
    """Close a client; the last one of a milvus-lite file in this process also stops the file's in-process
    server (milvus-lite keeps it, and the file's lock, until the process exits otherwise)."""
    client.close()
    path = getattr(client, "zspace_lite_file", None)
    if path is None:
        return
    client.zspace_lite_file = None
    with _LITE_LOCK:
        _LITE_USERS[path] -= 1
        last = _LITE_USERS[path] == 0
        if last:
            del _LITE_USERS[path]
    if last:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(path)
