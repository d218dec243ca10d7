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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import NotFound


def payload_json(payload: dict) -> str:
    """The one JSON form of a payload, stored and served as is."""
    return json.dumps(payload, sort_keys=True)

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
    def __init__(self, path: Path, dim: int):
        self.path, self.dim = Path(path), dim
        # check_same_thread=False: the index serialises writes itself; reads are safe in WAL mode.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _vector(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f4")

    def upsert(self, keys: list[str], vectors: np.ndarray, payloads: list[dict]) -> list[tuple[int | None, int]]:
        """Insert or replace items in one transaction; returns (old id or None, new id) per item."""
        out = []
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._transaction():
            for key, vec, payload in zip(keys, vectors, payloads):
                row = self.db.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
                old = row[0] if row else None
                if old is not None:
                    self.db.execute("DELETE FROM items WHERE id = ?", (old,))
                cur = self.db.execute("INSERT INTO items (key, vector, payload) VALUES (?, ?, ?)",
                                      (key, vec.tobytes(), payload_json(payload)))
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
                    raise NotFound(f"key {key!r} is not in the index")
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
        row = self.db.execute("SELECT id, key, vector, payload FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else Item(row[0], row[1], self._vector(row[2]), json.loads(row[3]))

    def all_entries(self) -> dict[int, tuple[str, dict, str]]:
        """id -> (key, payload, payload as JSON) for every item: the index keeps this in memory for searches."""
        return {i: (k, json.loads(p), p) for i, k, p in self.db.execute("SELECT id, key, payload FROM items")}

    def vectors_of(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids that still exist, their vectors)."""
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT id, vector FROM items WHERE id IN ({marks})", list(ids)).fetchall()
        return self._stack(rows)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._stack(self.db.execute("SELECT id, vector FROM items ORDER BY id").fetchall())

    def _stack(self, rows) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, np.stack([self._vector(r[1]) for r in rows]).astype(np.float32)

    def ids_where(self, field: str, value) -> np.ndarray:
        """Ids of items whose payload has field == value (JSON equality)."""
        rows = self.db.execute("SELECT id FROM items WHERE json_extract(payload, ?) = ?",
                               (f'$."{field}"', value if not isinstance(value, bool) else int(value))).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def changes_since(self, seq: int) -> list[tuple[int, int | None, int | None]]:
        return self.db.execute("SELECT seq, old_id, new_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def last_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
