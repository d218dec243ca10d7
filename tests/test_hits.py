"""hits_of: FAISS ids to keys and payloads read from the item store."""

import numpy as np
import pytest

from zspace.index.hits import hits_of


def test_hits_keep_faiss_order_and_drop_missing_ids():
    rows = {1: ("a", '{"n": 1}'), 2: ("b", "{}")}
    hits = hits_of(np.array([[0.5, 1.0, 2.0, 3.0]], np.float32), np.array([[-1, 2, 99, 1]]), rows, False, False)
    assert hits == [[("b", 1.0, {}), ("a", 3.0, {"n": 1})]]


def test_json_texts_and_cosine_distances():
    rows = {7: ("k", '{"a": 1}')}
    (hit,), = hits_of(np.array([[0.75]], np.float32), np.array([[7]]), rows, True, True)
    assert hit.key == "k" and hit.payload == '{"a": 1}' and hit.distance == pytest.approx(0.25)
