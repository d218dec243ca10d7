"""A latent index: FAISS over the codes of one model version, with a durable item store.

Folder layout:
  index.json      the contract: model name/version, latent dim, metric, factory
  items.sqlite    the item store (source of truth, see store.py)
  index-<seq>.faiss  a snapshot of the FAISS index as of store change <seq>
  snapshot.json   which snapshot file is current (renamed into place last, so a
                  crash leaves either the old pair or the new one, never a mix)

Opening brings the snapshot up to date by replaying the store's changes after
it; a missing or unreadable snapshot is rebuilt from the store with a warning.
HNSW cannot remove vectors, so deleted ids are hidden with an IDSelector and
the index is rebuilt once tombstones pass a threshold. IVF and PQ indexes need
training: until the store holds enough codes, search is exact over a flat
index, and `stats()` says how many more are needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

from index.store import ItemStore
from zspace.errors import UserError

log = logging.getLogger("zspace.index")
FORMAT_VERSION = 1
METRICS = ("l2", "cosine")
TOMBSTONE_FRACTION = 0.2


class IndexError_(UserError):
    """A problem with an index folder or a request against it."""


def min_train_points(factory: str) -> int:
    """How many codes a factory needs before it can be trained (0: none)."""
    need = 0
    if m := re.search(r"IVF(\d+)", factory):
        need = max(need, int(m.group(1)))
    if m := re.search(r"PQ\d+(?:x(\d+))?", factory):
        need = max(need, 2 ** int(m.group(1) or 8))
    return need


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RWLock:
    """Many readers or one writer: searches run together, writes alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def read(self):
        return _Held(self, False)

    def write(self):
        return _Held(self, True)


class _Held:
    def __init__(self, lock: RWLock, write: bool):
        self.lock, self.write = lock, write

    def __enter__(self):
        c = self.lock._cond
        with c:
            if self.write:
                while self.lock._writer or self.lock._readers:
                    c.wait()
                self.lock._writer = True
            else:
                while self.lock._writer:
                    c.wait()
                self.lock._readers += 1

    def __exit__(self, *exc):
        c = self.lock._cond
        with c:
            if self.write:
                self.lock._writer = False
            else:
                self.lock._readers -= 1
            c.notify_all()


