"""Indexes end to end: built by the CLI from an exported encoder, served over gRPC on loopback.

Every test runs on both backends with the same body: FAISS + SQLite in the folder, and
Milvus through the real pymilvus client, twice: a milvus-lite file in the folder, and a real
Milvus 2.3.5 standalone server (the PyPI `milvus` package; conftest's `milvus_server`)."""

from __future__ import annotations

import json
import re
import shutil

import grpc
import numpy as np
import pytest
from serving import start_thread

from zspace.data import load_dataset
from zspace.index.backends import open_index
from zspace.index.latent_index import LatentIndex
from zspace.service.client import ZSpaceClient, to_tensor
from zspace.training.export import export_run
from zspace.v1 import zspace_pb2 as pb


def backend_options(backend: str, out, uri: str | None = None) -> list[str]:
    """`zspace index build` options of a backend: milvus keeps its items in a milvus-lite file in the folder
    (given as the issue's command shape does: `--uri indexes/NAME/milvus.db`); milvus-server in a collection
    of the session's Milvus standalone server, named after the folder and its deployment."""
    if backend == "milvus":
        return ["--backend", "milvus", "--uri", out / "milvus.db"]
    if backend == "milvus-server":
        return ["--backend", "milvus", "--uri", uri, "--collection", collection_of(out)]
    return []


def collection_of(folder) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{folder.parent.parent.name}_{folder.name}")


def create_index(backend: str, folder, model: str, version: int, dim: int, uri: str | None = None) -> None:
    if backend.startswith("milvus"):
        from zspace.index.milvus_index import MilvusIndex

        uri = uri if backend == "milvus-server" else str(folder / "milvus.db")
        MilvusIndex.create(folder, model, version, dim, uri, collection=collection_of(folder), factory="Flat").close()
    else:
        LatentIndex.create(folder, model, version, dim).close()


@pytest.fixture(scope="module", params=["faiss", "milvus", "milvus-server"])
def layout(request, vae_run, tmp_path_factory, cli):
    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    root.joinpath("backend").write_text(request.param)
    uri = request.getfixturevalue("milvus_server").uri if request.param == "milvus-server" else None
    root.joinpath("uri").write_text(uri or "")
    export_run(vae_run, root / "models", "digits")
    code, out = cli("index", "build", "--model", root / "models" / "digits", "--data", "digits",
                    "--out", root / "indexes" / "digits", "--factory", "Flat",
                    *backend_options(request.param, root / "indexes" / "digits", uri))
    assert code == 0, out
    code, out = cli("index", "build", "--model", root / "models" / "digits" / "1", "--data", "digits",
                    "--out", root / "indexes" / "digits-hnsw", "--factory", "HNSW32", "--split", "test",
                    *backend_options(request.param, root / "indexes" / "digits-hnsw", uri))
    assert code == 0, out
    return root


@pytest.fixture(scope="module")
def server(layout):
    with start_thread(layout / "models", indexes=layout / "indexes") as s:
        yield s


def test_build_and_local_queries(layout, cli):
    code, out = cli("index", "stats", layout / "indexes" / "digits")
    st = json.loads(out)
    assert code == 0 and st["count"] == 1438 and st["model"] == {"name": "digits", "version": 1} and st["metric"] == "l2"
    code, out = cli("index", "search", layout / "indexes" / "digits", "--key", "digits/train/5", "-k", "3")
    hits = json.loads(out)[0]
    assert code == 0 and hits[0]["key"] == "digits/train/5" and hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert {"label", "split", "source"} <= hits[0]["payload"].keys()
    code, out = cli("index", "search", layout / "indexes" / "digits", "--key", "nope")
    assert code == 2 and "'nope' is not in the index" in out
    code, out = cli("index", "build", "--model", layout / "models" / "digits", "--data", "digits",
                    "--out", layout / "indexes" / "digits")
    assert code == 2 and "already exists" in out


def test_list_and_stats(client):
    names = {i.name: i for i in client.list_indexes().indexes}
    assert set(names) == {"digits", "digits-hnsw"}
    assert names["digits"].count == 1438 and names["digits-hnsw"].count == 359 and names["digits-hnsw"].factory == "HNSW32"
    assert client.index_stats("digits").model == "digits"


