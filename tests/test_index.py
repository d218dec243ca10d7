"""The latent index on real FAISS and a real SQLite file: every factory, durability, recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zspace.errors import NotFound
from zspace.index.latent_index import IndexBusy, IndexError_, LatentIndex

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = ["Flat", "HNSW32", "IVF4,Flat", "IVF4,PQ4x4"]


def vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def exact(x: np.ndarray, keys: list[str], q: np.ndarray, k: int) -> list[str]:
    d = ((x - q) ** 2).sum(1)
    return [keys[i] for i in np.argsort(d, kind="stable")[:k]]


@pytest.mark.parametrize("factory", FACTORIES)
def test_upsert_replace_delete_search(tmp_path, factory):
    idx = LatentIndex.create(tmp_path / "ix", "digits", 1, 8, factory=factory)
    x = vectors(300)
    keys = [f"k{i}" for i in range(300)]
    idx.upsert(keys, x, [{"label": i % 3} for i in range(300)])
    assert idx.stats()["count"] == 300 and idx.stats()["trained"]
    lossy = "PQ" in factory  # compressed codes: a vector is near, not always first, to itself
    hits = idx.search(x[:5], 5 if lossy else 1)
    assert all(keys[i] in [h[0] for h in hits[i]] for i in range(5)), "each stored vector finds itself"
    # replace: k0 moves far away; its old vector must not be found any more
    idx.upsert(["k0"], np.full((1, 8), 50.0, np.float32), [{"label": 9}])
    assert idx.search(x[:1], 1)[0][0][0] != "k0"
    assert idx.search(np.full((1, 8), 50.0, np.float32), 1)[0][0][:1] == ("k0",)
    assert idx.get("k0").payload == {"label": 9}
    # delete
    idx.delete(["k1", "k2"])
    found = {h[0] for h in idx.search(x[1:3], 5)[0] + idx.search(x[1:3], 5)[1]}
    assert not found & {"k1", "k2"}
    with pytest.raises(NotFound):
        idx.get("k1")
    with pytest.raises(NotFound):
        idx.delete(["nope"])
    assert idx.stats()["count"] == 298 and idx.index.ntotal - idx.stats()["tombstones"] == 298
    idx.close()


def test_single_query_paths_agree_and_a_write_makes_a_non_blocking_search_decline(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 8, factory="HNSW32")
    x = vectors(500)
    idx.upsert([f"k{i}" for i in range(500)], x, [{"i": i} for i in range(500)])
    batched = idx.search(x[:20], 5)
    single = [idx.search(x[i : i + 1], 5)[0] for i in range(20)]  # one query: FAISS on this thread alone
    assert batched == single == idx.search(x[:20], 5, one_thread=True)
    assert [hits[0][0] for hits in single] == [f"k{i}" for i in range(20)]

    entered, release, result = threading.Event(), threading.Event(), []

    def writer():
        with idx.lock.write():
            entered.set()
            release.wait(10)

    w = threading.Thread(target=writer)
    w.start()
    assert entered.wait(10)
    with pytest.raises(IndexBusy):
        idx.search(x[:1], 5, blocking=False)
    reader = threading.Thread(target=lambda: result.append(idx.search(x[:1], 5)))
    reader.start()
    time.sleep(0.2)
    assert not result, "a blocking search waits for the write"
    release.set()
    w.join(10)
    reader.join(10)
    assert result == [single[:1]]
    assert idx.search(x[:1], 5, blocking=False) == single[:1]
    idx.close()


def test_flat_search_is_exact_and_filters(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 8)
    x = vectors(200)
    keys = [f"k{i}" for i in range(200)]
    idx.upsert(keys, x, [{"label": i % 4, "even": i % 2 == 0} for i in range(200)])
    q = vectors(3, seed=9)
    for row, hits in zip(q, idx.search(q, 10)):
        assert [h[0] for h in hits] == exact(x, keys, row, 10)
    only = idx.search(q, 5, where=("label", 2))
    assert all(h[2]["label"] == 2 for hits in only for h in hits) and all(len(h) == 5 for h in only)
    assert idx.search(np.zeros((1, 8), np.float32), 3, where=("label", 99)) == [[]]


def test_reopen_after_close_and_model_pairing(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "digits", 2, 8, factory="HNSW32")
    x = vectors(100)
    idx.upsert([f"k{i}" for i in range(100)], x, [{}] * 100)
    idx.delete(["k5"])
    before = idx.search(x[:10], 3)
    idx.close()
    again = LatentIndex.open(tmp_path / "ix", "digits", 2)
    assert again.search(x[:10], 3) == before
    assert again.stats()["count"] == 99
    with pytest.raises(IndexError_, match="holds codes of digits/2, not digits/3"):
        LatentIndex.open(tmp_path / "ix", "digits", 3)
    with pytest.raises(IndexError_, match="already exists"):
        LatentIndex.create(tmp_path / "ix", "digits", 2, 8)


def test_changes_after_the_snapshot_are_replayed(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 8)
    x = vectors(50)
    idx.upsert([f"k{i}" for i in range(50)], x, [{}] * 50)
    idx.snapshot()
    idx.upsert(["k0"], np.full((1, 8), 9.0, np.float32), [{"v": 2}])
    idx.delete(["k1"])
    idx.store.close()  # no close(): the snapshot is now behind the store
    again = LatentIndex.open(tmp_path / "ix")
    assert again.index.ntotal == 49
    assert again.search(np.full((1, 8), 9.0, np.float32), 1)[0][0][0] == "k0"


def test_corrupt_or_missing_snapshot_is_rebuilt(tmp_path, caplog):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 8)
    x = vectors(40)
    idx.upsert([f"k{i}" for i in range(40)], x, [{}] * 40)
    idx.close()
    snap = tmp_path / "ix" / json.loads((tmp_path / "ix" / "snapshot.json").read_text())["file"]
    snap.write_bytes(snap.read_bytes()[:100])  # a truncated write
    again = LatentIndex.open(tmp_path / "ix")
    assert "snapshot unusable" in caplog.text
    assert again.index.ntotal == 40 and again.search(x[:1], 1)[0][0][0] == "k0"
    again.close()
    (tmp_path / "ix" / "snapshot.json").unlink()
    third = LatentIndex.open(tmp_path / "ix")
    assert "snapshot missing" in caplog.text and third.index.ntotal == 40


def test_ivf_trains_once_enough_codes_exist(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 8, factory="IVF32,Flat")
    x = vectors(20)
    idx.upsert([f"a{i}" for i in range(20)], x, [{}] * 20)
    st = idx.stats()
    assert not st["trained"] and "trains at 32 codes; 20 stored" in st["training_note"]
    assert idx.search(x[:1], 1)[0][0][0] == "a0", "exact search until trained"
    idx.upsert([f"b{i}" for i in range(20)], vectors(20, seed=1), [{}] * 20)
    assert idx.stats()["trained"] and idx.index.ntotal == 40


def test_cosine_metric(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 2, metric="cosine")
    idx.upsert(["east", "north", "far-east"], np.array([[1, 0], [0, 1], [10, 0.1]], np.float32), [{}] * 3)
    hits = idx.search(np.array([[3, 0]], np.float32), 3)[0]
    assert [h[0] for h in hits][:2] in (["east", "far-east"], ["far-east", "east"])
    assert hits[0][1] == pytest.approx(0.0, abs=1e-4) and hits[-1][0] == "north"


def test_bad_input(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 4)
    with pytest.raises(IndexError_, match=r"vectors: expected shape \[n, 4\]"):
        idx.upsert(["a"], np.zeros((1, 3)), [{}])
    with pytest.raises(IndexError_, match="keys\\[0\\]: must be a non-empty string"):
        idx.upsert([""], np.zeros((1, 4)), [{}])
    with pytest.raises(IndexError_, match="payloads\\[0\\]: must be a JSON object"):
        idx.upsert(["a"], np.zeros((1, 4)), [[1, 2]])
    with pytest.raises(IndexError_, match="k: must be at least 1"):
        idx.search(np.zeros((1, 4)), 0)
    assert idx.search(np.zeros((1, 4), np.float32), 5) == [[]], "an empty index returns no hits"
    with pytest.raises(IndexError_, match="FAISS cannot build"):
        LatentIndex.create(tmp_path / "bad", "m", 1, 4, factory="NoSuchThing")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from zspace.index.latent_index import LatentIndex
    idx = LatentIndex.open({path!r})
    rng = np.random.default_rng(0)
    for i in range(100000):
        idx.upsert([f"k{{i}}"], rng.standard_normal((1, 8)).astype(np.float32), [{{"i": i}}])
        print(i, flush=True)  # acknowledged
""")


