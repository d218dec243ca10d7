"""What a search answers per hit: the item's key, its distance and its payload.

Keys and payloads are not held in memory: after FAISS has found the k nearest ids, the item
store is asked for those rows only (one indexed SELECT, about 0.09 ms for 10 rows of a million).
Holding every key and payload in Python took most of 720 MB at a million items, in every worker.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np


class Hit(NamedTuple):
    """One search result: the item's key, its distance (cosine: 1 − cos) and its payload (a dict, or its JSON text)."""

    key: str
    distance: float
    payload: dict | str


def hits_of(dist: np.ndarray, ids: np.ndarray, rows: dict[int, tuple[str, str]], cosine: bool,
            as_json: bool) -> list[list[Hit]]:
    """Per query row, a Hit for each id that `rows` (id -> key, payload JSON) holds, in FAISS's order.

    Ids FAISS marks -1 (no hit), and items deleted since FAISS found them, are left out."""
    if cosine:
        dist = 1.0 - dist
    out = []
    for drow, irow in zip(dist.tolist(), ids.tolist()):
        row = []
        for d, i in zip(drow, irow):
            found = rows.get(i)
            if found is not None:
                row.append(Hit(found[0], d, found[1] if as_json else json.loads(found[1])))
        out.append(row)
    return out
