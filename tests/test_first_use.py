"""A new user's first hour: the mistakes they make and the messages they get, checked with real files and servers."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from helpers import make_docs, train_run
from serving import start_thread

from testbed.servers import ServerChild, free_port, serve_command
from zspace.data import load_dataset
from zspace.index.build import build_index
from zspace.index.contract import FilterError
from zspace.index.latent_index import LatentIndex
from zspace.training.export import export_run


def test_the_readme_filter_finds_sevens_whether_typed_as_number_or_string(deployment, cli):
    index = deployment / "indexes" / "digits"
    for where in ("label=7", 'label="7"'):
        code, out = cli("index", "search", index, "--key", "digits/train/5", "-k", "5", "--where", where)
        rows = json.loads(out)
        assert code == 0 and len(rows[0]) == 5 and all(h["payload"]["label"] == "7" for h in rows[0]), out
    code, out = cli("index", "search", index, "--key", "digits/train/5", "--where", "lable=7")
    assert code == 2 and "no item has a field 'lable'" in out and "label" in out


def test_filters_match_numbers_and_strings_alike_and_refuse_nonsense(tmp_path):
    idx = LatentIndex.create(tmp_path / "ix", "m", 1, 2)
    idx.upsert(["a", "b", "c"], np.eye(3, 2, dtype=np.float32), [{"label": "7"}, {"label": 7}, {"label": True}])
    q = np.zeros((1, 2), np.float32)
    keys = lambda where: sorted(h.key for h in idx.search(q, 3, where)[0])  # noqa: E731
    assert keys(("label", 7)) == keys(("label", "7")) == ["a", "b"]
    assert keys(("label", True)) == ["c"]
    for where, message in ((('a"b', 1), "quotes"), (("a\x00", 1), "control"), (("label", {"x": 1}), "JSON object"),
                           (("label", 2**64), "64-bit"), (("label", float("nan")), "finite")):
        with pytest.raises(FilterError, match=message):
            idx.search(q, 3, where)
    idx.close()


def test_serve_on_a_busy_port_is_one_line_naming_port_and_option(tmp_path, vae_bundle, cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = cli("serve", "--models", tmp_path, "--port", port, "--metrics-port", "0")
        assert code == 2 and f"--port: cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out
        assert len(out.strip().splitlines()) <= 2, out
        code, out = cli("serve", "--models", tmp_path, "--port", "0", "--metrics-port", port)
        assert code == 2 and f"--metrics-port: cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out


@pytest.mark.parametrize("where, says", [("empty", "no model bundles found"), ("name", "one model's folder of versions"),
                                         ("bundle", "this is a bundle folder itself")])
def test_serve_warns_when_models_holds_no_bundles(vae_bundle, tmp_path, where, says):
    import shutil

    shutil.copytree(vae_bundle, tmp_path / "models" / "digits" / "1")
    folder = {"empty": tmp_path, "name": tmp_path / "models" / "digits", "bundle": tmp_path / "models" / "digits" / "1"}[where]
    port = free_port()
    proc = ServerChild(serve_command(folder, port, "--metrics-port", "0", "--poll-s", "0"), port, capture=True)
    try:
        proc.wait_listening()
        proc.terminate()
        code, out = proc.wait()
    finally:
        proc.kill()
    assert code == 0 and says in out and "expected NAME/VERSION/manifest.json" in out, out
    assert "metrics off" in out and "metrics on off" not in out


def test_index_search_help_has_no_phantom_option(cli):
    code, out = cli("index", "search", "--help")
    assert code == 0 and "--encode" not in out


def test_client_cli_reconstruct_indexes_stats_get(deployment, tmp_path, cli):
    from zspace.transforms import ImageTransform

    x = load_dataset("digits").x_test[:2]
    png = tmp_path / "q.png"
    png.write_bytes(ImageTransform((1, 8, 8)).to_png(x[0]))
    with start_thread(deployment / "models", indexes=deployment / "indexes") as s:
        t = ["client", "--target", s.target]
        code, out = cli(*t, "reconstruct", "--model", "digits", "--png", png, "--out", tmp_path / "rec")
        assert code == 0 and np.load(tmp_path / "rec" / "reconstructed.npy").shape == (1, 64), out
        code, out = cli(*t, "indexes")
        assert code == 0 and json.loads(out)["indexes"][0]["name"] == "digits"
        code, out = cli(*t, "stats", "--index", "digits")
        assert code == 0 and json.loads(out)["count"] == 1438
        code, out = cli(*t, "get", "--index", "digits", "--key", "digits/train/3")
        got = json.loads(out)
        assert code == 0 and got["payload"]["split"] == "train" and len(got["code"]) == 4
        code, out = cli(*t, "get", "--index", "digits", "--key", "nope")
        assert code == 1 and out.startswith("NOT_FOUND")
        # Search and Upsert are counted under the index's model, not under ""
        cli(*t, "search", "--index", "digits", "--key", "digits/train/3", "-k", "2")
        text = s.metrics_text()
        assert 'zspace_requests_total{code="OK",method="Search",model="digits"}' in text, text


def test_a_non_image_is_named_as_such(deployment, tmp_path, cli):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all")
    code, out = cli("client", "--target", "127.0.0.1:1", "encode", "--model", "digits", "--png", notes)
    assert code == 2 and f"{notes} is not a PNG or JPEG image" in out and "BytesIO" not in out
    code, out = cli("index", "search", deployment / "indexes" / "digits", "--png", notes, "--models", deployment / "models")
    assert code == 2 and "not a PNG or JPEG image" in out and "BytesIO" not in out
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "pic.gif")  # Pillow can read GIF; the service promises PNG and JPEG
    from zspace.errors import UserError
    from zspace.transforms import decode_image

    with pytest.raises(UserError, match="not a PNG or JPEG image"):
        decode_image((tmp_path / "pic.gif").read_bytes(), "pic.gif")


def test_a_jsonl_with_ids_keys_the_index_by_them(tmp_path):
    docs = make_docs()
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    run = train_run(tmp_path / "run", data=f"texts:{path}", latent_dim=2, hidden=(16,), epochs=1, vocab_size=30)
    bundle = export_run(run, tmp_path / "models", "docs")
    index = build_index(bundle, f"texts:{path}", tmp_path / "indexes" / "docs", quiet=True)
    train_ids = set(load_dataset(f"texts:{path}").sources_train)
    assert index.get("space-0" if "space-0" in train_ids else sorted(train_ids)[0]).key in train_ids
    index.close()
    path.write_text("\n".join(json.dumps({**d, "id": "same"}) for d in docs[:3]) + "\n")
    from zspace.errors import UserError

    with pytest.raises(UserError, match="id 'same' is used again"):
        load_dataset(f"texts:{path}")


def test_idx_class_names_come_from_classes_txt(idx_dir, tmp_path):
    (idx_dir / "classes.txt").write_text("zero\none\ntwo\n")
    ds = load_dataset(f"idx:{idx_dir}")
    assert ds.classes == ["zero", "one", "two"]
    (idx_dir / "classes.txt").write_text("zero\n")
    from zspace.errors import UserError

    with pytest.raises(UserError, match="classes.txt: 1 class names, but the labels go up to 2"):
        load_dataset(f"idx:{idx_dir}")


def test_export_and_evaluate_show_progress(vae_run, tmp_path, cli):
    code, out = cli("evaluate", vae_run, "--k", "0")
    assert code == 0 and "evaluate: codes and reconstructions" in out and "evaluate: retrieval" in out
    code, out = cli("export", vae_run, "--repo", tmp_path / "m", "--name", "d")
    assert code == 0 and "export: encoder graph" in out and "export: decoder graph" in out