def test_kill_9_loses_no_acknowledged_upsert(tmp_path):
    LatentIndex.create(tmp_path / "ix", "m", 1, 8).close()
    script = WRITER.format(root=str(ROOT), path=str(tmp_path / "ix"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()  # lines written before the kill are acknowledged too
    if rest.strip():
        acked = int(rest.split()[-1])
    proc.wait()
    assert acked >= 150, "the writer made progress before the kill"
    idx = LatentIndex.open(tmp_path / "ix")
    for i in range(acked + 1):
        assert idx.get(f"k{i}").payload == {"i": i}
    assert idx.index.ntotal == idx.stats()["count"] >= acked + 1


def test_every_backend_offers_the_index_contract(tmp_path):
    """index/contract.py declares the surface; each backend class named in index/backends.py has all of it."""
    import inspect

    from zspace.index.backends import BACKENDS, backend_class
    from zspace.index.contract import LatentCodeIndex

    index = LatentIndex.create(tmp_path / "ix", "m", 1, 4)
    assert isinstance(index, LatentCodeIndex)
    index.close()
    methods = [n for n, v in vars(LatentCodeIndex).items() if inspect.isfunction(v) or isinstance(v, property)]
    assert {"upsert", "delete", "get", "search", "stats", "moved", "close", "model"} <= set(methods)
    for name in BACKENDS:
        cls = backend_class(name)
        missing = [m for m in methods + ["open_folder", "build", "default_factory", "check_spec"] if not hasattr(cls, m)]
        assert not missing, f"{name}: {missing}"
