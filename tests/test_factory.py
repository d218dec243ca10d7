"""FAISS factory strings: traits asked of FAISS, atomic index creation, the cases the letters got wrong."""

from __future__ import annotations

import numpy as np
import pytest

from zspace.errors import UserError
from zspace.index.build import build_index
from zspace.index.contract import IndexSpec
from zspace.index.errors import FactoryError
from zspace.index.factory import traits
from zspace.index.latent_index import LatentIndex


@pytest.mark.parametrize("factory, family, min_points, removable", [
    ("Flat", "", 0, True),
    ("HNSW32", "HNSW", 0, False),
    ("IVF4_HNSW8,Flat", "IVF", 4, True),   # an IVF index whose coarse quantizer is a graph: removable
    ("SQ8", "", 1, True),                  # needs training although no number says so
    ("HNSW32,SQ8", "HNSW", 1, False),
    ("IVF256,PQ8", "IVF", 256, True),
    ("PQ4x4", "", 16, True),               # 2^4 centroids per sub-quantizer
])
def test_traits_come_from_faiss(factory, family, min_points, removable):
    t = traits(factory, 16)
    assert (t.family, t.min_points, t.removable) == (family, min_points, removable)


@pytest.mark.parametrize("factory, message", [
    ("NoSuchThing", "could not parse index string NoSuchThing"),
    ("BFlat", "binary index"),
    ("IDMap,Flat", "zspace assigns the ids"),
    ("", "expected a FAISS factory string"),
])
def test_unbuildable_factories_are_refused_by_name(factory, message):
    with pytest.raises(FactoryError, match=message):
        traits(factory, 16)


def test_sq8_index_trains_once_it_has_codes_and_a_bad_create_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    idx = LatentIndex.create(tmp_path / "sq8", "m", 1, 8, factory="SQ8")
    assert not idx.stats()["trained"] and "trains at 1 codes" in idx.stats()["training_note"]
    x = rng.standard_normal((50, 8)).astype(np.float32)
    idx.upsert([f"k{i}" for i in range(50)], x, [{}] * 50)
    assert idx.stats()["trained"] and idx.trained_kind
    assert idx.search(x[:1], 1)[0][0].key == "k0"
    idx.close()
    # A factory FAISS cannot build: a clear error, no folder, and a retry with a good one works.
    with pytest.raises(FactoryError, match="FAISS cannot build"):
        LatentIndex.create(tmp_path / "bad", "m", 1, 8, factory="NoSuchThing")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    LatentIndex.create(tmp_path / "bad", "m", 1, 8, factory="Flat").close()


def test_ivf_with_an_hnsw_quantizer_deletes_for_real(tmp_path):
    rng = np.random.default_rng(1)
    idx = LatentIndex.create(tmp_path / "ivf", "m", 1, 8, factory="IVF4_HNSW8,Flat")
    x = rng.standard_normal((200, 8)).astype(np.float32)
    idx.upsert([f"k{i}" for i in range(200)], x, [{}] * 200)
    assert idx.trained_kind and idx.index.ntotal == 200
    idx.delete([f"k{i}" for i in range(50)])
    assert idx.index.ntotal == 150 and idx.stats()["tombstones"] == 0, "removed from FAISS, not hidden"
    hits = idx.search(x[:50], 5)
    assert not {h.key for row in hits for h in row} & {f"k{i}" for i in range(50)}
    idx.close()


def test_a_failed_build_leaves_no_index_folder(tmp_path, vae_bundle):
    out = tmp_path / "indexes" / "digits"
    with pytest.raises(UserError):
        build_index(vae_bundle, "mnist:/nonexistent", out)
    assert not out.exists() and not list(out.parent.glob(".*"))
    with pytest.raises(FactoryError):
        build_index(vae_bundle, "digits", out, IndexSpec(factory="NoSuchThing"))
    assert not out.exists()
    index = build_index(vae_bundle, "digits", out, IndexSpec(factory="IVF8,Flat"), quiet=True)
    assert index.stats()["trained"] and index.stats()["count"] > 1000
    index.close()
