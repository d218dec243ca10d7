"""HitTable: FAISS ids to keys and payloads through flat arrays."""

import numpy as np
import pytest

from zspace.index.hits import HitTable


def test_put_pop_reuse_and_growth():
    table = HitTable({1: ("a", '{"n": 1}'), 2: ("b", "{}")})
    table.put(5000, "far", '{"x": true}')  # beyond the initial 1024 ids: the array grows
    assert len(table) == 3
    table.pop(2)
    table.pop(2)  # twice, and unknown ids, are no-ops
    table.pop(999_999)
    assert len(table) == 2
    table.put(5001, "c", "{}")  # takes the slot "b" freed
    assert len(table.keys) == 3 and len(table) == 3
    hits = table.hits(np.array([[0.5, 1.0, 2.0, 3.0]], np.float32), np.array([[5001, 5000, 2, 1]]), False, False)
    assert hits == [[("c", 0.5, {}), ("far", 1.0, {"x": True}), ("a", 3.0, {"n": 1})]]


def test_no_hit_and_unknown_ids_are_skipped():
    table = HitTable({3: ("k", "{}")})
    dist = np.array([[0.2, 9.0, 9.0], [0.1, 0.3, 9.0]], np.float32)
    ids = np.array([[3, -1, -1], [10**9, 3, -1]], np.int64)  # -1: FAISS found fewer than k
    assert table.hits(dist, ids, False, True) == [[("k", pytest.approx(0.2), "{}")], [("k", pytest.approx(0.3), "{}")]]


def test_cosine_distance_and_json_payloads():
    table = HitTable({7: ("k", '{"a": 1}')})
    (hit,), = table.hits(np.array([[0.75]], np.float32), np.array([[7]]), True, True)
    assert hit == ("k", pytest.approx(0.25), '{"a": 1}')


def test_ids_start_at_one():
    with pytest.raises(ValueError, match="start at 1"):
        HitTable().put(0, "k", "{}")
