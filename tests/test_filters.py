"""The filter language, payload indexes and the query planner: one meaning on every backend.

The same filters run against FAISS (payloads parsed by SQLite; payload indexes; payload indexes
with the ANN path forced), milvus-lite and a real Milvus standalone server, and each answer is
compared with a plain Python reading of the language (`reference`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from serving import digits_served

from zspace.index.backends import open_index
from zspace.index.contract import FilterError
from zspace.index.errors import IndexError_
from zspace.index.filters import Condition, as_filter, parse_condition
from zspace.index.latent_index import LatentIndex
from zspace.service.client import ZSpaceClient
from zspace.v1 import zspace_pb2 as pb

FIELDS = ["label:int", "cat:keyword", "year:int", "score:float", "ok:bool"]
N, DIM = 60, 4


def payload(i: int) -> dict:
    p = {"label": str(i % 5) if i % 7 == 0 else i % 5, "cat": f"c{i % 4}", "score": round(i * 0.37 % 10, 2),
         "ok": i % 2 == 0, "note": "x"}
    if i % 9:
        p["year"] = 1990 + i % 20
    return p


def _number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        n = json.loads(v)
    except ValueError:
        return None
    return n if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def _equal(p, v) -> bool:
    if p is None:
        return False
    if isinstance(v, bool) or isinstance(p, bool):
        return isinstance(p, bool) and isinstance(v, bool) and p == v
    if isinstance(p, str) and isinstance(v, str) and p == v:
        return True
    return _number(p) is not None and _number(v) is not None and _number(p) == _number(v) and \
        (not isinstance(p, str) or not isinstance(v, str))


def reference(p: dict, where: tuple[Condition, ...]) -> bool:
    """The language as its docstring says, read plainly."""
    for c in where:
        v = p.get(c.field)
        if v is None:
            return False
        if c.op == "==" and not _equal(v, c.value):
            return False
        if c.op == "!=" and _equal(v, c.value):
            return False
        if c.op == "in" and not any(_equal(v, x) for x in c.value):
            return False
        if c.op in ("<", "<=", ">", ">="):
            if isinstance(c.value, str) != isinstance(v, str) or isinstance(v, bool):
                return False
            if not {"<": v < c.value, "<=": v <= c.value, ">": v > c.value, ">=": v >= c.value}[c.op]:
                return False
    return True


FILTERS = [["label == 3"], ['label = "3"'], ["label != 3"], ['label in (1, "2")'], ["year >= 2000"],
           ["year < 1995", "label == 1"], ["cat in (c1, c3)"], ["cat > c1"], ["score <= 2.5"], ["ok == true"],
           ["ok != true"], ["cat != c0", "year > 2005", "ok == false"], ["note == x", "label == 2"], ["year != 1999"],
           ["score > 100"]]


@pytest.fixture(params=["faiss", "faiss-indexed", "faiss-ann", "faiss-ivf", "milvus-lite", "milvus-server"])
def filled(request, tmp_path):
    """(an index of N items with `payload(i)`, its codes), on each backend."""
    kind = request.param
    folder = tmp_path / "ix"
    if kind.startswith("milvus"):
        from zspace.index.milvus_index import MilvusIndex

        uri = request.getfixturevalue("milvus_server").uri if kind == "milvus-server" else str(folder / "milvus.db")
        index = MilvusIndex.create(folder, "m", 1, DIM, uri, collection=f"filters_{os.getpid()}_{tmp_path.name[-8:]}"
                                   .replace("-", "_"), factory="Flat")
        index.add_fields(FIELDS)
    else:
        factory = {"faiss-ann": "HNSW32", "faiss-ivf": "IVF4,Flat"}.get(kind, "Flat")
        index = LatentIndex.create(folder, "m", 1, DIM, factory, fields=FIELDS if kind != "faiss" else ())
        if kind in ("faiss-ann", "faiss-ivf"):
            index.exact_limit = 0  # every filter through HNSW or IVF with a bitmap selector, probed per query
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    index.upsert([f"k{i}" for i in range(N)], x, [payload(i) for i in range(N)])
    if kind == "faiss-ivf":
        assert index.trained_family == "IVF"
    yield index, x
    if kind.startswith("milvus"):
        index.client.drop_collection(index.collection)
    index.close()


@pytest.mark.parametrize("where", FILTERS, ids=[" AND ".join(w) for w in FILTERS])
def test_every_backend_answers_what_the_language_says(filled, where):
    index, x = filled
    conditions = as_filter(where)
    want = {f"k{i}" for i in range(N) if reference(payload(i), conditions)}
    got = {h.key for h in index.search(x[:1], N, where)[0]}
    assert got == want, (where, sorted(got ^ want))
    assert index.explain(where)["matches"] == len(want)


def test_the_command_line_syntax():
    assert parse_condition("label=3") == Condition("label", "==", 3)
    assert parse_condition("label == coat") == Condition("label", "==", "coat")
    assert parse_condition("year>=2000") == Condition("year", ">=", 2000)
    assert parse_condition('cat in (1, "a,b", c)') == Condition("cat", "in", (1, "a,b", "c"))
    assert parse_condition("cat in [1,2]") == Condition("cat", "in", (1, 2))
    assert parse_condition("name != bob") == Condition("name", "!=", "bob")
    assert as_filter({"label": 3, "cat": [1, 2]}) == (Condition("label", "==", 3), Condition("cat", "in", (1, 2)))
    assert as_filter(("label", "7")) == (Condition("label", "==", "7"),)


@pytest.mark.parametrize("text, message", [
    ("label", "expected FIELD OP VALUE"),
    ("label ~ 3", "expected FIELD OP VALUE"),
    ("year >= true", "`>=` compares numbers or strings"),
    ("cat in ()", "`in` takes a non-empty list"),
    ("cat in 3", "`in` takes a list in parentheses"),
    ("label == null", "null cannot be matched"),
    ('la"bel == 3', "must not contain quotes"),
    ("label == [1]", "got a JSON array"),
])
def test_bad_filters_name_what_is_wrong(text, message):
    with pytest.raises(FilterError, match=message):
        parse_condition(text)


def test_limits_and_field_names():
    with pytest.raises(FilterError, match="over the limit of 16"):
        as_filter([f"f{i} == 1" for i in range(17)])
    with pytest.raises(FilterError, match="must not contain quotes"):
        as_filter([Condition('a"b', "==", 1)])
    with pytest.raises(FilterError, match="over the limit of 1024"):
        as_filter({"cat": list(range(1025))})


def test_typed_fields_refuse_what_they_cannot_hold(tmp_path):
    index = LatentIndex.create(tmp_path / "ix", "m", 1, DIM, fields=["year:int", "cat:keyword"])
    x = np.zeros((2, DIM), np.float32)
    index.upsert(["a", "b"], x, [{"year": "2001", "cat": 7}, {"year": 2002.0}])  # coerced: 2001, "7", 2002
    assert {h.key for h in index.search(x[:1], 5, ["year >= 2001", "cat == 7"])[0]} == {"a"}
    with pytest.raises(IndexError_, match=r"payloads\[1\].year: field 'year' is indexed as int, and \"soon\" is not an int"):
        index.upsert(["c", "d"], x, [{"year": 2003}, {"year": "soon"}])
    assert index.stats()["count"] == 2, "a refused write writes nothing"
    with pytest.raises(FilterError, match="year is indexed as int; `<` needs a number"):
        index.search(x[:1], 5, ["year < abc"])
    with pytest.raises(IndexError_, match="expected NAME:TYPE"):
        index.add_fields(["size:long"])
    index.upsert(["e"], x[:1], [{"size": "big"}])
    with pytest.raises(IndexError_, match=r"item 'e': size: field 'size' is indexed as int.*nothing was declared"):
        index.add_fields(["size:int"])
    assert index.fields == ["year:int", "cat:keyword"]
    index.add_fields(["size:keyword"])
    assert index.explain(["size == big"])["indexed"] == ["size"]
    index.close()
    reopened = LatentIndex.open(tmp_path / "ix")
    assert reopened.fields == ["year:int", "cat:keyword", "size:keyword"]
    assert [h.key for h in reopened.search(x[:1], 5, {"size": "big"})[0]] == ["e"]
    reopened.close()


def test_the_plan_says_which_fields_are_scanned_and_which_path_runs(tmp_path):
    index = LatentIndex.create(tmp_path / "ix", "m", 1, DIM, "HNSW32", fields=["label:int"])
    x = np.random.default_rng(1).standard_normal((400, DIM)).astype(np.float32)
    index.upsert([f"k{i}" for i in range(400)], x, [{"label": i % 10, "tag": f"t{i % 2}"} for i in range(400)])
    plan = index.explain(["label == 3", "tag == t1"])
    assert plan["indexed"] == ["label"] and plan["scanned"] == ["tag"] and "zspace index field add" in plan["note"]
    assert plan["matches"] == 40 and plan["strategy"] == "exact" and plan["total"] == 400
    index.exact_limit = 10
    plan = index.explain(["label == 3"])
    assert plan["strategy"] == "ann+bitmap" and plan["ef_search"] >= 2 * 10 * 10, "efSearch widens as 1/selectivity"
    assert index.explain(["label == 11"])["strategy"] == "empty" and index.search(x[:1], 5, ["label == 11"]) == [[]]
    index.close()


def test_payload_indexes_survive_kill_9(tmp_path):
    """Items written after the last snapshot, and a field declared after it: a process killed with -9 after
    its writes were acknowledged loses none of them, and their filters answer on the next open."""
    index = LatentIndex.create(tmp_path / "ix", "m", 1, DIM, fields=["label:int"])
    index.close()
    script = f"""
