"""One index folder, several writers and readers (a server's workers): every index follows the item store.

Each LatentIndex here stands for one worker process; the last test uses real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from zspace.index.latent_index import IndexBusy, LatentIndex

ROOT = Path(__file__).resolve().parents[1]


def vectors(n: int, seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def agree(index: LatentIndex, truth: dict[str, np.ndarray]) -> None:
    """The index holds exactly `truth`: each vector finds its own key, counts match, nothing extra."""
    assert index.stats()["count"] == len(truth)
    assert index.index.ntotal - len(index.tombstones) == len(truth)
    keys = sorted(truth)
    if not keys:
        return
    q = np.stack([truth[k] for k in keys])
    found = index.search(q, 1)
    assert [hits[0].key for hits in found] == keys


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_writes_through_one_index_are_seen_by_the_next_search_of_another(tmp_path, factory):
    LatentIndex.create(tmp_path / "ix", "m", 1, 8, factory=factory).close()
    a = LatentIndex.open(tmp_path / "ix", follow=True)
    b = LatentIndex.open(tmp_path / "ix", snapshots=False, follow=True)
    truth: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(1)
    for step in range(30):  # IVF4 trains at 156 codes: the stand-in is swapped for it on the way, in both
        writer = (a, b)[step % 2]
        keys = [f"k{int(i)}" for i in rng.integers(0, 200, 12)]
        keys = list(dict.fromkeys(keys))
        x = vectors(len(keys), seed=step)
        writer.upsert(keys, x, [{"step": step}] * len(keys))
        truth.update(zip(keys, x))
        if step % 3 == 2:
            gone = list(truth)[:3]
            (b, a)[step % 2].delete(gone)
            for k in gone:
                truth.pop(k)
        agree(a, truth)
        agree(b, truth)
    assert a.stats()["trained"] and b.stats()["trained"]
    # Only the snapshot writer writes snapshots: b's close leaves a's file alone.
    a.close()
    before = json.loads((tmp_path / "ix" / "snapshot.json").read_text())
    b.close()
    assert json.loads((tmp_path / "ix" / "snapshot.json").read_text()) == before
    reopened = LatentIndex.open(tmp_path / "ix")
    agree(reopened, truth)
    reopened.close()


def test_a_write_that_misses_another_processs_write_replays_both_in_order(tmp_path):
    LatentIndex.create(tmp_path / "ix", "m", 1, 8).close()
    a = LatentIndex.open(tmp_path / "ix", follow=True)
    b = LatentIndex.open(tmp_path / "ix", snapshots=False, follow=True)
    a.upsert(["x"], vectors(1, 0), [{"by": "a"}])
    b.upsert(["x"], vectors(1, 1), [{"by": "b"}])  # b never searched: it learns of a's write from the log
    assert b.search(vectors(1, 1), 1)[0][0].payload == {"by": "b"}
    assert a.search(vectors(1, 1), 1)[0][0].payload == {"by": "b"}
    agree(a, {"x": vectors(1, 1)[0]})
    agree(b, {"x": vectors(1, 1)[0]})
    a.close()
    b.close()


def test_a_non_blocking_search_of_a_stale_index_hands_over_instead_of_waiting(tmp_path):
    LatentIndex.create(tmp_path / "ix", "m", 1, 8, factory="HNSW32").close()
    a = LatentIndex.open(tmp_path / "ix", follow=True)
    b = LatentIndex.open(tmp_path / "ix", snapshots=False, follow=True)
    a.upsert(["x"], vectors(1, 0), [{}])
    with pytest.raises(IndexBusy):
        b.search(vectors(1, 0), 1, blocking=False)  # the event loop's path: catching up is a thread's job
    assert b.search(vectors(1, 0), 1)[0][0].key == "x"
    assert b.search(vectors(1, 0), 1, blocking=False)[0][0].key == "x"  # level again: the cheap path
    a.close()
    b.close()


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from zspace.index.latent_index import LatentIndex
    ix = LatentIndex.open(sys.argv[1], snapshots=False, follow=True)
    for line in sys.stdin:
        i = int(line)
        ix.upsert([f"k{i}"], np.full((1, 8), float(i), np.float32), [{"i": i}])
        print(i, flush=True)  # acknowledged: committed to the store
""")


def test_read_your_writes_across_processes(tmp_path):
    LatentIndex.create(tmp_path / "ix", "m", 1, 8, factory="HNSW32").close()
    reader = LatentIndex.open(tmp_path / "ix", follow=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ix")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for i in range(40):
            proc.stdin.write(f"{i}\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == str(i)
            hit = reader.search(np.full((1, 8), float(i), np.float32), 1)[0][0]
            assert hit.key == f"k{i}" and hit.payload == {"i": i}, f"write {i} acknowledged but not seen"
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert reader.stats()["count"] == 40
    reader.close()
