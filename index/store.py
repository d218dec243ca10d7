"""The item store: SQLite in WAL mode, the source of truth of an index.

Every item is a caller-given key, its latent vector and a JSON payload, under
an integer id that FAISS uses. A replace gets a new id (so a FAISS snapshot
taken before it can be brought up to date by replaying the change log), and
every write appends to `changes` in the same transaction. With
synchronous=FULL a committed write survives the process being killed.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import NotFound, shown, shown_list
from zspace.index.errors import IndexError_

MAX_FIELD_CHARS = 256


class FilterError(IndexError_):
    """A payload filter that cannot mean anything: a malformed field or value, or a field no item has."""


def check_filter(field: str, value) -> None:
    """A filter is FIELD = VALUE with a plain field name and a JSON scalar value."""
    if not isinstance(field, str) or not field or len(field) > MAX_FIELD_CHARS:
        raise FilterError(f"filter field: expected a payload field name of 1 to {MAX_FIELD_CHARS} characters")
    if any(c in field for c in '"\\') or any(ord(c) < 32 for c in field):
        raise FilterError("filter field: must not contain quotes, backslashes or control characters")
    check_text(field, "filter field", FilterError)
    if isinstance(value, str):
        check_text(value, "filter value", FilterError)
    if isinstance(value, (dict, list)):
        raise FilterError(f"filter value: expected a string, number, true, false or null, got a JSON {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise FilterError("filter value: integer out of the 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError("filter value: must be a finite number")


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
    if json_depth(payload) > MAX_JSON_DEPTH:
        raise IndexError_(f"{field}: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    for name in payload:  # filters name top-level fields, and errors list them: each is bounded
        if isinstance(name, str) and len(name) > MAX_FIELD_CHARS:
            raise IndexError_(f"{field}: a field name of {len(name)} characters, over the limit of {MAX_FIELD_CHARS}")
    try:
        # ensure_ascii=False: a lone surrogate then fails the UTF-8 encoding below instead of being stored
        # as an escape that no reader can decode into a string it could use.
        text = json.dumps(payload, sort_keys=True, allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise IndexError_(f"{field}: NaN and Infinity are not JSON; use null or a string") from None
    except RecursionError:
        raise IndexError_(f"{field}: nested too deeply") from None
    except TypeError as exc:
        raise IndexError_(f"{field}: not JSON ({exc})") from None
    size = len(check_text(text, field).encode())
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
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        check_key(key, f"keys[{i}]")
        if key in first:
            raise IndexError_(f"keys[{i}]: {shown(key)} repeats keys[{first[key]}]; give each key once per request")
        first[key] = i
    texts = [payload_json(p, f"payloads[{i}]") for i, p in enumerate(payloads)]
    if not np.isfinite(vectors).all():
        raise IndexError_("vectors: contain NaN or infinity")
    return vectors, texts


def check_queries(queries, k: int, dim: int, binary: bool = False) -> np.ndarray:
    """A search's queries as float32 [n, dim] and its k, checked, whatever the backend."""
    queries = as_codes(queries, dim, binary, "queries")
    if k < 1:
        raise IndexError_(f"k: must be at least 1, got {k}")
    return queries

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
"""


@dataclass(frozen=True)
class Written:
    """What one write transaction did: the change-log position before and after it, and per item
    (old id or None, new id or None). An index that was at `before` can apply `pairs` directly;
    one that was not has missed another process's writes and replays the log instead."""

    before: int
    after: int
    pairs: list[tuple[int | None, int | None]]


@dataclass
class Item:
    id: int
    key: str
    vector: np.ndarray
    payload: dict