def test_search_by_tensor_image_and_key_equals_local(client, layout):
    x = load_dataset("digits").x_train[:4]
    by_input = client.search("digits", x, k=5)
    codes = client.encode("digits", x)[0]
    by_vector = client.search("digits", vectors=codes, k=5)
    assert by_input == by_vector
    assert [row[0][0] for row in by_input] == [f"digits/train/{i}" for i in range(4)], "each item finds itself"
    local = open_index(layout / "indexes" / "digits").search(codes, 5)
    assert [[h[0] for h in r] for r in local] == [[h[0] for h in r] for r in by_input]
    by_key = client.search("digits", key="digits/train/2", k=5)
    assert [h[0] for h in by_key[0]] == [h[0] for h in by_input[2]]
    sevens = client.search("digits", x, k=5, where=("label", "7"))
    assert all(h[2]["label"] == "7" for row in sevens for h in row), sevens


def test_upsert_get_delete(client):
    x = load_dataset("digits").x_test[:2]
    count = client.upsert("digits-hnsw", ["mine/a", "mine/b"], x, payloads=[{"label": "a"}, {"label": "b"}])
    assert count == 361
    vec, payload = client.get_item("digits-hnsw", "mine/a")
    # atol: the bundle's parity bound; on a GPU the code of a 2-row batch and of a 1-row one differ slightly
    assert payload == {"label": "a"} and np.allclose(vec, client.encode("digits", x[:1])[0][0], atol=1e-4)
    assert client.search("digits-hnsw", x[:1], k=1)[0][0][0] in ("mine/a", "digits/test/0")
    assert client.delete("digits-hnsw", ["mine/a", "mine/b"]) == 359
    assert all(h[0] not in ("mine/a", "mine/b") for h in client.search("digits-hnsw", x, k=10)[0])


def test_index_bad_input(client):
    v = to_tensor(np.zeros((1, 4), np.float32))
    cases = [
        ("Search", pb.SearchRequest(index="nope", vectors=v, k=3), "NOT_FOUND", "index 'nope' is not served"),
        ("Search", pb.SearchRequest(index="digits", key="no/such/key", k=3), "NOT_FOUND", "'no/such/key' is not in the index"),
        ("Search", pb.SearchRequest(index="digits", vectors=to_tensor(np.zeros((1, 5), np.float32)), k=3), "INVALID_ARGUMENT", "vectors.shape: expected [batch, 4]"),
        ("Search", pb.SearchRequest(index="digits", vectors=v, k=0), "INVALID_ARGUMENT", "k: expected 1 to 1000, got 0"),
        ("Search", pb.SearchRequest(index="digits", vectors=v, k=5000), "INVALID_ARGUMENT", "k: expected 1 to 1000"),
        ("Search", pb.SearchRequest(index="digits", k=3), "INVALID_ARGUMENT", "query: set one of"),
        ("Search", pb.SearchRequest(index="digits", vectors=v, k=3, filter_field="label", filter_value_json="{bad"), "INVALID_ARGUMENT", "filter_value_json"),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=[""]), "INVALID_ARGUMENT", "keys[0]: must be a non-empty string"),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=["a"], payloads_json=["[1, 2]"]), "INVALID_ARGUMENT", "payloads_json[0]: must be a JSON object"),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=["a"], payloads_json=["nope"]), "INVALID_ARGUMENT", "payloads_json[0]: not valid JSON"),
        ("Upsert", pb.UpsertRequest(index="digits", vectors=v, keys=["a", "b"]), "INVALID_ARGUMENT", "2 keys for 1 items"),
        ("Delete", pb.DeleteRequest(index="digits", keys=["never/stored"]), "NOT_FOUND", "'never/stored' is not in the index"),
        ("Delete", pb.DeleteRequest(index="digits", keys=[""]), "INVALID_ARGUMENT", "keys[0]: must be a non-empty string"),
        ("GetItem", pb.GetItemRequest(index="digits", key="nope"), "NOT_FOUND", "'nope' is not in the index"),
        ("IndexStats", pb.IndexStatsRequest(index=""), "INVALID_ARGUMENT", "index: required"),
    ]
    for method, request, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            getattr(client.stub, method)(request, timeout=20)
        assert err.value.code().name == code, (method, err.value.details())
        assert message in err.value.details(), (method, err.value.details())
    assert client.index_stats("digits").count == 1438, "nothing was written by the refused requests"


