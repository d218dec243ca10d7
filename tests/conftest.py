"""Shared fixtures: tiny real files on disk (IDX, images, texts) and small trained runs; helpers.py has the plain functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_docs, train_run, write_idx


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A 10x10 IDX data set with 60 train and 20 test images, gzip like MNIST."""
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for prefix, n in (("train", 60), ("t10k", 20)):
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = (rng.random((n, 10, 10)) * 80).astype(np.uint8)
        images[:, labels.astype(int) * 3, :] = 250  # a class-dependent bright row
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """PNG and JPEG files of two sizes in two class subfolders."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            size = (12, 12) if i % 2 else (20, 16)
            arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
            ext = "png" if i % 3 else "jpg"
            Image.fromarray(arr).save(root / cls / f"{i}.{ext}")
    return root


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in make_docs()) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    for d in make_docs(6):
        folder = root / d["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{d['id']}.txt").write_text(d["text"], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("runs") / "vae", model="vae", epochs=3)


@pytest.fixture(scope="session")
def vae_bundle(vae_run, tmp_path_factory) -> Path:
    from zspace.training.export import export_run

    return export_run(vae_run, tmp_path_factory.mktemp("repo"), "digits")


@pytest.fixture(scope="module")
def client(server):
    """A client of the module's own `server` fixture (a real server on a loopback port)."""
    from zspace.service.client import ZSpaceClient

    with ZSpaceClient(server.target, timeout=20) as c:
        yield c


@pytest.fixture(scope="session")
def cli():
    """The `zspace` command line in-process: cli("index", "build", ...) -> (exit code, output)."""
    from click.testing import CliRunner

    from zspace.app.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.output

    return run


@pytest.fixture(scope="module")
def deployment(vae_bundle, tmp_path_factory) -> Path:
    """models/digits/1 and its index of the 1,438 training digits (labels stored as the strings "0".."9"),
    as a user has them after the README's first steps."""
    import shutil

    from zspace.index.build import build_index

    root = tmp_path_factory.mktemp("deployment")
    shutil.copytree(vae_bundle, root / "models" / "digits" / "1")
    build_index(root / "models" / "digits", "digits", root / "indexes" / "digits", quiet=True).close()
    return root


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone server (PyPI `milvus`, in the dev extra) for the session, stopped by PID with the
    standalone process it starts; skipped, saying why, where it cannot run (not Linux x86-64, port 9091 busy)."""
    from testbed.servers import MilvusServer

    try:
        server = MilvusServer(tmp_path_factory.mktemp("milvus-server") / "data")
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"no Milvus standalone server here: {exc}")
    yield server
    server.stop()