class ItemStore:
    """One writer connection, and a read connection per reading thread.

    A reader must never share the writer's connection: in SQLite a connection sees
    its own uncommitted changes, so a GetItem in the middle of a replace (delete,
    then insert) would find the key gone. Each thread reads through its own
    connection, which in WAL mode sees committed transactions only, and never
    waits for the writer."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = Path(path), dim
        # check_same_thread=False: the index serialises writes itself (one writer at a time, any thread).
        self.db = self._connect()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._watch = self._connect()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

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

    def upsert(self, keys: list[str], vectors: np.ndarray, texts: list[str]) -> Written:
        """Insert or replace items (payloads as JSON texts) in one transaction; (old id or None, new id) per item."""
        pairs = []
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._transaction() as before:
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

    def everything(self) -> tuple[int, np.ndarray, np.ndarray, dict[int, tuple[str, str]]]:
        """(change-log position, ids, vectors, id -> (key, payload JSON)) as of one moment.

        One read transaction: another process may commit between two plain SELECTs, and an
        index rebuilt from a mix would replay a change it already holds (a duplicate id)."""
        conn = self.reader
        conn.execute("BEGIN")
        try:
            seq = self._last_seq(conn)
            rows = conn.execute("SELECT id, key, vector, payload FROM items ORDER BY id").fetchall()
        finally:
            conn.execute("COMMIT")
        ids, vectors = self._stack([(r[0], r[2]) for r in rows])
        return seq, ids, vectors, {r[0]: (r[1], r[3]) for r in rows}

    def entries_of(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """(ids that still exist, their vectors, their (key, payload JSON)): what a replay adds."""
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), []
        found = []
        for start in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            found += self.reader.execute(f"SELECT id, key, vector, payload FROM items WHERE id IN ({marks}) ORDER BY id",
                                         chunk).fetchall()
        found.sort()
        i, v = self._stack([(r[0], r[2]) for r in found])
        return i, v, [(r[1], r[3]) for r in found]

    def _stack(self, rows) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, np.stack([self._vector(r[1]) for r in rows]).astype(np.float32)

    def ids_where(self, field: str, value) -> np.ndarray:
        """Ids of items whose payload's `field` equals `value`, a string or a number meaning the same.

        Labels come as numbers from some data sets and as strings from others, and a
        command line cannot tell `label=7` the number from "7" the string: 7 matches
        both 7 and "7" (and "7" both), as a user means. Booleans and null match
        themselves only. A field that no item has is an error, not an empty answer:
        it is nearly always a typo."""
        check_filter(field, value)
        path = f'$."{field}"'
        if isinstance(value, bool) or value is None:
            sql, args = "json_extract(payload, ?) IS ? AND json_type(payload, ?) IN ('true', 'false', 'null')", \
                (path, None if value is None else int(value), path)
        elif isinstance(value, (int, float)):
            sql, args = ("(json_type(payload, ?) IN ('integer', 'real') AND json_extract(payload, ?) = ?) OR "
                         "(json_type(payload, ?) = 'text' AND json_extract(payload, ?) = ?)",
                         (path, path, value, path, path, json.dumps(value)))
        else:
            sql, args = ("json_extract(payload, ?) = ? OR (json_type(payload, ?) IN ('integer', 'real') "
                         "AND CAST(json_extract(payload, ?) AS TEXT) = ?)", (path, value, path, path, value))
        rows = self.reader.execute(f"SELECT id FROM items WHERE {sql}", args).fetchall()
        if not rows and self.reader.execute("SELECT 1 FROM items LIMIT 1").fetchone() and not self.reader.execute(
                "SELECT 1 FROM items WHERE json_type(payload, ?) IS NOT NULL LIMIT 1", (path,)).fetchone():
            fields = {k for (p,) in self.reader.execute("SELECT payload FROM items LIMIT 100") for k in json.loads(p)}
            raise FilterError(f"filter: no item has a field {shown(field)} (fields seen: {shown_list(fields)})")
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def changes_since(self, seq: int) -> list[tuple[int, int | None, int | None]]:
        return self.reader.execute("SELECT seq, old_id, new_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def last_seq(self) -> int:
        return self._last_seq(self.reader)

    def count(self) -> int:
        return self.reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]
