"""A latent index: FAISS over the codes of one model version, with a durable item store.

Folder layout:
  index.json      the contract: model name/version, latent dim, metric, factory
  items.sqlite    the item store (source of truth, see store.py)
  index-<seq>.faiss  a snapshot of the FAISS index as of store change <seq>
  fields-<seq>.npz   the payload indexes (fields.py) as of the same change
  snapshot.json   which snapshot files are current (renamed into place last, so a
                  crash leaves either the old set or the new one, never a mix)

Opening brings the snapshot up to date by replaying the store's changes after
it; a missing or unreadable snapshot is rebuilt from the store with a warning.
HNSW cannot remove vectors, so deleted ids are hidden with an IDSelector and
the index is rebuilt once tombstones pass a threshold. IVF and PQ indexes need
training: until the store holds enough codes, search is exact over a flat
index, and `stats()` says how many more are needed.

Memory holds FAISS and the payload indexes; keys and payloads stay in the item store and
are read for the k hits of each search only. Filtered searches are planned (planner.py).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
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
from zspace.index.fields import Column, FieldSpec, coerce, columns_bytes, extract, field_specs, load_columns
from zspace.index.filters import Filter, as_filter, describe
from zspace.index.hits import Hit, hits_of
from zspace.index.planner import (
    EXACT_FALLBACK_LIMIT,
    MAX_EF_SEARCH,
    PROBE,
    MatchCache,
    Matches,
    Plan,
    choose,
    exact_knn,
    exact_limit,
    ivf_nprobe,
    local_ef,
)
from zspace.index.store import ItemStore, Written

log = logging.getLogger("zspace.index")
SPLIT_EXACT_AT = 20_000  # an exact scan of this many codes or more runs on two threads


def _one_openmp_thread() -> None:
    """In each exact-scan thread: FAISS's scan of one query would fork an OpenMP team per call otherwise
    (OpenMP's thread count is per calling thread), four threads fighting over two cores."""
    import faiss

    faiss.omp_set_num_threads(1)


_SCAN_BUFFERS = threading.local()  # per thread: the codes an exact scan gathers (see _codes_of)
MAX_SCAN_BUFFER_ROWS = 300_000     # larger gathers get an array of their own, not kept
_EXACT_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="exact-scan", initializer=_one_openmp_thread)
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
        # Payload indexes: a column per declared field (fields.py), over ids below id_limit.
        self.columns: dict[str, Column] = {}
        self.id_limit = self.store.max_id() + 1
        self._positions: np.ndarray | None = None  # id -> row of FAISS's own code storage (exact filtered search)
        self._tombstone_selector = None  # made once per set of tombstones, not per search
        self._faiss_bytes_per_code: float | None = None  # measured on each snapshot read or written
        self.exact_limit: int | None = None  # the planner's, unless set (tests and benchmarks compare strategies)
        self._snapshotted: tuple | None = None  # the state the current snapshot holds (see snapshot)
        self._matches = MatchCache()  # recent filters' matches, per state of the index (planner.MatchCache)
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
    def initialise(cls, folder: Path, manifest: dict, fields=()) -> LatentIndex:
        """Make an empty folder (a staging one: see `create`) an empty index with these payload
        indexes (FieldSpecs or NAME:TYPE), and open it."""
        specs = field_specs(fields)
        write_atomic(Path(folder) / "index.json", json.dumps(manifest, indent=1))
        index = cls(folder, manifest, create=True)
        if specs:
            index.add_fields(specs)
        return index

    @classmethod
    def create(cls, path: Path, model_name: str, model_version: int, dim: int, factory: str = "Flat",
               metric: str = "l2", fields=()) -> LatentIndex:
        """A new empty index folder, made whole or not at all: it is assembled in a hidden
        folder and renamed into place, so a failure leaves nothing that a retry would trip on."""
        path = Path(path)
        if (path / "index.json").exists():
            raise IndexError_(f"{path}: an index already exists here")
        manifest = cls.new_manifest(model_name, model_version, dim, factory, metric)
        field_specs(fields)  # a bad declaration is refused before anything is made
        with staged_folder(path) as tmp:
            cls.initialise(tmp, manifest, fields).close()  # the item store and a first snapshot
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
        field_specs(spec.fields)
        with staged_folder(out) as tmp:
            index = cls.initialise(tmp, manifest, spec.fields)
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
                # FAISS reads the file itself: no second copy of it in memory while it is parsed.
                read = self.faiss.read_index_binary if self.binary else self.faiss.read_index
                index = read(str(self.path / info["file"]))
                if index.d != self.dim:
                    raise ValueError(f"snapshot has dimension {index.d}, index.json says {self.dim}")
                columns = load_columns(self.path / info["fields"]) if info.get("fields") else {}
                self.index, self.columns = index, columns
                self.seq, self.trained_kind = int(info["seq"]), bool(info["trained_kind"])
                self.tombstones = set(info.get("tombstones", []))
                self._snapshotted = self._state()
                self._measure_snapshot(self.path / info["file"])
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
        # Declared fields the snapshot lacks (declared by another process since, or a snapshot from before
        # payload indexes) are built from the payloads; then the changes after the snapshot are replayed.
        self._build_missing_columns()
        replayed = self._replay()
        if replayed:
            log.info("%s: replayed %d changes onto the snapshot", self.path, replayed)

    def _build_missing_columns(self) -> None:
        """Columns for declared fields that memory lacks, from every payload as of the snapshot's change seq.

        A column built from today's payloads may already hold a change after self.seq; replaying it
        again sets the same values (ids are never reused), so the order does not matter."""
        specs = self.store.field_specs()
        for name in [n for n in self.columns if n not in {s.name for s in specs}]:
            del self.columns[name]  # a snapshot's column for a field no longer declared (cannot happen today)
        missing = [s for s in specs if s.name not in self.columns]
        if not missing:
            return
        log.info("%s: building payload indexes %s from the item store", self.path, ", ".join(map(str, missing)))
        columns = {s.name: Column(s, self.id_limit) for s in missing}
        for ids, texts in self.store.payloads():
            self._fill(columns, missing, ids, texts)
        self.columns.update(columns)

    def _fill(self, columns: dict[str, Column], specs: list[FieldSpec], ids: np.ndarray, texts: list[str],
              refuse: bool = False) -> None:
        """Set the columns of `specs` for items `ids` from their payload JSON texts.

        A value that does not fit the declared type refuses the batch naming its item (refuse: a
        declaration being checked), or is no value, with a warning (payloads checked when written,
        except those written by a version without payload indexes)."""
        payloads = [json.loads(t) for t in texts]
        for spec in specs:
            values = []
            for i, p in zip(ids.tolist(), payloads):
                try:
                    values.append(coerce(spec, p.get(spec.name), spec.name))
                except IndexError_ as exc:
                    if refuse:
                        key = self.store.reader.execute("SELECT key FROM items WHERE id = ?", (i,)).fetchone()
                        raise IndexError_(f"item {shown(key[0] if key else str(i))}: {exc}; nothing was declared") \
                            from None
                    log.warning("%s: item id %d: %s; not in the payload index", self.path, i, exc)
                    values.append(None)
            columns[spec.name].set(ids, values)

    def _replay(self) -> int:
        """Apply the store's changes after self.seq to FAISS and the hit table; how many there were."""
        if len(self.store.field_specs()) != len(self.columns):
            self._build_missing_columns()  # another process declared a field (it wrote no change rows)
        changes = self.store.changes_since(self.seq)
        if not changes:
            return 0
        added = [new for _, _, new in changes if new is not None]
        born = set(added)  # ids made after self.seq were never in FAISS: removing them would leave false tombstones
        gone = [old for _, old, _ in changes if old is not None]
        self._clear_columns(gone)
        self._remove([i for i in gone if i not in born])
        ids, vecs, texts = self.store.entries_of(added)  # those replaced or deleted again later no longer exist
        if self.columns and len(ids):
            self._grow(int(ids.max()) + 1)
            self._fill(self.columns, [c.spec for c in self.columns.values()], ids, texts)
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
        seq, ids, vecs, texts = self.store.everything()
        self.index, self.trained_kind = self._empty(len(ids) >= self.traits.min_points)
        if self.trained_kind and not self.index.is_trained:
            self.index.train(self._prep(vecs))
        self.tombstones = set()
        self._tombstone_selector = None
        self.id_limit = max(self.id_limit, int(ids.max()) + 1 if len(ids) else 1)
        specs = self.store.field_specs()
        self.columns = {s.name: Column(s, self.id_limit) for s in specs}
        self._fill(self.columns, specs, ids, texts)
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
            self._grow(int(np.max(ids)) + 1)
            self._positions = None

    def _remove(self, ids: list[int]) -> None:
        if not ids:
            return
        if self.removable or not self.trained_kind:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            self._positions = None  # a flat index closes the gap: rows move
        else:
            self.tombstones.update(ids)
            self._tombstone_selector = None

    def _grow(self, limit: int) -> None:
        if limit > self.id_limit:
            self.id_limit = limit
            for col in self.columns.values():
                col.grow(limit)

    def _clear_columns(self, ids: list[int]) -> None:
        for col in self.columns.values():
            col.clear(ids)

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
        values: dict[str, list] = {}

        def check(specs: list[FieldSpec]) -> None:  # in the store's write transaction: see ItemStore.upsert
            values.update(extract(specs, payloads))

        with self.lock.write(), self._still_here():
            written = self.store.upsert(keys, vectors, texts, check)
            self._apply(written, keys, vectors, values, maintain)

    def import_new(self, keys: list[str], vectors: np.ndarray, values: dict[str, list], texts: list[str]) -> None:
        """Bulk-load checked items into an index being built (`zspace index import`): payloads as their JSON
        texts and the declared fields' values (fields.extract); inserted without per-key lookups, and
        the builder's close() snapshots the result."""
        with self.lock.write():
            ids = self.store.insert_new(keys, vectors, texts)
            self._grow(int(ids[-1]) + 1 if len(ids) else 1)
            for name, vals in values.items():
                self.columns[name].set(ids, vals)
            self._add(ids, vectors)
            self.seq = self.store.last_seq()

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
               values: dict[str, list] | None = None, maintain: bool = True) -> None:
        """Bring FAISS and the hit table level with a write just committed (the write lock is held).

        When this index was level with the store before the write, the write's own rows are
        applied as they are; when another process wrote in between, the log is replayed instead
        (it holds that write and ours, in commit order)."""
        if written.before != self.seq:
            self._replay()
            return
        gone = [old for old, _ in written.pairs if old is not None]
        self._clear_columns(gone)
        self._remove(gone)
        if vectors is not None:
            new = np.array([n for _, n in written.pairs], dtype=np.int64)
            self._add(new, vectors)
            if values and any(name not in self.columns for name in values):
                self._build_missing_columns()  # declared by another process since this one last looked
            for name, vals in (values or {}).items():
                self.columns[name].set(new, vals)
        self.seq = written.after
        if maintain:
            self._maybe_train()

    def get(self, key: str):
        check_key(key, "key")
        item = self.store.get(key)
        if item is None:
            raise NotFound(f"key {shown(key)} is not in the index")
        return item

    def search(self, queries: np.ndarray, k: int, where=None, nprobe: int = 16, ef_search: int = 16,
               blocking: bool = True, one_thread: bool | None = None, as_json: bool = False) -> list[list[Hit]]:
        """-> per query a list of Hit(key, distance, payload), nearest first. Cosine distance = 1 − cos.

        where: a filter in any shape `filters.as_filter` takes (conditions, {"label": 3}, ...);
        filtered searches are planned (`explain` says how). as_json gives each payload as its
        stored JSON text (what a server sends on). blocking=False raises IndexBusy instead of
        waiting for a write: for callers (an event loop) that must never block. one_thread runs
        FAISS on the calling thread alone; by default a single HNSW query does, since one graph
        walk gains nothing from OpenMP but pays its fork and join."""
        queries = check_queries(queries, k, self.dim, self.binary)
        where = as_filter(where)
        if self.follow:
            self.catch_up(blocking)
        lock = self.lock
        lock.acquire_read(blocking)  # not `with lock.read()`: the generator costs a microsecond here
        try:
            if self.index.ntotal == 0:
                return [[] for _ in queries]
            if one_thread is None:
                one_thread = len(queries) == 1 and self.trained_family == "HNSW"
            if where:
                dist, ids = self._filtered(queries, k, where, nprobe, ef_search, one_thread)
            else:
                params = self._plain_search_params(nprobe, max(ef_search, k))
                dist, ids = self._faiss_search(self._prep(queries), min(k, self.index.ntotal), params, one_thread)
            rows = self.store.rows_of(np.unique(ids[ids >= 0]))
            return hits_of(dist, ids, rows, self.metric == "cosine", as_json)
        finally:
            lock.release_read()

    def explain(self, where, k: int = 10, nprobe: int = 16, ef_search: int = 16) -> dict:
        """The plan a search with this filter would follow (Plan.to_dict): the count it matches, the
        fields read from payload indexes and those parsed from every payload, the strategy."""
        where = as_filter(where)
        if self.follow:
            self.catch_up()
        with self.lock.read():
            return self._plan(where, k, nprobe, ef_search)[0].to_dict()

    def _plan(self, where: Filter, k: int, nprobe: int, ef_search: int) -> tuple[Plan, Matches | None]:
        """(the plan, the items the filter matches) for a filter; the read lock is held."""
        if not where:
            total = self.store.count()
            return Plan("(none)", total, total, (), (), "ann" if self.trained_family else "flat",
                        ef_search if self.trained_family == "HNSW" else None,
                        nprobe if self.trained_family == "IVF" else None), None
        matches = self._matches.get((where, self.seq, self.id_limit), lambda: Matches(self._mask(where)))
        total = int(self.index.ntotal) - len(self.tombstones)
        limit = self.exact_limit if self.exact_limit is not None else \
            exact_limit(self.trained_family, self._raw_storage() is not None, total)
        strategy, ef, probes = choose(matches.count, total, k, self.trained_family, nprobe, ef_search,
                                      self._nlist(), limit)
        indexed = tuple(dict.fromkeys(c.field for c in where if c.field in self.columns))
        scanned = tuple(dict.fromkeys(c.field for c in where if c.field not in self.columns))
        return Plan(describe(where), total, matches.count, indexed, scanned, strategy, ef, probes), matches

    def matching(self, where) -> np.ndarray:
        """Which ids satisfy the filter, as a boolean mask over ids (below id_limit): the explorer's filtering."""
        where = as_filter(where)
        if self.follow:
            self.catch_up()
        with self.lock.read():
            return self._mask(where) if where else np.ones(self.id_limit, bool)

    def _mask(self, where: Filter) -> np.ndarray:
        """Which ids (below id_limit) satisfy every condition: columns for declared fields, one scan of the
        payloads for the rest (all undeclared conditions in one SQL statement)."""
        size = self.id_limit
        mask = None
        for cond in where:
            if cond.field in self.columns:
                m = self.columns[cond.field].mask(cond, size)
                mask = m if mask is None else (mask & m)
        scanned = tuple(c for c in where if c.field not in self.columns)
        if scanned:
            ids = self.store.ids_matching(scanned)
            m = np.zeros(size, bool)
            m[ids[ids < size]] = True
            mask = m if mask is None else (mask & m)
        return mask

    def _filtered(self, queries: np.ndarray, k: int, where: Filter, nprobe: int, ef_search: int,
                  one_thread: bool) -> tuple[np.ndarray, np.ndarray]:
        plan, matches = self._plan(where, k, nprobe, ef_search)
        if plan.strategy == "empty":
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if plan.strategy == "exact":
            return self._exact(queries, k, matches.ids)
        bits = matches.bits
        selector = self.faiss.IDSelectorBitmap(len(bits), self.faiss.swig_ptr(bits))
        try:
            if self.trained_family == "":
                params = search_parameters("", nprobe, ef_search, selector)
                return self._faiss_search(self._prep(queries), min(k, self.index.ntotal), params, one_thread)
            # A graph walk (or an IVF's nearest lists) meets the matches where the query's own neighbourhood
            # holds them: a filter correlated with the query (label == 3, asked with a 7) leaves few there, and
            # efSearch or nprobe from the global selectivity stops short of them. Each query is probed first.
            local = self._local_selectivity(queries, matches.mask, nprobe, one_thread)
            out_d = np.full((len(queries), k), np.inf, np.float32)
            out_i = np.full((len(queries), k), -1, np.int64)
            selectivity = plan.matches / max(plan.total, 1)
            for row, share in enumerate(local):
                if self.trained_family == "IVF":  # no exact fallback: IVF/PQ keep no raw codes to scan
                    rate = min(selectivity, share) if share > 0 else None
                    params = search_parameters("IVF", ivf_nprobe(rate, nprobe, self._nlist()), ef_search, selector)
                    d, i = self._faiss_search(self._prep(queries[row:row + 1]), min(k, self.index.ntotal), params,
                                              one_thread)
                    out_d[row, :d.shape[1]], out_i[row, :i.shape[1]] = d[0], i[0]
                    continue
                ef = local_ef(share, selectivity, k, plan.ef_search or ef_search)
                if ef is None and plan.matches > EXACT_FALLBACK_LIMIT:
                    ef = MAX_EF_SEARCH  # too many to scan in a few milliseconds: the widest walk instead
                if ef is None:  # the neighbourhood holds none: the matches lie elsewhere, scan them exactly
                    d, i = self._exact(queries[row:row + 1], k, matches.ids)
                else:
                    params = search_parameters("HNSW", nprobe, ef, selector)
                    d, i = self._faiss_search(self._prep(queries[row:row + 1]), min(k, self.index.ntotal), params,
                                              one_thread)
                out_d[row, :d.shape[1]], out_i[row, :i.shape[1]] = d[0], i[0]
            return out_d, out_i
        finally:
            del selector  # FAISS held the bitmap by raw pointer until here (the Matches keeps the array alive)

    def _local_selectivity(self, queries: np.ndarray, mask: np.ndarray, nprobe: int, one_thread: bool) -> np.ndarray:
        """Per query, the share of its PROBE nearest items (an unfiltered search, a fraction of a millisecond)
        that match."""
        params = self._plain_search_params(nprobe, PROBE)
        _, ids = self._faiss_search(self._prep(queries), min(PROBE, self.index.ntotal), params, one_thread)
        found = ids >= 0
        hit = np.zeros(ids.shape, bool)
        inside = found & (ids < len(mask))
        hit[inside] = mask[ids[inside]]
        return hit.sum(1) / np.maximum(found.sum(1), 1)

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest of just `ids`, FAISS-shaped.

        Many ids are split in two halves scanned on two threads (numpy's gather and FAISS's scan both
        let go of the GIL): the gather is memory-bound and one core leaves half the bandwidth unused."""
        if self.binary:  # compare bits as 0/1 floats: squared L2 is the count of differing bits, as FAISS's hamming
            q = np.unpackbits(self._prep(queries), axis=1).astype(np.float32)
            return exact_knn(q, self.store.vectors_of(ids), ids, k, self.metric)
        q = self._prep(queries)
        if len(ids) < SPLIT_EXACT_AT or self._raw_storage() is None:
            return exact_knn(q, self._codes_of(ids), ids, k, self.metric)
        self._positions_table()  # made once, here, not by both threads
        halves = np.array_split(ids, 2)
        found = list(_EXACT_POOL.map(lambda part: exact_knn(q, self._codes_of(part), part, k, self.metric), halves))
        dist, got = np.concatenate([d for d, _ in found], 1), np.concatenate([i for _, i in found], 1)
        order = np.argsort(-dist if self.metric == "cosine" else dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, order, 1), np.take_along_axis(got, order, 1)

    def _raw_storage(self):
        """FAISS's own float codes in insertion order (a flat index, or an HNSW graph's storage), or None."""
        if self.binary or not isinstance(self.index, self.faiss.IndexIDMap):  # an IVF keeps ids (and codes) itself
            return None
        inner = self.faiss.downcast_index(self.index.index)
        if isinstance(inner, self.faiss.IndexHNSW):
            inner = self.faiss.downcast_index(inner.storage)
        return inner if isinstance(inner, self.faiss.IndexFlat) else None

    def _codes_of(self, ids: np.ndarray) -> np.ndarray:
        """The prepared codes of `ids` (which exist), from FAISS's memory where it holds them raw, else the store."""
        flat = self._raw_storage()
        if flat is None:
            return self._prep(self.store.vectors_of(ids))
        n = int(flat.ntotal)
        positions = self._positions_table()
        codes = self.faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
        # take: twice as fast as codes[...] for 100k rows; into this thread's buffer, kept between searches, since
        # a fresh 12 MB array is 3,000 pages the kernel faults in and zeroes (a millisecond of each scan).
        buffer = getattr(_SCAN_BUFFERS, "codes", None)
        if buffer is None or buffer.shape[0] < len(ids) or buffer.shape[1] != self.dim:
            buffer = _SCAN_BUFFERS.codes = np.empty((max(len(ids), 1024), self.dim), np.float32) \
                if len(ids) <= MAX_SCAN_BUFFER_ROWS else None
        if buffer is None:
            return np.take(codes, positions[ids], axis=0)
        return np.take(codes, positions[ids], axis=0, out=buffer[:len(ids)], mode="clip")  # "raise" copies

    def _positions_table(self) -> np.ndarray:
        """id -> row of FAISS's own code storage, made again after any add or remove (the read lock is held)."""
        if self._positions is None or len(self._positions) < self.id_limit:
            order = self.faiss.vector_to_array(self.index.id_map)
            positions = np.full(max(self.id_limit, int(order.max()) + 1 if len(order) else 1), -1, np.int64)
            positions[order] = np.arange(len(order))
            self._positions = positions
        return self._positions

    def _nlist(self) -> int:
        if self.trained_family != "IVF":
            return 0
        return int(self.faiss.extract_index_ivf(self.index).nlist)

    def _faiss_search(self, x: np.ndarray, k: int, params, one_thread: bool) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search without its Python wrapper, whose checks we have made already (x from _prep:
        contiguous float32 rows of self.dim): they would be a noticeable share of a single HNSW query."""
        faiss = self.faiss
        threads = faiss.omp_get_max_threads() if one_thread else 0
        if one_thread:
            faiss.omp_set_num_threads(1)
        try:
            if self.binary:  # Hamming distances come back as int32 bit counts
                dist, ids = self.index.search(x, k, params=params)
                return dist.astype(np.float32), ids
            dist = np.empty((len(x), k), dtype=np.float32)
            ids = np.empty((len(x), k), dtype=np.int64)
            self.index.search_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(dist), faiss.swig_ptr(ids), params)
            return dist, ids
        finally:
            if one_thread:
                faiss.omp_set_num_threads(threads)

    def _plain_search_params(self, nprobe: int, ef_search: int):
        """FAISS search parameters of an unfiltered search: nprobe/efSearch, and the tombstones hidden."""
        family = self.trained_family
        if not self.tombstones:  # the common case: no selector, parameters made once
            key = (family, nprobe, ef_search)
            if key not in self._plain_params:
                self._plain_params[key] = search_parameters(family, nprobe, ef_search)
            return self._plain_params[key]
        if self._tombstone_selector is None:  # made once per set of tombstones: a selector of 100k ids is not free
            batch = self.faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64))
            self._tombstone_selector = (batch, self.faiss.IDSelectorNot(batch))
        params = search_parameters(family, nprobe, ef_search, self._tombstone_selector[1])
        params.referenced_objects = list(self._tombstone_selector)  # alive as long as params is
        return params

    # ------------------------------------------------------------ payload indexes

    def add_fields(self, fields) -> None:
        """Declare payload fields (FieldSpecs or NAME:TYPE) and build their indexes over every stored item.

        One store transaction: every payload is checked against the type first, and a value that
        does not fit refuses the whole declaration, naming the item's key; nothing is declared then.
        Durable when this returns (a snapshot follows where this process writes them)."""
        specs = field_specs(fields)
        if not specs:
            return
        columns = {s.name: Column(s, self.id_limit) for s in specs}

        def check(specs: list[FieldSpec], ids: np.ndarray, texts: list[str]) -> None:
            self._fill(columns, specs, ids, texts, refuse=True)

        with self.lock.write(), self._still_here():
            self.store.declare_fields(specs, check)
            for c in columns.values():
                c.grow(self.id_limit)
            self.columns.update(columns)
            if self.snapshots:
                self._write_snapshot()

    @property
    def fields(self) -> list[str]:
        return [str(c.spec) for c in self.columns.values()]

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
                "fields": self.fields, "memory_bytes": self.memory_bytes(),
                "trained": self.trained_kind or not need,
                "training_note": None if (self.trained_kind or not need) else
                f"{self.factory} trains at {need} codes; {count} stored, searching exactly until then"}

    def memory_bytes(self) -> int:
        """What this process holds for the index: the FAISS structure (its snapshot's bytes per code, which
        are its memory within a few percent, times the codes it holds now) and the payload indexes."""
        per_code = self._faiss_bytes_per_code or self.dim * 4 + 8
        return int(per_code * self.index.ntotal) + sum(c.nbytes for c in self.columns.values())

    def _measure_snapshot(self, file: Path) -> None:
        if self.index.ntotal:
            self._faiss_bytes_per_code = file.stat().st_size / self.index.ntotal

    def _state(self) -> tuple:
        """What a snapshot records: equal states need no new snapshot."""
        return self.seq, tuple(self.columns), len(self.tombstones), self.trained_kind, int(self.index.ntotal)

    def snapshot(self) -> None:
        """Write a FAISS snapshot of the current state (callable while searches run); nothing when the
        current snapshot already holds it (an index opened and closed again writes nothing)."""
        with self.lock.read():
            if self._state() != self._snapshotted:
                self._write_snapshot()

    def _write_snapshot(self) -> None:
        if self.moved():  # the folder holds another index now (or none): its files are not ours to write
            log.warning("%s: the folder was replaced or removed since this index was opened; no snapshot written",
                        self.path)
            return
        name = f"index-{self.seq}.faiss"
        serialize = self.faiss.serialize_index_binary if self.binary else self.faiss.serialize_index
        write_atomic(self.path / name, serialize(self.index).data)  # the array's buffer: no second copy
        self._measure_snapshot(self.path / name)
        fields = f"fields-{self.seq}.npz" if self.columns else None
        if fields:
            write_atomic(self.path / fields, columns_bytes(self.columns))
        info = {"file": name, "fields": fields, "seq": self.seq, "trained_kind": self.trained_kind,
                "tombstones": sorted(self.tombstones)}
        write_atomic(self.path / "snapshot.json", json.dumps(info).encode())
        self._snapshotted = self._state()
        for old in [*self.path.glob("index-*.faiss"), *self.path.glob("fields-*.npz")]:
            if old.name not in (name, fields):
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