import numpy as np
from zspace.index.latent_index import LatentIndex
ix = LatentIndex.open({str(tmp_path / "ix")!r}, snapshots=False)  # no snapshot: what follows is in the store only
ix.upsert([f"k{{i}}" for i in range(50)], np.ones((50, {DIM}), np.float32), [{{"label": i % 5, "cat": i % 2}} for i in range(50)])
ix.add_fields(["cat:int"])
print("acknowledged", flush=True)
import time; time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "acknowledged"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    reopened = LatentIndex.open(tmp_path / "ix")
    assert reopened.fields == ["label:int", "cat:int"]
    assert len(reopened.search(np.ones((1, DIM), np.float32), 50, ["label == 3", "cat == 1"])[0]) == 5
    assert reopened.explain(["label == 3", "cat == 1"])["indexed"] == ["label", "cat"]
    reopened.close()


def test_filters_over_grpc(vae_bundle, tmp_path):
    """The structured filter, the old single equality beside it, the plan, and errors naming the part."""
    with digits_served(vae_bundle, tmp_path) as s, ZSpaceClient(s.target) as c:
        q = np.zeros((1, 4), np.float32)
        hits, plan = c.search_explained("digits", vectors=q, k=50, where=["label in (3, 4)", "split == test"],
                                        explain=True)
        assert hits[0] and all(h.payload["label"] in ("3", "4") for h in hits[0])
        assert plan["matches"] == sum(1 for _ in open_index(tmp_path / "indexes" / "digits").search(
            q, 10_000, {"label": ["3", "4"]})[0]) and plan["scanned"] == ["label", "split"]
        legacy = pb.SearchRequest(index="digits", vectors=_tensor(q), k=5, filter_field="label",
                                  filter_value_json="3")
        legacy.filter.all.add(field="label", op=pb.Condition.NE, value_json="3")
        stub = c.stub
        assert not stub.Search(legacy, timeout=20).results[0].hits, "both the old equality and the filter hold"
        for condition, message in [
            (pb.Condition(field="label", op=pb.Condition.IN, value_json="3"), "filter.all[0] value: `in` takes"),
            (pb.Condition(field="label", op=77, value_json="3"), "filter.all[0].op: unknown operator 77"),
            (pb.Condition(field="label", op=pb.Condition.LT, value_json="nope"), "filter.all[0].value_json: not valid JSON"),
            (pb.Condition(field="", op=pb.Condition.EQ, value_json="1"), "filter.all[0] field: expected a payload field"),
            (pb.Condition(field="label", op=pb.Condition.EQ, value_json=""), "filter.all[0].value_json: empty"),
        ]:
            request = pb.SearchRequest(index="digits", vectors=_tensor(q), k=5)
            request.filter.all.append(condition)
            with pytest.raises(Exception) as err:
                stub.Search(request, timeout=20)
            assert err.value.code().name == "INVALID_ARGUMENT" and message in err.value.details(), err.value.details()


