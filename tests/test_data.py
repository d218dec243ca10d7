"""Loaders on real files: every format, and a clear error for every bad one."""

import gzip
import io
import tarfile

import numpy as np
import pytest

from zspace.data import load_dataset, read_idx, validation_split
from zspace.errors import UserError


def test_digits_is_the_embedded_default():
    ds = load_dataset("digits")
    assert ds.x_train.shape[1] == 64 and ds.transform.shape == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    again = load_dataset("digits")
    assert np.array_equal(ds.x_test, again.x_test), "the test split must be fixed"


def test_idx_gzip_and_raw(idx_dir, tmp_path):
    ds = load_dataset(f"idx:{idx_dir}")
    assert ds.x_train.shape == (60, 100) and ds.x_test.shape == (20, 100)
    assert ds.y_train.dtype == np.int64 and set(ds.y_train) <= {0, 1, 2}
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in idx_dir.iterdir():
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    assert np.array_equal(load_dataset(f"mnist:{raw}").x_train, ds.x_train)


def test_idx_truncated_and_wrong_magic(idx_dir):
    f = idx_dir / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(data[:-7]))
    with pytest.raises(UserError, match="truncated"):
        load_dataset(f"mnist:{idx_dir}")
    f.write_bytes(gzip.compress(b"\x08\x03" + data[2:]))
    with pytest.raises(UserError, match="bad magic"):
        read_idx(f)


def test_idx_missing_file_and_path(idx_dir, tmp_path):
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing IDX file t10k-labels"):
        load_dataset(f"mnist:{idx_dir}")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def test_image_folder_with_classes(image_dir):
    ds = load_dataset(f"images:{image_dir}")
    c, h, w = ds.transform.shape
    assert c == 3 and ds.dim == c * h * w
    assert ds.classes == ["cats", "dogs"] and len(ds.x_train) + len(ds.x_test) == 12
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_image_folder_errors(image_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no PNG or JPEG"):
        load_dataset(f"images:{empty}")
    (image_dir / "cats" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match=r"3\.png: cannot decode image"):
        load_dataset(f"images:{image_dir}")


def test_texts_folder_and_jsonl(text_dir, jsonl_file):
    folder = load_dataset(f"texts:{text_dir}", vocab_size=50)
    assert folder.modality == "text" and folder.classes == ["cars", "food", "space"]
    lines = load_dataset(f"texts:{jsonl_file}", vocab_size=50)
    assert lines.dim == 30  # ten topic words each; "and the of it" are stop words
    assert lines.x_train.shape[0] + lines.x_test.shape[0] == 36


def test_texts_errors(text_dir, tmp_path):
    (text_dir / "cars" / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UserError, match=r"bad\.txt: not valid UTF-8"):
        load_dataset(f"texts:{text_dir}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        load_dataset(f"texts:{bad}")


def test_newsgroups_archive(tmp_path):
    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for group, words in (("sci.space", "orbit rocket moon"), ("rec.autos", "engine brake tire")):
                for i in range(3):
                    body = f"From: a@b\nSubject: {words.split()[0]}\n\n{words} caf\xe9 {i}".encode("latin-1")
                    info = tarfile.TarInfo(f"20news-bydate-{split}/{group}/{i}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    ds = load_dataset(f"20newsgroups:{archive}", vocab_size=20)
    assert ds.classes == ["rec.autos", "sci.space"] and len(ds.x_train) == 6 and len(ds.x_test) == 6
    assert "from" not in ds.transform.vocab, "headers other than Subject are stripped"


def test_unknown_spec_and_validation_split():
    with pytest.raises(UserError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    tr, val = validation_split(100, 0.1)
    assert len(val) == 10 and not set(tr) & set(val)
    assert np.array_equal(val, validation_split(100, 0.1)[1])
