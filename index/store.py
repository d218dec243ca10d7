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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import NotFound, shown
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
    if isinstance(value, (dict, list)):
        raise FilterError(f"filter value: expected a string, number, true, false or null, got a JSON {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise FilterError("filter value: integer out of the 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError("filter value: must be a finite number")


MAX_KEY_CHARS = 1024          # an item key
MAX_PAYLOAD_BYTES = 64 << 10  # one payload as JSON: a search answer carries k of them per query


def payload_json(payload: dict, field: str = "payload") -> str:
    """The one JSON form of a payload, stored and served as is; IndexError_ naming `field` if it cannot be one.

    Standard JSON only (no NaN or Infinity: other readers could not parse it), at most
    MAX_PAYLOAD_BYTES, nested no deeper than Python's own limit allows."""
    if not isinstance(payload, dict):
        raise IndexError_(f"{field}: must be a JSON object, got {type(payload).__name__}")
    try:
        text = json.dumps(payload, sort_keys=True, allow_nan=False)
    except ValueError:
        raise IndexError_(f"{field}: NaN and Infinity are not JSON; use null or a string") from None
    except RecursionError:
        raise IndexError_(f"{field}: nested too deeply") from None
    except TypeError as exc:
        raise IndexError_(f"{field}: not JSON ({exc})") from None
    size = len(text.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise IndexError_(f"{field}: {size} bytes of JSON, over the limit of {MAX_PAYLOAD_BYTES}")
    return text


def check_key(key: object, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise IndexError_(f"{field}: must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise IndexError_(f"{field}: {len(key)} characters, over the limit of {MAX_KEY_CHARS}")
    return key

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
        self.db.close()

    def _vector(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f4")

    def upsert(self, keys: list[str], vectors: np.ndarray, texts: list[str]) -> list[tuple[int | None, int]]:
        """Insert or replace items (payloads as JSON texts) in one transaction; (old id or None, new id) per item."""
        out = []
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._transaction():
            for key, vec, text in zip(keys, vectors, texts):
                row = self.db.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
                old = row[0] if row else None
                if old is not None:
                    self.db.execute("DELETE FROM items WHERE id = ?", (old,))
                cur = self.db.execute("INSERT INTO items (key, vector, payload) VALUES (?, ?, ?)",
                                      (key, vec.tobytes(), text))
                self.db.execute("INSERT INTO changes (old_id, new_id) VALUES (?, ?)", (old, cur.lastrowid))
                out.append((old, cur.lastrowid))
        return out

    def delete(self, keys: list[str]) -> list[int]:
        """Delete items by key in one transaction; returns the removed ids. Unknown keys raise NotFound first."""
        with self._transaction():
            ids = []
            for key in keys:
                row = self.db.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise NotFound(f"key {shown(key)} is not in the index")
                ids.append(row[0])
            for i in ids:
                self.db.execute("DELETE FROM items WHERE id = ?", (i,))
                self.db.execute("INSERT INTO changes (old_id, new_id) VALUES (?, NULL)", (i,))
        return ids

    def _transaction(self):
        db = self.db

        class Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return Tx()

    def get(self, key: str) -> Item | None:
        row = self.reader.execute("SELECT id, key, vector, payload FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else Item(row[0], row[1], self._vector(row[2]), json.loads(row[3]))

    def all_entries(self) -> dict[int, tuple[str, str]]:
        """id -> (key, payload as JSON) for every item: the index keeps this in memory for searches."""
        return {i: (k, p) for i, k, p in self.reader.execute("SELECT id, key, payload FROM items")}

    def vectors_of(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids that still exist, their vectors)."""
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        marks = ",".join("?" * len(ids))
        rows = self.reader.execute(f"SELECT id, vector FROM items WHERE id IN ({marks})", list(ids)).fetchall()
        return self._stack(rows)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._stack(self.reader.execute("SELECT id, vector FROM items ORDER BY id").fetchall())

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
            fields = sorted({k for (p,) in self.reader.execute("SELECT payload FROM items LIMIT 100") for k in json.loads(p)})
            raise FilterError(f"filter: no item has a field {field!r} (fields seen: {', '.join(fields) or 'none'})")
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def changes_since(self, seq: int) -> list[tuple[int, int | None, int | None]]:
        return self.reader.execute("SELECT seq, old_id, new_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def last_seq(self) -> int:
        return self.reader.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def count(self) -> int:
        return self.reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]
