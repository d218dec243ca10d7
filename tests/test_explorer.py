"""The explorer's server side: `zspace index map`, the map kept current as items are written, colours, filter
masks, item views (stored images under --media-root only, decoded codes, a document's words)."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from helpers import http_call, make_docs, train_run
from PIL import Image
from serving import start_thread

from zspace.index.latent_index import LatentIndex
from zspace.index.maps import fit_map, load_map


def call(base: str, path: str, method: str = "GET", body=None):
    status, headers, data = http_call(base + path, method, json_body=body)
    return status, (json.loads(data) if headers.get("Content-Type", "").startswith("application/json") else (headers, data))


@pytest.fixture(scope="module")
def mapped(vae_bundle, tmp_path_factory, cli):
    """models/digits/1, its index of the training digits with a PCA map, and a media folder."""
    from zspace.index.build import build_index

    root = tmp_path_factory.mktemp("explorer")
    shutil.copytree(vae_bundle, root / "models" / "digits" / "1")
    build_index(root / "models" / "digits", "digits", root / "indexes" / "digits", quiet=True).close()
    code, out = cli("index", "map", root / "indexes" / "digits")
    assert code == 0, out
    (root / "media").mkdir()
    return root


def test_index_map_command(mapped, cli, tmp_path):
    assert (mapped / "indexes" / "digits" / "map.npz").is_file()
    m = load_map(mapped / "indexes" / "digits")
    assert m.method == "pca" and m.count == 1438 and m.fitted == 1438 and np.isfinite(m.xy).all()
    shutil.copytree(mapped / "indexes" / "digits", tmp_path / "ix")
    code, out = cli("index", "map", tmp_path / "ix", "--method", "tsne", "--sample", "300")
    assert code == 0, out
    m = load_map(tmp_path / "ix")
    assert m.method == "tsne" and m.fitted == 300 and m.count == 1438 and len(m.anchors) == 300
    assert np.isfinite(m.xy).all()
    code, out = cli("index", "map", tmp_path / "ix", "--method", "nope")
    assert code == 2 and "--method" in out
    code, out = cli("index", "map", tmp_path / "ix", "--sample", "2")
    assert code == 2 and "--sample" in out
    LatentIndex.create(tmp_path / "empty", "digits", 1, 4).close()
    code, out = cli("index", "map", tmp_path / "empty")
    assert code == 2 and "needs at least 3" in out


def test_umap_places_unfitted_codes_near_their_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    codes = np.concatenate([c + rng.normal(size=(200, 8)) for c in centres]).astype(np.float32)
    m = fit_map(np.arange(600), codes, 600, "umap", sample=300, quiet=True)
    assert m.fitted == 300 and np.isfinite(m.xy).all()
    # Each cluster's points, fitted or placed, stay together: the three cluster means are well apart.
    means = np.stack([m.xy[i * 200:(i + 1) * 200].mean(0) for i in range(3)])
    spread = max(m.xy[i * 200:(i + 1) * 200].std(0).max() for i in range(3))
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i)]
    assert min(gaps) > 2 * spread


def test_the_map_follows_writes_and_is_written_back(mapped):
    with start_thread(mapped / "models", indexes=mapped / "indexes", http_port=0) as s:
        base = f"http://127.0.0.1:{s.server.http_port}/v1/indexes/digits"
        status, info = call(base, "/map")
        assert status == 200 and info["count"] == info["rows"] == 1438 and info["method"] == "pca"
        status, (headers, points) = call(base, "/map/points")
        assert int(headers["X-Map-Rows"]) == 1438 and len(points) == 1438 * 8
        status, row = call(base, "/map/rows/7")
        assert status == 200 and row["key"] == "digits/train/7" and row["image_source"] == "decoded"
        assert Image.open(io.BytesIO(base64.b64decode(row["image"]))).size == (8, 8)

        status, _ = call(base, "/items", "POST", {"keys": ["new/1", "new/2", "digits/train/7"],
                                                  "vectors": [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]],
                                                  "payloads": [{"label": "new"}, {"label": "new"}, {"label": "7"}]})
        assert status == 200
        status, _ = call(base, "/delete", "POST", {"keys": ["digits/train/8"]})
        status, info = call(base, "/map")
        assert info["count"] == 1438 + 2 - 1 and info["rows"] == 1438 + 3  # rows 7 and 8 emptied, three appended
        _, (_, points) = call(base, "/map/points")
        xy = np.frombuffer(points, "<f4").reshape(-1, 2)
        assert np.isnan(xy[7]).all() and np.isnan(xy[8]).all() and np.isfinite(xy[1438:]).all()
        status, missing = call(base, "/map/rows/8")
        assert status == 404 and missing["field"] == "row"
        status, found = call(base, "/map/find?key=digits/train/7")
        assert found["row"] >= 1438
        status, row = call(base, f"/map/rows/{found['row']}")
        assert row["key"] == "digits/train/7" and row["payload"] == {"label": "7"}

        status, colours = call(base, "/map/colours?field=label")
        assert status == 200 and colours["kind"] == "category" and "new" in colours["labels"]
        codes = np.frombuffer(base64.b64decode(colours["codes"]), np.uint8)
        assert len(codes) == info["rows"] and codes[7] == 255 and codes[1438] == colours["labels"].index("new")
        status, (headers, mask) = call(base, "/map/mask?where=label%20%3D%3D%20new")
        bits = np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:info["rows"]]
        assert int(headers["X-Matches"]) == 2 and bits[1438] and bits[1439] and bits.sum() == 2
        status, bad = call(base, "/map/mask?where=label%20~%203")
        assert status == 400 and bad["field"] == "where[0]"
        status, bad = call(base, "/map/colours?field=nothing")
        assert status == 400 and "no item on the map has a field 'nothing'" in bad["error"]
    # The serving process wrote the map back: a restart starts from where it was.
    m = load_map(mapped / "indexes" / "digits")
    assert m.count == 1439 and len(m.ids) == 1441
    assert m.seq == LatentIndex.open(mapped / "indexes" / "digits").store.last_seq()


def test_views_read_images_only_under_a_media_root(mapped, tmp_path):
    media = mapped / "media"
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    img.save(media / "a.png")
    img.save(tmp_path / "secret.png")
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    with start_thread(mapped / "models", indexes=mapped / "indexes", http_port=0, media_roots=(media,)) as s:
        base = f"http://127.0.0.1:{s.server.http_port}/v1/indexes/digits"
        payloads = [{"image": "a.png"}, {"image": "../../" + str(tmp_path / "secret.png")}, {"path": str(tmp_path / "secret.png")},
                    {"image": "link.png"}, {"source": "missing.png"}]
        keys = [f"media/{i}" for i in range(len(payloads))]
        status, _ = call(base, "/items", "POST", {"keys": keys, "vectors": [[0.1, 0, 0, 0]] * len(keys), "payloads": payloads})
        assert status == 200
        status, views = call(base, "/views", "POST", {"keys": keys})
        sources = [v["image_source"] for v in views["views"]]
        assert sources == ["image", "decoded", "decoded", "decoded", "decoded"]
        assert base64.b64decode(views["views"][0]["image"]) == (media / "a.png").read_bytes()
        status, bad = call(base, "/views", "POST", {"keys": []})
        assert status == 400 and bad["field"] == "keys"
        status, bad = call(base, "/views", "POST", {"keys": ["nope"]})
        assert status == 404


def test_documents_show_their_decoded_words(tmp_path, cli):
    from zspace.index.build import build_index
    from zspace.training.export import export_run

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in make_docs(20)) + "\n")
    run = train_run(tmp_path / "run", data=f"texts:{docs}", model="ae", latent_dim=3, hidden=(32,), epochs=30)
    export_run(run, tmp_path / "models", "news")
    build_index(tmp_path / "models" / "news", f"texts:{docs}", tmp_path / "indexes" / "news", quiet=True).close()
    assert cli("index", "map", tmp_path / "indexes" / "news")[0] == 0
    with start_thread(tmp_path / "models", indexes=tmp_path / "indexes", http_port=0) as s:
        http = f"http://127.0.0.1:{s.server.http_port}"
        status, row = call(http, "/v1/indexes/news/map/rows/0")
        assert status == 200 and "image" not in row and len(row["words"]) == 12
        topic = row["payload"]["label"]
        from helpers import TOPICS

        assert {w for w, _ in row["words"][:5]} & set(TOPICS[topic].split()), row
        status, dec = call(http, "/v1/models/news/reconstruct", "POST",
                           {"inputs": {"texts": ["rocket orbit launch nasa"]}, "top_words": 4, "tensors": False})
        assert status == 200 and len(dec["words"][0]) == 4 and "outputs" not in dec
        status, bad = call(http, "/v1/models/news/generate", "POST", {"count": 1, "return_png": True})
        assert status == 400 and bad["field"] == "return_png"
