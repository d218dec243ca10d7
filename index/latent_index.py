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
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from zspace.errors import NotFound, shown
from zspace.files import file_identity, staged_folder, write_atomic
from zspace.index.contract import (
    FORMAT_VERSION,
    METRICS,
    IndexSpec,
    check_binding,
    check_items,
    check_key,
    check_queries,
    read_manifest,
)
from zspace.index.errors import IndexError_, IndexMoved
from zspace.index.factory import empty_index, search_parameters, traits
from zspace.index.hits import HitTable
from zspace.index.store import ItemStore, Written

log = logging.getLogger("zspace.index")
TOMBSTONE_FRACTION = 0.2


class RWLock:
    """Many readers or one writer: searches run together, writes alone.

    Readers wake a waiting writer only when one waits, and take the plain
    mutex, not the Condition's Python-level context manager: a search pays two
    uncontended C-level lock round trips, nothing more.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self, blocking: bool = True) -> None:
        """With blocking=False, IndexBusy at once instead of waiting for a writer."""
        with self._mutex:
            if self._writer or self._writers_waiting:
                if not blocking:
                    raise IndexBusy("a write to this index is in progress")
                while self._writer:
                    self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if self._writers_waiting and not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._mutex:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._mutex:
            self._writer = False
            self._cond.notify_all()

    @contextmanager
    def read(self, blocking: bool = True):
        self.acquire_read(blocking)
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self):
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()


class IndexBusy(Exception):
    """A non-blocking search met a write in progress (or waiting)."""


class LatentIndex:
    """FAISS over one model version's codes, kept up to date with the item store.

    snapshots=False: this process never writes FAISS snapshots (a server's workers share one
    folder and one of them writes them). follow=True: other processes write the same store,
    so every search first asks whether the store changed and replays what it missed."""

    def __init__(self, path: Path, manifest: dict, snapshots: bool = True, follow: bool = False,
                 create: bool = False):
        """create: make the item store (a new index, see `initialise`); otherwise it must exist."""
        import faiss

        self.faiss = faiss
        # Batched searches of low-dimensional codes: BLAS pays from 2 queries on, not FAISS's default 20.
        faiss.cvar.distance_compute_blas_threshold = 2
        self.path, self.manifest = Path(path), manifest
        self.dim, self.metric, self.factory = int(manifest["dim"]), manifest["metric"], manifest["factory"]
        self.binary = self.metric == "hamming"  # codes are bits; FAISS IndexBinary, distances are bit counts
        self.traits = traits(self.factory, self.dim, self.binary)  # FactoryError for a string FAISS cannot build
        self.store = ItemStore(self.path / "items.sqlite", self.dim, create)
        # The store file this object writes: if the folder is replaced meanwhile (rm -rf; mv .new into place),
        # its path names another index's file, and nothing of this one may be written there (see `moved`).
        self.identity = file_identity(self.store.path)
        self.lock = RWLock()
        self.removable = self.traits.removable
        self.tombstones: set[int] = set()
        self._plain_params: dict[tuple, object] = {}  # search parameters without a selector, made once
        self.index = None
        self.trained_kind = False  # False while an untrained factory is stood in for by a flat index
        self.seq = 0
        self.snapshots, self.follow = snapshots, follow
        self._seen_version = self.store.data_version()  # before loading: a commit meanwhile is replayed
        # id -> key and payload of every item: a search answers from memory, not from SQLite.
        self.hits = HitTable()
        self._load()

    # ------------------------------------------------------------ create / open

    @staticmethod
    def new_manifest(model_name: str, model_version: int, dim: int, factory: str = "Flat", metric: str = "l2") -> dict:
        """index.json for a new index, checked before anything is written (FactoryError names a bad factory)."""
        if metric not in METRICS:
            raise IndexError_(f"metric: expected l2, cosine or hamming, got {metric!r}")
        traits(factory, int(dim), metric == "hamming")
        return {"format_version": FORMAT_VERSION, "model": {"name": model_name, "version": int(model_version)},
                "dim": int(dim), "metric": metric, "factory": factory}

    @classmethod
    def initialise(cls, folder: Path, manifest: dict) -> LatentIndex:
        """Make an empty folder (a staging one: see `create`) an empty index, and open it."""
        write_atomic(Path(folder) / "index.json", json.dumps(manifest, indent=1))
        return cls(folder, manifest, create=True)

    @classmethod
    def create(cls, path: Path, model_name: str, model_version: int, dim: int, factory: str = "Flat",
               metric: str = "l2") -> LatentIndex:
        """A new empty index folder, made whole or not at all: it is assembled in a hidden
        folder and renamed into place, so a failure leaves nothing that a retry would trip on."""
        path = Path(path)
        if (path / "index.json").exists():
            raise IndexError_(f"{path}: an index already exists here")
        manifest = cls.new_manifest(model_name, model_version, dim, factory, metric)
        with staged_folder(path) as tmp:
            cls.initialise(tmp, manifest).close()  # the item store and a first snapshot
        return cls(path, manifest)

    @classmethod
    def open(cls, path: Path, model_name: str | None = None, model_version: int | None = None,
             snapshots: bool = True, follow: bool = False) -> LatentIndex:
        """A FAISS index folder (index.backends.open_index opens any backend)."""
        manifest = read_manifest(path)
        check_binding(manifest, Path(path), model_name, model_version)
        if manifest.get("backend", "faiss") != "faiss":
            raise IndexError_(f"{path}: a {manifest['backend']} index; open it with zspace.index.backends.open_index")
        return cls(Path(path), manifest, snapshots, follow)

    # ------------------------------------------------------------ the backend entry points (index/backends.py)

    @classmethod
    def open_folder(cls, path: Path, manifest: dict, snapshots: bool, follow: bool) -> LatentIndex:
        return cls(path, manifest, snapshots, follow)

    @staticmethod
    def default_factory(metric: str) -> str:
        return "BFlat" if metric == "hamming" else "Flat"

    @staticmethod
    def check_spec(spec: IndexSpec, out: Path) -> None:
        if spec.uri or spec.collection:
            raise IndexError_("--uri and --collection are for --backend milvus")

    @classmethod
    def build(cls, out: Path, spec: IndexSpec, model: tuple[str, int], dim: int, metric: str, fill) -> LatentIndex:
        """Assembled in a hidden folder and renamed into place whole (a failure leaves nothing)."""
        cls.check_spec(spec, out)
        manifest = cls.new_manifest(model[0], model[1], dim, spec.factory or cls.default_factory(metric), metric)
        with staged_folder(out) as tmp:
            index = cls.initialise(tmp, manifest)
            try:
                fill(index)
            finally:
                index.close()  # a snapshot of the finished index, so opening it replays nothing
        return cls.open(out)

    def _empty(self, trainable_now: bool):
        return empty_index(self.traits, self.dim, self.metric, trainable_now)

    def _load(self) -> None:
        meta = self.path / "snapshot.json"
        for attempt in (1, 2):
            if not meta.exists():
                if self.store.count():
                    log.warning("%s: snapshot missing; rebuilding from the item store", self.path)
                self.rebuild()
                return
            try:
                info = json.loads(meta.read_text())
                read = self.faiss.deserialize_index_binary if self.binary else self.faiss.deserialize_index
                self.index = read(np.fromfile(self.path / info["file"], dtype=np.uint8))
                self.seq, self.trained_kind = int(info["seq"]), bool(info["trained_kind"])
                self.tombstones = set(info.get("tombstones", []))
                if self.index.d != self.dim:
                    raise ValueError(f"snapshot has dimension {self.index.d}, index.json says {self.dim}")
                break
            except FileNotFoundError:
                if attempt == 1:  # another process replaced the snapshot between our two reads: read the new one
                    continue
                log.warning("%s: snapshot file missing; rebuilding from the item store", self.path)
                self.rebuild()
                return
            except Exception as exc:  # truncated, corrupt or foreign snapshot: the store is the truth
                log.warning("%s: snapshot unusable (%s); rebuilding from the item store", self.path, exc)
                self.rebuild()
                return
        # The hit table holds the store as it is now, the snapshot an earlier state: replaying the
        # changes after the snapshot brings FAISS level (for the table they are no-ops: ids are never reused).
        _, _, _, entries = self.store.everything()
        self.hits = HitTable(entries)
        replayed = self._replay()
        if replayed:
            log.info("%s: replayed %d changes onto the snapshot", self.path, replayed)

    def _replay(self) -> int:
        """Apply the store's changes after self.seq to FAISS and the hit table; how many there were."""
        changes = self.store.changes_since(self.seq)
        if not changes:
            return 0
        added = [new for _, _, new in changes if new is not None]
        born = set(added)  # ids made after self.seq were never in FAISS: removing them would leave false tombstones
        gone = [old for _, old, _ in changes if old is not None]
        for i in gone:
            self.hits.pop(i)
        self._remove([i for i in gone if i not in born])
        ids, vecs, entries = self.store.entries_of(added)  # those replaced or deleted again later no longer exist
        for i, (key, text) in zip(ids.tolist(), entries):
            self.hits.put(i, key, text)
        self._add(ids, vecs)
        self.seq = changes[-1][0]
        self._maybe_train()
        return len(changes)

    def catch_up(self, blocking: bool = True) -> None:
        """Replay what other processes wrote to the store since this index last looked (follow=True).

        Cheap when nothing changed (one PRAGMA); blocking=False raises IndexBusy instead of
        taking the write lock, so an event loop hands the search to a thread."""
        version = self.store.data_version()
        if version == self._seen_version:
            return
        if not blocking:
            raise IndexBusy("the item store changed: catching up first")
        with self.lock.write():
            version = self.store.data_version()  # read before the changes: a commit after it is seen next time
            self._replay()
            self._seen_version = version

    def rebuild(self) -> None:
        """Build the FAISS index and the hit table afresh from the store (also clears HNSW tombstones)."""
        seq, ids, vecs, entries = self.store.everything()
        self.index, self.trained_kind = self._empty(len(ids) >= self.traits.min_points)
        if self.trained_kind and not self.index.is_trained:
            self.index.train(self._prep(vecs))
        self.tombstones = set()
        self.hits = HitTable(entries)
        self._add(ids, vecs)
        self.seq = seq
        if self.snapshots:
            self._write_snapshot()

    # ------------------------------------------------------------ internals

    def _prep(self, vecs: np.ndarray) -> np.ndarray:
        if self.binary:  # the store's 0/1 floats -> the packed bytes FAISS compares
            return np.ascontiguousarray(np.packbits(np.asarray(vecs) > 0.5, axis=1))
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
        need = self.traits.min_points
        if not self.trained_kind and need and self.store.count() >= need:
            self.rebuild()
        elif not self.removable and len(self.tombstones) > TOMBSTONE_FRACTION * max(self.index.ntotal, 1):
            self.rebuild()

    # ------------------------------------------------------------ public API

    def upsert(self, keys: list[str], vectors: np.ndarray, payloads: list[dict], maintain: bool = True) -> None:
        """Insert or replace; durable when this returns.

        maintain=False skips training/compaction checks, for bulk loads that call
        rebuild() once at the end (so IVF trains on all codes, not the first batch).
        """
        vectors, texts = check_items(keys, vectors, payloads, self.dim, self.binary)
        with self.lock.write(), self._still_here():
            self._apply(self.store.upsert(keys, vectors, texts), keys, vectors, texts, maintain)

    def delete(self, keys: list[str]) -> None:
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
        with self.lock.write(), self._still_here():
            self._apply(self.store.delete(keys))

    def moved(self) -> bool:
        """Whether this index's folder was replaced or removed since it was opened (one stat)."""
        return file_identity(self.store.path) != self.identity

    @contextmanager
    def _still_here(self):
        """Around a write: IndexMoved before it when the folder was replaced, and after it too, when the
        folder was replaced while it ran (the write went into the removed file: it must not be acknowledged)."""
        self._refuse_if_moved("nothing was written to the new one")
        try:
            yield
        except Exception as exc:  # SQLite refuses a write to a file unlinked meanwhile ("readonly database")
            if self.moved():
                raise IndexMoved(f"{self.path}: the index folder was replaced or removed during a write; "
                                 "nothing was written that survives") from exc
            raise
        self._refuse_if_moved("nothing was written that survives")

    def _refuse_if_moved(self, outcome: str) -> None:
        if self.moved():
            raise IndexMoved(f"{self.path}: the index folder was replaced or removed after it was opened; {outcome}")

    def _apply(self, written: Written, keys: list[str] = (), vectors: np.ndarray | None = None,
               texts: list[str] = (), maintain: bool = True) -> None:
        """Bring FAISS and the hit table level with a write just committed (the write lock is held).

        When this index was level with the store before the write, the write's own rows are
        applied as they are; when another process wrote in between, the log is replayed instead
        (it holds that write and ours, in commit order)."""
        if written.before != self.seq:
            self._replay()
            return
        gone = [old for old, _ in written.pairs if old is not None]
        for i in gone:
            self.hits.pop(i)
        self._remove(gone)
        if vectors is not None:
            new = np.array([n for _, n in written.pairs], dtype=np.int64)
            for i, key, text in zip(new.tolist(), keys, texts):
                self.hits.put(i, key, text)
            self._add(new, vectors)
        self.seq = written.after
        if maintain:
            self._maybe_train()

    def get(self, key: str):
        check_key(key, "key")
        item = self.store.get(key)
        if item is None:
            raise NotFound(f"key {shown(key)} is not in the index")
        return item

    def search(self, queries: np.ndarray, k: int, where: tuple[str, object] | None = None, nprobe: int = 16,
               ef_search: int = 16, blocking: bool = True, one_thread: bool | None = None, as_json: bool = False):
        """-> per query a list of Hit(key, distance, payload), nearest first. Cosine distance = 1 − cos.

        as_json gives each payload as its stored JSON text (what a server sends on).
        blocking=False raises IndexBusy instead of waiting for a write: for callers
        (an event loop) that must never block. one_thread runs FAISS on the calling
        thread alone; by default a single HNSW query does, since one graph walk
        gains nothing from OpenMP but pays its fork and join."""
        queries = check_queries(queries, k, self.dim, self.binary)
        if self.follow:
            self.catch_up(blocking)
        lock = self.lock
        lock.acquire_read(blocking)  # not `with lock.read()`: the generator costs a microsecond here
        try:
            ntotal = self.index.ntotal
            if ntotal == 0:
                return [[] for _ in queries]
            params = self._search_params(where, nprobe, max(ef_search, k))
            if one_thread is None:
                one_thread = len(queries) == 1 and self.trained_family == "HNSW"
            if one_thread:
                dist, ids = self._search_one_thread(queries, min(k, ntotal), params)
            else:
                dist, ids = self._faiss_search(self._prep(queries), min(k, ntotal), params)
            return self.hits.hits(dist, ids, self.metric == "cosine", as_json)
        finally:
            lock.release_read()

    def _search_one_thread(self, queries: np.ndarray, k: int, params):
        faiss = self.faiss
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._faiss_search(self._prep(queries), k, params)
        finally:
            faiss.omp_set_num_threads(threads)

    def _faiss_search(self, x: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search without its Python wrapper, whose checks we have made already (x from _prep:
        contiguous float32 rows of self.dim): they would be a noticeable share of a single HNSW query."""
        if self.binary:  # Hamming distances come back as int32 bit counts
            dist, ids = self.index.search(x, k, params=params)
            return dist.astype(np.float32), ids
        swig_ptr = self.faiss.swig_ptr
        dist = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        self.index.search_c(len(x), swig_ptr(x), k, swig_ptr(dist), swig_ptr(ids), params)
        return dist, ids

    def _search_params(self, where: tuple[str, object] | None, nprobe: int, ef_search: int):
        """FAISS search parameters: nprobe/efSearch for trained IVF/HNSW, a selector for filters and tombstones."""
        family = self.trained_family
        if where is None and not self.tombstones:  # the common case: no selector, parameters made once
            key = (family, nprobe, ef_search)
            if key not in self._plain_params:
                self._plain_params[key] = search_parameters(family, nprobe, ef_search)
            return self._plain_params[key]
        faiss = self.faiss
        selectors, keep = [], []  # FAISS holds selectors by raw pointer: `keep` keeps every Python object alive
        if where is not None:
            selectors.append(faiss.IDSelectorBatch(self.store.ids_where(*where)))
        if self.tombstones and self.trained_kind:
            keep.append(faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64)))
            selectors.append(faiss.IDSelectorNot(keep[-1]))
        sel = selectors[0] if len(selectors) == 1 else (faiss.IDSelectorAnd(*selectors) if selectors else None)
        params = search_parameters(family, nprobe, ef_search, sel)
        if params is not None and sel is not None:
            params.referenced_objects = [*keep, *selectors, sel]  # alive as long as params is
        return params

    @property
    def model(self) -> tuple[str, int]:
        """(name, version) of the model whose codes this index holds."""
        return self.manifest["model"]["name"], int(self.manifest["model"]["version"])

    @property
    def trained_family(self) -> str:
        """"IVF" or "HNSW" once the real factory serves (not its flat stand-in), else ""."""
        return self.traits.family if self.trained_kind else ""

    @property
    def cheap_queries(self) -> bool:
        """A few queries take tens of microseconds (trained HNSW/IVF): worth answering on the caller's thread."""
        return bool(self.trained_family)

    def stats(self) -> dict:
        if self.follow:
            self.catch_up()
        need = self.traits.min_points
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
        if self.moved():  # the folder holds another index now (or none): its files are not ours to write
            log.warning("%s: the folder was replaced or removed since this index was opened; no snapshot written",
                        self.path)
            return
        name = f"index-{self.seq}.faiss"
        serialize = self.faiss.serialize_index_binary if self.binary else self.faiss.serialize_index
        write_atomic(self.path / name, serialize(self.index).tobytes())
        info = {"file": name, "seq": self.seq, "trained_kind": self.trained_kind, "tombstones": sorted(self.tombstones)}
        write_atomic(self.path / "snapshot.json", json.dumps(info).encode())
        for old in self.path.glob("index-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def finish_build(self) -> None:
        """After a bulk load (upserts with maintain=False): train on every code at once where the factory needs it."""
        if self.traits.needs_training:
            self.rebuild()  # FAISS warns below 39 codes per IVF list

    def release(self) -> None:
        """Let go of the store without a snapshot (an index that will not be served)."""
        self.store.close()

    def close(self) -> None:
        if self.snapshots:
            self.snapshot()
        self.store.close()