class LatentIndex:
    def __init__(self, path: Path, manifest: dict, threads: int = 0):
        import faiss

        self.faiss = faiss
        if threads:
            faiss.omp_set_num_threads(threads)
        # Batched searches of low-dimensional codes: use BLAS from 2 queries on, not 20
        # (≈1.4x faster for 8 queries over 60k 30-d codes, measured here).
        faiss.cvar.distance_compute_blas_threshold = 2
        self.path, self.manifest = Path(path), manifest
        self.dim, self.metric, self.factory = int(manifest["dim"]), manifest["metric"], manifest["factory"]
        self.store = ItemStore(self.path / "items.sqlite", self.dim)
        self.lock = RWLock()
        self.removable = "HNSW" not in self.factory
        self.tombstones: set[int] = set()
        self._plain_params: dict[tuple, object] = {}  # search parameters without a selector, made once
        self.index = None
        self.trained_kind = False  # False while an untrained factory is stood in for by a flat index
        self.seq = 0
        # id -> (key, payload) of every item: a search answers from memory, not from SQLite.
        self.entries = self.store.all_entries()
        self._load()

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: Path, model_name: str, model_version: int, dim: int, factory: str = "Flat",
               metric: str = "l2", threads: int = 0) -> "LatentIndex":
        import faiss

        path = Path(path)
        if (path / "index.json").exists():
            raise IndexError_(f"{path}: an index already exists here")
        if metric not in METRICS:
            raise IndexError_(f"metric: expected l2 or cosine, got {metric!r}")
        try:
            faiss.index_factory(dim, factory)
        except RuntimeError as exc:
            raise IndexError_(f"factory: FAISS cannot build {factory!r} for {dim}-d codes "
                              f"({str(exc).splitlines()[-1][:200]})") from None
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format_version": FORMAT_VERSION, "model": {"name": model_name, "version": int(model_version)},
                    "dim": int(dim), "metric": metric, "factory": factory}
        write_atomic(path / "index.json", json.dumps(manifest, indent=1).encode())
        return cls(path, manifest, threads)

    @classmethod
    def open(cls, path: Path, model_name: str | None = None, model_version: int | None = None,
             threads: int = 0) -> "LatentIndex":
        path = Path(path)
        try:
            manifest = json.loads((path / "index.json").read_text())
        except FileNotFoundError:
            raise IndexError_(f"{path}: not an index (no index.json)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexError_(f"{path}/index.json: unreadable ({exc})") from None
        model = manifest["model"]
        if model_name is not None and (model["name"], model["version"]) != (model_name, model_version):
            raise IndexError_(f"{path}: this index holds codes of {model['name']}/{model['version']}, "
                              f"not {model_name}/{model_version}; codes mean nothing to another model")
        return cls(path, manifest, threads)

    def _empty(self, trainable_now: bool):
        faiss = self.faiss
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if min_train_points(self.factory) and not trainable_now:
            return faiss.IndexIDMap2(faiss.IndexFlat(self.dim, metric)), False
        base = faiss.index_factory(self.dim, self.factory, metric)
        # IVF keeps ids itself and removes by id; an IDMap over it breaks on remove
        # (IVF does not renumber), so only Flat and HNSW get the id map.
        if isinstance(faiss.downcast_index(base), faiss.IndexIVF):
            return base, True  # (the downcast wrapper does not own the object: keep `base`)
        return faiss.IndexIDMap2(base), True

    def _load(self) -> None:
        meta = self.path / "snapshot.json"
        if meta.exists():
            try:
                info = json.loads(meta.read_text())
                self.index = self.faiss.deserialize_index(np.fromfile(self.path / info["file"], dtype=np.uint8))
                self.seq, self.trained_kind = int(info["seq"]), bool(info["trained_kind"])
                self.tombstones = set(info.get("tombstones", []))
                if self.index.d != self.dim:
                    raise ValueError(f"snapshot has dimension {self.index.d}, index.json says {self.dim}")
            except Exception as exc:  # truncated, corrupt or foreign snapshot: the store is the truth
                log.warning("%s: snapshot unusable (%s); rebuilding from the item store", self.path, exc)
                self.rebuild()
                return
            self._replay()
        else:
            if self.store.count():
                log.warning("%s: snapshot missing; rebuilding from the item store", self.path)
            self.rebuild()

    def _replay(self) -> None:
        changes = self.store.changes_since(self.seq)
        if not changes:
            return
        gone = [old for _, old, _ in changes if old is not None]
        added = [new for _, _, new in changes if new is not None]
        self._remove(gone)
        ids, vecs = self.store.vectors_of(added)  # those replaced again later no longer exist
        self._add(ids, vecs)
        self.seq = changes[-1][0]
        self._maybe_train()
        log.info("%s: replayed %d changes onto the snapshot", self.path, len(changes))

    def rebuild(self) -> None:
        """Build the FAISS index afresh from the store (also clears HNSW tombstones)."""
        seq = self.store.last_seq()
        ids, vecs = self.store.all_vectors()
        self.index, self.trained_kind = self._empty(len(ids) >= min_train_points(self.factory))
        if self.trained_kind and not self.index.is_trained:
            self.index.train(self._prep(vecs))
        self.tombstones = set()
        self._add(ids, vecs)
        self.seq = seq
        self._write_snapshot()

    # ------------------------------------------------------------ internals

    def _prep(self, vecs: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.metric == "cosine":
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs

    def _add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(self._prep(vecs), np.asarray(ids, dtype=np.int64))

    def _remove(self, ids: list[int]) -> None:
        if not ids:
            return
        if self.removable or not self.trained_kind:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        else:
            self.tombstones.update(ids)

    def _maybe_train(self) -> None:
        """Swap the flat stand-in for the real factory once enough codes exist."""
        if not self.trained_kind and min_train_points(self.factory) and self.store.count() >= min_train_points(self.factory):
            self.rebuild()
        elif not self.removable and len(self.tombstones) > TOMBSTONE_FRACTION * max(self.index.ntotal, 1):
            self.rebuild()

    # ------------------------------------------------------------ public API

    def upsert(self, keys: list[str], vectors: np.ndarray, payloads: list[dict], maintain: bool = True) -> None:
        """Insert or replace; durable when this returns.

        maintain=False skips training/compaction checks, for bulk loads that call
        rebuild() once at the end (so IVF trains on all codes, not the first batch).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexError_(f"vectors: expected shape [n, {self.dim}], got {list(vectors.shape)}")
        if len(keys) != len(vectors) or len(payloads) != len(vectors):
            raise IndexError_(f"keys, vectors and payloads must have the same length ({len(keys)}, {len(vectors)}, {len(payloads)})")
        for i, (key, payload) in enumerate(zip(keys, payloads)):
            if not isinstance(key, str) or not key:
                raise IndexError_(f"keys[{i}]: must be a non-empty string")
            if not isinstance(payload, dict):
                raise IndexError_(f"payloads[{i}]: must be a JSON object, got {type(payload).__name__}")
        if not np.isfinite(vectors).all():
            raise IndexError_("vectors: contain NaN or infinity")
        with self.lock.write():
            pairs = self.store.upsert(keys, vectors, payloads)
            for (old, new), key, payload in zip(pairs, keys, payloads):
                self.entries.pop(old, None)
                self.entries[new] = (key, payload)
            self._remove([old for old, _ in pairs if old is not None])
            self._add(np.array([new for _, new in pairs], dtype=np.int64), vectors)
            self.seq = self.store.last_seq()
            if maintain:
                self._maybe_train()

    def delete(self, keys: list[str]) -> None:
        with self.lock.write():
            ids = self.store.delete(keys)
            for i in ids:
                self.entries.pop(i, None)
            self._remove(ids)
            self.seq = self.store.last_seq()
            self._maybe_train()

    def get(self, key: str):
        item = self.store.get(key)
        if item is None:
            raise KeyError(f"key {key!r} is not in the index")
        return item

    def search(self, queries: np.ndarray, k: int, where: tuple[str, object] | None = None, nprobe: int = 16,
               ef_search: int = 16):
        """-> per query a list of (key, distance, payload), nearest first. Cosine distance = 1 − cos."""
        faiss = self.faiss
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexError_(f"queries: expected shape [n, {self.dim}], got {list(queries.shape)}")
        if k < 1:
            raise IndexError_(f"k: must be at least 1, got {k}")
        with self.lock.read():
            if self.index.ntotal == 0:
                return [[] for _ in queries]
            selectors = []
            if where is not None:
                selectors.append(faiss.IDSelectorBatch(self.store.ids_where(*where)))
            if self.tombstones and self.trained_kind:
                selectors.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64))))
            sel = selectors[0] if len(selectors) == 1 else (faiss.IDSelectorAnd(*selectors) if selectors else None)
            params = None
            kind = "" if not self.trained_kind else ("IVF" if "IVF" in self.factory else ("HNSW" if "HNSW" in self.factory else ""))
            if sel is not None or kind:
                key = (kind, nprobe, max(ef_search, k))
                params = self._plain_params.get(key) if sel is None else None
                if params is None:
                    params = getattr(faiss, f"SearchParameters{kind}")()
                    if kind == "IVF":
                        params.nprobe = nprobe
                    if kind == "HNSW":
                        # FAISS's default; on MNIST AE codes: recall@10 0.989 at 13.5x Flat (64: 0.999 at 5.9x)
                        params.efSearch = max(ef_search, k)
                    if sel is None:
                        self._plain_params[key] = params
                    else:
                        params.sel = sel
            dist, ids = self.index.search(self._prep(queries), min(k, self.index.ntotal), params=params)
            entries = self.entries
            cosine = self.metric == "cosine"
            return [[(*entries[i][:1], 1.0 - d if cosine else d, entries[i][1])
                     for d, i in zip(drow.tolist(), irow.tolist()) if i >= 0 and i in entries]
                    for drow, irow in zip(dist, ids)]

    def stats(self) -> dict:
        need = min_train_points(self.factory)
        count = self.store.count()
        return {"model": self.manifest["model"], "dim": self.dim, "metric": self.metric, "factory": self.factory,
                "count": count, "faiss_ntotal": int(self.index.ntotal), "tombstones": len(self.tombstones),
                "trained": self.trained_kind or not need,
                "training_note": None if (self.trained_kind or not need) else
                f"{self.factory} trains at {need} codes; {count} stored, searching exactly until then"}

    def snapshot(self) -> None:
        """Write a FAISS snapshot of the current state (callable while searches run)."""
        with self.lock.read():
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        name = f"index-{self.seq}.faiss"
        write_atomic(self.path / name, self.faiss.serialize_index(self.index).tobytes())
        info = {"file": name, "seq": self.seq, "trained_kind": self.trained_kind, "tombstones": sorted(self.tombstones)}
        write_atomic(self.path / "snapshot.json", json.dumps(info).encode())
        for old in self.path.glob("index-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def close(self) -> None:
        self.snapshot()
        self.store.close()
