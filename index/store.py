"""The item store: SQLite in WAL mode, the source of truth of an index.

Every item is a caller-given key, its latent vector and a JSON payload, under
an integer id that FAISS uses. A replace gets a new id (so a FAISS snapshot
taken before it can be brought up to date by replaying the change log), and
every write appends to `changes` in the same transaction. With
synchronous=FULL a committed write survives the process being killed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import NotFound, shown, shown_list
from zspace.index.contract import FilterError, Item
from zspace.index.errors import IndexError_
from zspace.index.fields import FieldSpec
from zspace.index.filters import Condition, equal_forms

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  vector BLOB NOT NULL,
  payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  old_id INTEGER,
  new_id INTEGER
);
CREATE TABLE IF NOT EXISTS fields (
  name TEXT PRIMARY KEY,
  type TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Written:
    """What one write transaction did: the change-log position before and after it, and per item
    (old id or None, new id or None). An index that was at `before` can apply `pairs` directly;
    one that was not has missed another process's writes and replays the log instead."""

    before: int
    after: int
    pairs: list[tuple[int | None, int | None]]


class ItemStore:
    """One writer connection, and a read connection per reading thread.

    A reader must never share the writer's connection: in SQLite a connection sees
    its own uncommitted changes, so a GetItem in the middle of a replace (delete,
    then insert) would find the key gone. Each thread reads through its own
    connection, which in WAL mode sees committed transactions only, and never
    waits for the writer."""

    def __init__(self, path: Path, dim: int, create: bool = False):
        """create=False opens an existing store only: a missing file is an error, never a new empty store
        (made in a folder being deleted, or passed off as an index whose items are gone)."""
        self.path, self.dim = Path(path), dim
        self._uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        # check_same_thread=False: the index serialises writes itself (one writer at a time, any thread).
        try:
            self.db = self._connect()
        except sqlite3.OperationalError as exc:
            raise IndexError_(f"{self.path}: the item store is missing or unreadable ({exc})") from None
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._watch = self._connect()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)

    @property
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (made on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._watch.close()
        self.db.close()

    def _vector(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f4")

    def upsert(self, keys: list[str], vectors: np.ndarray, texts: list[str], check=None) -> Written:
        """Insert or replace items (payloads as JSON texts) in one transaction; (old id or None, new id) per item.

        check(declared fields) runs inside the transaction, before anything is written: a field
        declared by another process a moment ago is checked too (the write lock is held)."""
        pairs = []
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._transaction() as before:
            if check is not None:
                check(self._field_specs(self.db))
            for key, vec, text in zip(keys, vectors, texts):
                row = self.db.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
                old = row[0] if row else None
                if old is not None:
                    self.db.execute("DELETE FROM items WHERE id = ?", (old,))
                cur = self.db.execute("INSERT INTO items (key, vector, payload) VALUES (?, ?, ?)",
                                      (key, vec.tobytes(), text))
                self.db.execute("INSERT INTO changes (old_id, new_id) VALUES (?, ?)", (old, cur.lastrowid))
                pairs.append((old, cur.lastrowid))
            after = self._last_seq(self.db)
        return Written(before, after, pairs)

    def insert_new(self, keys: list[str], vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        """Bulk-insert items into a store being built (an import): no per-key lookup and no change-log rows.

        Only for a store no reader serves yet, whose builder snapshots FAISS as of the end
        (so there is nothing to replay); a key already stored fails the transaction (UNIQUE).
        The new ids, in order."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        # A page cache the size of a big import's key index (SQLite's default is 2 MB): keys arrive in no
        # particular order, and each insert into the index would read pages back otherwise (-25% per row).
        self.db.execute("PRAGMA cache_size=-262144")
        with self._transaction():
            first = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0] + 1
            ids = np.arange(first, first + len(keys), dtype=np.int64)
            self.db.executemany("INSERT INTO items (id, key, vector, payload) VALUES (?, ?, ?, ?)",
                                zip(ids.tolist(), keys, (v.tobytes() for v in vectors), texts))
        return ids

    def delete(self, keys: list[str]) -> Written:
        """Delete items by key in one transaction (pairs: removed id, None). Unknown keys raise NotFound first."""
        with self._transaction() as before:
            ids = []
            for key in keys:
                row = self.db.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise NotFound(f"key {shown(key)} is not in the index")
                ids.append(row[0])
            for i in ids:
                self.db.execute("DELETE FROM items WHERE id = ?", (i,))
                self.db.execute("INSERT INTO changes (old_id, new_id) VALUES (?, NULL)", (i,))
            after = self._last_seq(self.db)
        return Written(before, after, [(i, None) for i in ids])

    @contextmanager
    def _transaction(self) -> Iterator[int]:
        """A write transaction; yields the change-log position before it. BEGIN IMMEDIATE takes SQLite's
        write lock at once, so writers in other processes (a server's workers) are serialised here."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self._last_seq(self.db)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @staticmethod
    def _last_seq(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def data_version(self) -> int:
        """A number that changes whenever any connection, in any process, commits to the store.

        SQLite's `PRAGMA data_version` on a connection that never writes: a few microseconds, no
        table read, so a follower can ask it before every search (read-your-writes across
        processes). The connection is shared by threads: the module is built serialised."""
        return self._watch.execute("PRAGMA data_version").fetchone()[0]

    def get(self, key: str) -> Item | None:
        row = self.reader.execute("SELECT id, key, vector, payload FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else Item(row[0], row[1], self._vector(row[2]), json.loads(row[3]))

    def everything(self, payloads: bool = True) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
        """(change-log position, ids, vectors, payload JSON texts) as of one moment; payloads=False
        leaves the texts out (an empty list), for readers of the codes alone (a map).

        One read transaction: another process may commit between two plain SELECTs, and an
        index rebuilt from a mix would replay a change it already holds (a duplicate id)."""
        conn = self.reader
        conn.execute("BEGIN")
        try:
            seq = self._last_seq(conn)
            rows = conn.execute(f"SELECT id, vector{', payload' if payloads else ''} FROM items ORDER BY id").fetchall()
        finally:
            conn.execute("COMMIT")
        ids, vectors = self._stack([(r[0], r[1]) for r in rows])
        return seq, ids, vectors, [r[2] for r in rows] if payloads else []

    def entries_of(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids that still exist, their vectors, their payload JSON texts): what a replay adds."""
        found = self._by_id("id, vector, payload", ids)
        i, v = self._stack([(r[0], r[1]) for r in found])
        return i, v, [r[2] for r in found]

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids` (all of which exist), in the order given."""
        found = dict(self._by_id("id, vector", ids))
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._vector(found[i]) for i in np.asarray(ids).tolist()]).astype(np.float32)

    def rows_of(self, ids) -> dict[int, tuple[str, str]]:
        """id -> (key, payload JSON) of those `ids` that exist: a search's hits, read for the k found only."""
        return {r[0]: (r[1], r[2]) for r in self._by_id("id, key, payload", ids)}

    def _by_id(self, columns: str, ids) -> list[tuple]:
        ids = [int(i) for i in ids]
        found = []
        for start in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found += self.reader.execute(f"SELECT {columns} FROM items WHERE id IN ({marks}) ORDER BY id",
                                         chunk).fetchall()
        found.sort()
        return found

    def _stack(self, rows) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, np.stack([self._vector(r[1]) for r in rows]).astype(np.float32)

    def payloads(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Every item's (ids, payload JSON texts), a batch at a time, in id order: to build payload indexes."""
        last = 0
        while True:
            rows = self.reader.execute("SELECT id, payload FROM items WHERE id > ? ORDER BY id LIMIT ?",
                                       (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.fromiter((r[0] for r in rows), np.int64, len(rows)), [r[1] for r in rows]

    def max_id(self) -> int:
        return self.reader.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]

    # ------------------------------------------------------------ declared fields (payload indexes)

    @staticmethod
    def _field_specs(conn: sqlite3.Connection) -> list[FieldSpec]:
        return [FieldSpec(n, t) for n, t in conn.execute("SELECT name, type FROM fields ORDER BY rowid")]

    def field_specs(self) -> list[FieldSpec]:
        """The declared payload fields, in the order they were declared."""
        return self._field_specs(self.reader)

    def declare_fields(self, specs: list[FieldSpec], check) -> None:
        """Declare payload fields in one transaction; check(specs, ids, texts) runs over every stored
        payload first, under the write lock (no write can slip in between), and may refuse them."""
        with self._transaction():
            known = {s.name: s for s in self._field_specs(self.db)}
            for spec in specs:
                if spec.name in known:
                    raise IndexError_(f"field {shown(spec.name)} is already indexed (as {known[spec.name].type})")
            last = 0
            while rows := self.db.execute("SELECT id, payload FROM items WHERE id > ? ORDER BY id LIMIT 50000",
                                          (last,)).fetchall():
                last = rows[-1][0]
                check(specs, np.fromiter((r[0] for r in rows), np.int64, len(rows)), [r[1] for r in rows])
            self.db.executemany("INSERT INTO fields (name, type) VALUES (?, ?)", [(s.name, s.type) for s in specs])

    # ------------------------------------------------------------ filters on fields that are not indexed

    def ids_matching(self, conditions: tuple[Condition, ...]) -> np.ndarray:
        """Ids of items whose payloads satisfy every condition, by parsing every payload (SQLite's json_extract).

        The slow path, for fields nobody declared (a full scan: about a second at a million
        items); declared fields are answered from their columns (fields.py). Same meaning as
        the columns: see filters.py. A field that no item has is an error, not an empty answer:
        it is nearly always a typo."""
        terms, args = [], []
        for c in conditions:
            sql, a = _condition_sql(c)
            terms.append(f"({sql})")
            args += a
        rows = self.reader.execute(f"SELECT id FROM items WHERE {' AND '.join(terms)}", args).fetchall()
        if not rows and self.reader.execute("SELECT 1 FROM items LIMIT 1").fetchone():
            for c in conditions:
                if not self.reader.execute("SELECT 1 FROM items WHERE json_type(payload, ?) IS NOT NULL LIMIT 1",
                                           (_path(c.field),)).fetchone():
                    fields = {k for (p,) in self.reader.execute("SELECT payload FROM items LIMIT 100")
                              for k in json.loads(p)}
                    raise FilterError(f"filter: no item has a field {shown(c.field)} (fields seen: {shown_list(fields)})")
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def field_values(self, field: str) -> tuple[np.ndarray, list]:
        """(ids, each item's value of the top-level payload field, None where it has none): one scan, for the
        explorer's colouring (SQLite's values: JSON true/false come back as 1/0)."""
        rows = self.reader.execute("SELECT id, json_extract(payload, ?) FROM items ORDER BY id", (_path(field),)).fetchall()
        return np.fromiter((r[0] for r in rows), np.int64, len(rows)), [r[1] for r in rows]

    def changes_since(self, seq: int) -> list[tuple[int, int | None, int | None]]:
        return self.reader.execute("SELECT seq, old_id, new_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def last_seq(self) -> int:
        return self._last_seq(self.reader)

    def count(self) -> int:
        return self.reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def _path(field: str) -> str:
    return f'$."{field}"'  # the field has no quotes or backslashes (filters.check_field)


_NUMBER = "json_type(payload, ?) IN ('integer', 'real')"


def _equal_sql(path: str, value) -> tuple[str, list]:
    """Payload field at `path` equals `value` with the filter language's tolerance (filters.equal_forms)."""
    terms, args = [], []
    for form in equal_forms(value):
        if isinstance(form, bool):
            terms.append("json_type(payload, ?) = ?")
            args += [path, "true" if form else "false"]
        elif isinstance(form, (int, float)):
            terms.append(f"({_NUMBER} AND json_extract(payload, ?) = ?)")
            args += [path, path, form]
        else:
            terms.append("(json_type(payload, ?) = 'text' AND json_extract(payload, ?) = ?)")
            args += [path, path, form]
    return " OR ".join(terms), args


def _condition_sql(c: Condition) -> tuple[str, list]:
    path = _path(c.field)
    if c.op in ("<", "<=", ">", ">="):
        kind = _NUMBER if isinstance(c.value, (int, float)) else "json_type(payload, ?) = 'text'"
        return f"{kind} AND json_extract(payload, ?) {c.op} ?", [path, path, c.value]
    terms, args = [], []
    for value in (c.value if c.op == "in" else (c.value,)):
        sql, a = _equal_sql(path, value)
        terms.append(sql)
        args += a
    same = " OR ".join(terms)
    if c.op == "!=":  # the item has a value there (not null), and not an equal one
        return f"COALESCE(json_type(payload, ?), 'null') != 'null' AND NOT ({same})", [path, *args]
    return same, args