def _tensor(x):
    from zspace.service.client import to_tensor

    return to_tensor(x)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_exact_scans_of_many_matches_agree_with_brute_force(tmp_path, factory):
    """24,000 matches: the exact path on two threads (index.latent_index.SPLIT_EXACT_AT), merged."""
    rng = np.random.default_rng(3)
    n, dim = 30_000, 8
    x = rng.standard_normal((n, dim)).astype(np.float32)
    index = LatentIndex.create(tmp_path / "ix", "m", 1, dim, factory, fields=["g:int"])
    index.upsert([f"k{i}" for i in range(n)], x, [{"g": int(i % 5 != 0)} for i in range(n)])
    q = rng.standard_normal((3, dim)).astype(np.float32)
    assert index.explain(["g == 1"])["strategy"] == "exact"
    hits = index.search(q, 10, ["g == 1"])
    keep = np.flatnonzero(np.arange(n) % 5 != 0)
    d = ((x[keep][None, :, :] - q[:, None, :]) ** 2).sum(-1)
    for row, drow in zip(hits, d):
        assert [h.key for h in row] == [f"k{keep[j]}" for j in np.argsort(drow)[:10]]
        assert [h.distance for h in row] == pytest.approx(np.sort(drow)[:10], rel=1e-4)
    index.close()


@pytest.mark.parametrize("fields", [(), ("tag:keyword",)])
def test_a_write_is_seen_by_the_next_filtered_search(tmp_path, fields):
    """Filters' matches are cached per state of the index: every write (here and in another process) is a new state."""
    index = LatentIndex.create(tmp_path / "ix", "m", 1, DIM, fields=fields)
    x = np.eye(DIM, dtype=np.float32)
    index.upsert(["a", "b"], x[:2], [{"tag": "red"}, {"tag": "blue"}])
    assert [h.key for h in index.search(x[:1], 5, {"tag": "red"})[0]] == ["a"]
    index.upsert(["c"], x[2:3], [{"tag": "red"}])
    assert {h.key for h in index.search(x[:1], 5, {"tag": "red"})[0]} == {"a", "c"}
    other = LatentIndex.open(tmp_path / "ix", snapshots=False)
    other.delete(["a"])
    other.release()
    follower = LatentIndex.open(tmp_path / "ix", snapshots=False, follow=True)
    assert [h.key for h in follower.search(x[:1], 5, {"tag": "red"})[0]] == ["c"]
    index.upsert(["d"], x[3:4], [{"tag": "red"}])
    assert {h.key for h in follower.search(x[:1], 5, {"tag": "red"})[0]} == {"c", "d"}
    follower.release()
    index.close()