def test_empty_index_and_model_pairing(layout, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(layout / "models" / "digits", models / "digits")
    backend, uri = (layout / "backend").read_text(), (layout / "uri").read_text()
    create_index(backend, tmp_path / "indexes" / "empty", "digits", 1, 4, uri)
    create_index(backend, tmp_path / "indexes" / "orphan", "digits", 7, 4, uri)
    s = start_thread(models, indexes=tmp_path / "indexes")
    try:
        with ZSpaceClient(s.target) as c:
            assert c.search("empty", vectors=np.zeros((2, 4), np.float32), k=3) == [[], []]
            resp = c.list_indexes()
            assert [i.name for i in resp.indexes] == ["empty"]
            assert "no version 7" in resp.broken[0].error
    finally:
        s.stop()


def test_client_cli_search_upsert_delete(server, tmp_path, cli):
    from PIL import Image

    x = load_dataset("digits").x_test[0]
    png = tmp_path / "q.png"
    Image.fromarray((x.reshape(8, 8) * 255).astype(np.uint8)).save(png)
    code, out = cli("client", "--target", server.target, "search", "--index", "digits", "--png", png, "-k", "3")
    assert code == 0 and len(json.loads(out)[0]) == 3
    code, out = cli("client", "--target", server.target, "upsert", "--index", "digits", "--key", "cli/q",
                    "--payload", '{"label": "q"}', "--png", png)
    assert code == 0 and json.loads(out)["count"] == 1439
    code, out = cli("client", "--target", server.target, "search", "--index", "digits", "--key", "cli/q", "-k", "1")
    assert json.loads(out)[0][0]["key"] == "cli/q"
    code, out = cli("client", "--target", server.target, "search", "--index", "digits", "--key", "cli/q", "-k", "5",
                    "--where", "label in (3, q)", "--where", "label != 5", "--explain")
    answer = json.loads(out)
    assert code == 0 and answer["hits"][0][0]["key"] == "cli/q", out
    assert answer["plan"]["matches"] == 1 + sum(1 for y in load_dataset("digits").y_train if int(y) == 3), answer["plan"]
    code, out = cli("client", "--target", server.target, "search", "--index", "digits", "--key", "cli/q",
                    "--where", "label ~ 3")
    assert code == 2 and "--where" in out and "expected FIELD OP VALUE" in out and out.count("\n") <= 2, out
    code, out = cli("client", "--target", server.target, "delete", "--index", "digits", "--key", "cli/q")
    assert code == 0 and json.loads(out)["count"] == 1438
    code, out = cli("client", "--target", server.target, "delete", "--index", "digits", "--key", "cli/q")
    assert code == 1 and out.startswith("NOT_FOUND")


def test_indexes_are_picked_up_by_a_rescan_once_their_model_is_there(layout, tmp_path):
    models, indexes = tmp_path / "models", tmp_path / "indexes"
    models.mkdir()
    indexes.mkdir()
    with start_thread(models, indexes=indexes) as s, ZSpaceClient(s.target) as c:
        assert not c.list_indexes().indexes
        shutil.copytree(layout / "indexes" / "digits-hnsw", indexes / "late")
        s.rescan()
        listing = c.list_indexes()
        assert not listing.indexes
        assert [b.path for b in listing.broken] == [str(indexes / "late")]
        assert "digits" in listing.broken[0].error and "not served" in listing.broken[0].error
        shutil.copytree(layout / "models" / "digits", models / "digits")
        s.rescan()  # the model arrives: the index is tried again and served
        listing = c.list_indexes()
        assert [i.name for i in listing.indexes] == ["late"] and not listing.broken
        hits = c.search("late", key="digits/test/3", k=3)
        assert hits[0][0][0] == "digits/test/3"


def test_an_index_whose_folder_is_deleted_stops_being_served(layout, tmp_path):
    models, indexes = tmp_path / "models", tmp_path / "indexes"
    shutil.copytree(layout / "models", models)
    shutil.copytree(layout / "indexes" / "digits-hnsw", indexes / "gone")
    with start_thread(models, indexes=indexes) as s, ZSpaceClient(s.target) as c:
        assert c.search("gone", key="digits/test/3", k=1)[0][0][0] == "digits/test/3"
        shutil.rmtree(indexes / "gone")
        s.rescan()
        assert not c.list_indexes().indexes
        with pytest.raises(grpc.RpcError) as err:
            c.search("gone", key="digits/test/3", k=1)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "gone" in err.value.details()
        shutil.copytree(layout / "indexes" / "digits-hnsw", indexes / "gone")
        s.rescan()  # and comes back when the folder does
        assert [i.name for i in c.list_indexes().indexes] == ["gone"]
