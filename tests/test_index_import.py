"""`zspace index import`, `zspace index field add` and `zspace index search --where ... --explain`, as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zspace.bundle import load_bundle
from zspace.index.backends import open_index


@pytest.fixture
def inputs(vae_bundle, tmp_path):
    """codes.npy, keys.txt and payloads.jsonl for 500 items of the digits model's width."""
    dim = load_bundle(vae_bundle).latent_dim
    n = 500
    np.save(tmp_path / "codes.npy", np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
    (tmp_path / "keys.txt").write_text("".join(f"doc/{i}\n" for i in range(n)))
    (tmp_path / "payloads.jsonl").write_text("".join(json.dumps({"year": 1990 + i % 30, "tag": f"t{i % 4}"}) + "\n"
                                                     for i in range(n)))
    return tmp_path, n, dim


def run_import(cli, bundle, folder, *extra, codes="codes.npy", keys="keys.txt", payloads="payloads.jsonl"):
    args = ["index", "import", "--model", bundle, "--codes", folder / codes, "--keys", folder / keys,
            "--out", folder / "ix", *extra]
    if payloads:
        args += ["--payloads", folder / payloads]
    return cli(*args)


def test_import_filter_explain_and_declare_later(cli, vae_bundle, inputs):
    folder, n, _ = inputs
    code, out = run_import(cli, vae_bundle, folder, "--factory", "HNSW32", "--field", "year:int")
    assert code == 0, out
    stats = json.loads(out[out.index("{"):])
    assert stats["count"] == n and stats["fields"] == ["year:int"] and stats["factory"] == "HNSW32"
    assert "import" in out and f"{n:,} items" in out, "a progress line"
    code, out = cli("index", "search", folder / "ix", "--key", "doc/3", "-k", "50", "--where", "year >= 2015",
                    "--where", "tag in (t1, t2)", "--explain")
    assert code == 0, out
    answer = json.loads(out)
    plan, hits = answer["plan"], answer["hits"][0]
    want = sum(1 for i in range(n) if 1990 + i % 30 >= 2015 and i % 4 in (1, 2))
    assert plan["matches"] == want == len(hits) and plan["indexed"] == ["year"] and plan["scanned"] == ["tag"]
    assert all(h["payload"]["year"] >= 2015 and h["payload"]["tag"] in ("t1", "t2") for h in hits)
    code, out = cli("index", "field", "add", folder / "ix", "tag:keyword")
    assert code == 0 and json.loads(out)["fields"] == ["year:int", "tag:keyword"], out
    code, out = cli("index", "search", folder / "ix", "--where", "tag != t0", "--explain")
    plan = json.loads(out)["plan"]
    assert code == 0 and plan["indexed"] == ["tag"] and plan["scanned"] == [] and plan["matches"] == 375
    code, out = cli("index", "field", "add", folder / "ix", "tag:int")
    assert code == 2 and "already indexed" in out and out.count("\n") <= 2, out


@pytest.mark.parametrize("mutate, says", [
    (lambda f, n, d: np.save(f / "codes.npy", np.zeros((n, d + 1), np.float32)), "but the model's codes are [n, "),
    (lambda f, n, d: (f / "keys.txt").write_text("".join(f"k{i}\n" for i in range(n - 1))), "--keys: 499 lines"),
    (lambda f, n, d: (f / "keys.txt").write_text("".join(f"k{i % 300}\n" for i in range(n))),
     "--keys line 301: 'k0' appears earlier"),
    (lambda f, n, d: (f / "payloads.jsonl").write_text("[1]\n" * n), "--payloads line 1: expected a JSON object"),
    (lambda f, n, d: (f / "payloads.jsonl").write_text('{"year": 1}\n' * 20 + '{"year": "soon"}\n' + '{}\n' * (n - 21)),
     "--payloads line 21, year: field 'year' is indexed as int"),
    (lambda f, n, d: (f / "keys.txt").write_text("a\n\nb\n" + "".join(f"k{i}\n" for i in range(n - 3))),
     "--keys line 2: empty"),
    (lambda f, n, d: np.save(f / "codes.npy", np.where(np.arange(n)[:, None] == 77, np.nan, np.zeros((n, d), np.float32))),
     "--codes row 77: NaN or infinity"),
])
def test_a_failed_import_says_which_line_and_leaves_nothing(cli, vae_bundle, inputs, mutate, says):
    folder, n, dim = inputs
    mutate(folder, n, dim)
    code, out = run_import(cli, vae_bundle, folder, "--field", "year:int")
    assert code == 2 and says in out, out
    assert not (folder / "ix").exists() and not [p for p in folder.iterdir() if p.name.startswith(".ix")]


def test_import_into_milvus(cli, vae_bundle, inputs):
    folder, n, _ = inputs
    code, out = run_import(cli, vae_bundle, folder, "--backend", "milvus", "--uri", folder / "ix" / "milvus.db",
                           "--field", "year:int")
    assert code == 0, out
    index = open_index(folder / "ix")
    try:
        assert index.stats()["count"] == n and index.fields == ["year:int"]
        plan = index.explain(["year < 1995"])
        assert plan["matches"] == sum(1 for i in range(n) if 1990 + i % 30 < 1995) and "exists" not in plan["expression"]
    finally:
        index.close()


def test_served_index_reports_its_fields_and_memory(vae_bundle, tmp_path):
    import urllib.request

    from serving import digits_served

    from zspace.service.client import ZSpaceClient

    with digits_served(vae_bundle, tmp_path) as s, ZSpaceClient(s.target) as c:
        info = c.index_stats("digits")
        assert info.memory_bytes > 0 and list(info.fields) == []
        with urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert f'zspace_index_bytes{{index="digits"}} {float(info.memory_bytes)}' in text, \
            [line for line in text.splitlines() if "index_bytes" in line]


def test_payloads_parsed_in_a_second_process_give_the_same_index(cli, vae_bundle, inputs, monkeypatch):
    """Big imports parse payloads in a spawned process (index.importing.PARSE_ELSEWHERE_FROM): same items, same
    payload indexes, and an error there still names its line and leaves nothing."""
    from zspace.index import importing
    from zspace.index.contract import IndexSpec

    folder, n, _ = inputs
    monkeypatch.setattr(importing, "PARSE_ELSEWHERE_FROM", 100)
    monkeypatch.setattr(importing, "BATCH", 128)  # several batches in flight
    index = importing.import_codes(vae_bundle, folder / "codes.npy", folder / "keys.txt", folder / "payloads.jsonl",
                                   folder / "ix", IndexSpec(fields=("year:int",)), quiet=True)
    try:
        assert index.stats()["count"] == n
        assert index.get("doc/7").payload == {"year": 1997, "tag": "t3"}
        assert index.explain(["year == 1997"])["matches"] == sum(1 for i in range(n) if i % 30 == 7)
    finally:
        index.close()
    lines = (folder / "payloads.jsonl").read_text().splitlines()
    lines[300] = '{"year": "later"}'
    (folder / "payloads.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(importing.IndexError_, match="--payloads line 301, year: field 'year' is indexed as int"):
        importing.import_codes(vae_bundle, folder / "codes.npy", folder / "keys.txt", folder / "payloads.jsonl",
                               folder / "ix2", IndexSpec(fields=("year:int",)), quiet=True)
    assert not (folder / "ix2").exists()
