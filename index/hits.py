"""What a search hit returns for a FAISS id: the item's key and payload, kept in flat arrays.

A single HNSW query over 60k codes takes tens of microseconds, and looking its
ten hits up in a dict of 60k tuples added a quarter to that, nearly all of it
cache misses (hash slot, entry, the int key, the tuple, the strings). Here an id
goes through one int32 array to a slot, and the slot indexes three lists: about
half the misses, and one vectorised gather instead of ten probes.

Ids come from the item store: they start at 1 and only grow (a replace gets a
new id), so the id → slot array holds 4 bytes for every id ever issued; slots
freed by deletes are reused. Element 0 (no item has id 0) and the last element
stay ABSENT, so clipping FAISS's -1 ("no hit") and any id beyond the table
lands on ABSENT without a branch.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

ABSENT = -1


class Hit(NamedTuple):
    """One search result: the item's key, its distance (cosine: 1 − cos) and its payload (a dict, or its JSON text)."""

    key: str
    distance: float
    payload: dict | str


class HitTable:
    """id -> (key, payload as its stored JSON text). Only the text is kept: a payload is parsed
    when a caller wants it as a dict, so memory holds each payload once."""

    def __init__(self, entries: dict[int, tuple[str, str]] | None = None):
        self.slot_of = np.full(1024, ABSENT, dtype=np.int32)
        self.keys: list[str | None] = []
        self.jsons: list[str | None] = []
        self._free: list[int] = []
        for i, (key, text) in (entries or {}).items():
            self.put(i, key, text)

    def __len__(self) -> int:
        return len(self.keys) - len(self._free)

    def put(self, item_id: int, key: str, text: str) -> None:
        if item_id < 1:
            raise ValueError(f"item ids start at 1, got {item_id}")
        if item_id + 1 >= len(self.slot_of):
            grown = np.full(max(2 * len(self.slot_of), item_id + 2), ABSENT, dtype=np.int32)
            grown[: len(self.slot_of)] = self.slot_of
            self.slot_of = grown
        slot = self.slot_of[item_id]
        if slot == ABSENT:
            slot = self._free.pop() if self._free else len(self.keys)
            if slot == len(self.keys):
                self.keys.append(None)
                self.jsons.append(None)
            self.slot_of[item_id] = slot
        self.keys[slot], self.jsons[slot] = key, text

    def pop(self, item_id: int) -> None:
        if 0 <= item_id < len(self.slot_of) - 1 and (slot := int(self.slot_of[item_id])) != ABSENT:
            self.slot_of[item_id] = ABSENT
            self.keys[slot] = self.jsons[slot] = None
            self._free.append(slot)

    def hits(self, dist: np.ndarray, ids: np.ndarray, cosine: bool, as_json: bool) -> list[list[Hit]]:
        """Per query row, (key, distance, payload) of each hit that still exists, in FAISS's order."""
        slots = self.slot_of.take(ids, mode="clip").tolist()  # -1 and unknown ids: ABSENT (module docstring)
        keys, texts = self.keys, self.jsons
        if cosine:
            dist = 1.0 - dist
        if as_json:
            return [[Hit(keys[s], d, texts[s]) for d, s in zip(drow, srow) if s >= 0]
                    for drow, srow in zip(dist.tolist(), slots)]
        return [[Hit(keys[s], d, json.loads(texts[s])) for d, s in zip(drow, srow) if s >= 0]
                for drow, srow in zip(dist.tolist(), slots)]

    def text_bytes(self, ids: np.ndarray) -> int:
        """The payload characters the hits `ids` would send: to bound an answer before building it."""
        slots = self.slot_of.take(ids, mode="clip")
        texts = self.jsons
        return sum(len(texts[s]) for s in slots.ravel().tolist() if s >= 0)
