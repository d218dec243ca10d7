"""The Milvus backend beyond the shared index tests (test_index_service.py runs those on both backends):
filters that cannot inject, the model binding, milvus-lite's one-process rule, and stateless replicas
behind one Milvus server (`milvus-lite server`, the Milvus protocol) balanced by the client."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from testbed.servers import ServerChild, free_port, requests_answered, serve_command, start_milvus_lite
from zspace.errors import UserError
from zspace.index.backends import open_index
from zspace.index.contract import FilterError
from zspace.index.errors import IndexError_
from zspace.index.milvus_index import MilvusIndex, filter_expression
from zspace.service.client import ZSpaceClient, channel_target

TRICKY = ['x" or payload["label"] == "a', 'back\\slash', 'quote"inside', "7", "a == b && 1"]


def test_filter_values_are_literals_never_syntax():
    assert filter_expression(("label", 7)) == '(payload["label"] == 7 or payload["label"] == "7")'
    assert filter_expression(("label", "7")) == '(payload["label"] == "7" or payload["label"] == 7)'
    assert filter_expression(("ok", True)) == 'payload["ok"] == true'
    assert filter_expression(("s", 'a"b')) == 'payload["s"] == "a\\"b"'
    assert filter_expression(["year >= 2000", "cat != a"]) == \
        'payload["year"] >= 2000 and ((exists payload["cat"]) and (payload["cat"] != "a"))'
    with pytest.raises(FilterError, match="quotes"):
        filter_expression(('la"bel', 1))
    with pytest.raises(FilterError, match="null cannot be matched"):
        filter_expression(("label", None))


@pytest.mark.parametrize("where", ["lite", "server"])
def test_a_value_with_quotes_or_operators_matches_itself_only(tmp_path, request, where):
    uri = request.getfixturevalue("milvus_server").uri if where == "server" else str(tmp_path / "ix" / "milvus.db")
    index = MilvusIndex.create(tmp_path / "ix", "m", 1, 4, uri, collection=f"quotes_{tmp_path.name[-10:]}"
                               .replace("-", "_"), factory="Flat")
    values = ["a", *TRICKY]
    x = np.eye(4, dtype=np.float32)[np.arange(len(values)) % 4] + np.arange(len(values))[:, None]
    index.upsert([f"k{i}" for i in range(len(values))], x, [{"label": v} for v in values])
    for value in values:
        hits = index.search(x[:1], 10, where=("label", value))[0]
        want = {f"k{j}" for j, v in enumerate(values) if v == value}
        assert {h.key for h in hits} == want, (value, hits)
    assert {h.key for h in index.search(x[:1], 10, where=("label", 7))[0]} == {"k4"}, "7 matches the string 7"
    index.close()


def test_the_model_binding_lives_with_the_collection(tmp_path):
    MilvusIndex.create(tmp_path / "ix", "m", 1, 4, str(tmp_path / "shared.db"), collection="c").close()
    (tmp_path / "other").mkdir()
    manifest = (tmp_path / "ix" / "index.json").read_text().replace('"version": 1', '"version": 2')
    (tmp_path / "other" / "index.json").write_text(manifest)  # a second folder claiming another model version
    with pytest.raises(IndexError_, match="holds codes of m/1, index.json says m/2"):
        open_index(tmp_path / "other")
    with pytest.raises(IndexError_, match="already exists"):
        MilvusIndex.create(tmp_path / "again", "m", 1, 4, str(tmp_path / "shared.db"), collection="c")
    assert open_index(tmp_path / "ix").stats()["count"] == 0


OPEN = """
import sys
from zspace.index.backends import open_index
open_index(sys.argv[1]).close()
print("opened")
"""


def test_a_milvus_lite_file_serves_one_process_and_the_second_is_told_why(tmp_path):
    index = MilvusIndex.create(tmp_path / "ix", "m", 1, 4, str(tmp_path / "ix" / "milvus.db"))  # this process holds it
    assert '"uri": "milvus.db"' in (tmp_path / "ix" / "index.json").read_text(), "recorded relative to the folder"
    second = subprocess.run([sys.executable, "-c", OPEN, str(tmp_path / "ix")], capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert "milvus: cannot open milvus.db" in second.stderr and "milvus-lite server" in second.stderr
    index.close()  # the last user in this process: the file is free again
    again = subprocess.run([sys.executable, "-c", OPEN, str(tmp_path / "ix")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "opened" in again.stdout, again.stderr[-2000:]


def test_target_lists_are_balanced_and_checked():
    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target("localhost:7,127.0.0.1:8")[1] is True
    assert channel_target("dns:///zspace:50051") == ("dns:///zspace:50051", True)
    with pytest.raises(UserError, match="is not HOST:PORT"):
        channel_target("127.0.0.1:1,nowhere")


@pytest.mark.parametrize("kind", ["milvus-lite server", "milvus standalone"])
def test_two_replicas_behind_one_milvus_server_both_answer_and_agree(vae_bundle, tmp_path, cli, request, kind):
    if kind == "milvus standalone":
        milvus, uri = None, request.getfixturevalue("milvus_server").uri
    else:
        milvus, uri = start_milvus_lite(tmp_path / "milvus-data")
    replicas = []
    try:
        models = tmp_path / "models"
        shutil.copytree(vae_bundle, models / "digits" / "1")
        code, out = cli("index", "build", "--model", models / "digits", "--data", "digits", "--split", "test",
                        "--out", tmp_path / "indexes" / "shared", "--backend", "milvus", "--uri", uri,
                        "--collection", f"shared_{tmp_path.name[-10:]}".replace("-", "_"))
        assert code == 0, out
        for _ in range(2):  # two stateless replicas: the same folders, the same Milvus
            p, m = free_port(), free_port()
            replicas.append((ServerChild(serve_command(models, p, "--indexes", str(tmp_path / "indexes"),
                                                       "--metrics-port", str(m), "--poll-s", "0"), p), m))
        for child, _ in replicas:
            child.wait_serving(120)
        target = ",".join(child.target for child, _ in replicas)
        with ZSpaceClient(target, timeout=20, retries=1) as c:
            for i in range(20):
                hits = c.search("shared", key=f"digits/test/{i}", k=1)
                assert hits[0][0].key == f"digits/test/{i}"
            # A write through the balanced channel is seen by the next read, whichever replica answers it.
            for i in range(6):
                vector = np.full((1, 4), 100.0 + i, np.float32)
                c.upsert("shared", [f"new/{i}"], vectors=vector, payloads=[{"i": i}])
                assert c.search("shared", vectors=vector, k=1)[0][0].key == f"new/{i}"
                assert c.search("shared", vectors=vector, k=1)[0][0].key == f"new/{i}"
        answered = [requests_answered(m, "Search").get("OK", 0) for _, m in replicas]
        assert all(n > 0 for n in answered) and sum(answered) == 32, answered
    finally:
        for child, _ in replicas:
            child.stop()
        if milvus is not None:
            milvus.terminate()
            milvus.wait(30)
