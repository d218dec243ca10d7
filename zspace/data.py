"""Data sets from a `--data SPEC` string, as float32 feature matrices.

Specs: `digits`, `mnist:DIR`, `idx:DIR`, `images:DIR`, `20newsgroups:PATH`,
`texts:PATH`. Loaders read the standard formats from a path (nothing is ever
downloaded) and need only numpy and Pillow, so the index builder can use them
without torch.

Splits are fixed: the official train/test split where the format has one,
otherwise a seeded 80/20 split with SPLIT_SEED (independent of the training
seed, so every run and every evaluation sees the same test set).
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import UserError
from zspace.transforms import ImageTransform, TextTransform, VectorTransform, decode_image

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPEC_HELP = "digits | mnist:DIR | idx:DIR | images:DIR | 20newsgroups:PATH | texts:PATH"


@dataclass
class Dataset:
    """Train and test features with their labels and where each row came from."""

    name: str
    spec: str
    modality: str  # image | text | vector
    transform: ImageTransform | TextTransform | VectorTransform
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    classes: list[str] | None = None
    sources_train: list[str] | None = None
    sources_test: list[str] | None = None
    sources_are_ids: bool = False  # the sources are the user's own unique item ids: indexes key items by them

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "name": self.name,
            "modality": self.modality,
            "n_train": int(len(self.x_train)),
            "n_test": int(len(self.x_test)),
            "dim": self.dim,
            "classes": self.classes,
            "split_seed": SPLIT_SEED,
        }


@dataclass
class _Raw:
    """Items before featurisation: images/texts and labels per split."""

    train: list
    test: list
    y_train: list | None
    y_test: list | None
    classes: list[str] | None
    src_train: list[str]
    src_test: list[str]
    sources_are_ids: bool = False  # the sources are the user's own item ids (a .jsonl's `id` field)


def load_dataset(
    spec: str,
    *,
    transform=None,
    vocab_size: int = 2000,
    weighting: str = "log1p",
    image_shape: tuple[int, int, int] | None = None,
) -> Dataset:
    """Load a data set from SPEC.

    `transform` (from a run or a bundle) is applied as is; otherwise images take
    `image_shape` or the first image's shape, and texts fit a vocabulary of
    `vocab_size` words with `weighting` on the training split only.
    """
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return _digits(spec)
    if kind in ("mnist", "idx"):
        return _idx(spec, _existing(arg, kind), name=kind)
    if kind == "images":
        raw = _image_folder(_existing(arg, kind))
        return _featurise_images(spec, raw, transform, image_shape)
    if kind == "20newsgroups":
        raw = _newsgroups(_existing(arg, kind))
        return _featurise_texts(spec, "20newsgroups", raw, transform, vocab_size, weighting)
    if kind == "texts":
        path = _existing(arg, kind)
        raw = _jsonl(path) if path.is_file() else _text_folder(path)
        return _featurise_texts(spec, "texts", raw, transform, vocab_size, weighting)
    raise UserError(f"--data: unknown data set {spec!r}; expected {SPEC_HELP}")


def validation_split(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed seeded (train, validation) index arrays over n training rows."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"validation fraction: expected 0 <= f < 1, got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if fraction > 0 and n_val == 0:
        n_val = 1
    if n - n_val < 1:
        raise UserError(f"data: {n} training rows are too few to hold out a validation split")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---------------------------------------------------------------- helpers


def _existing(arg: str, kind: str) -> Path:
    if not arg:
        raise UserError(f"--data: {kind} needs a path, as in {kind}:/path/to/data")
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"--data: {kind} path {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):
        raise UserError(f"--data: {kind} path {str(path)!r} is not readable")
    return path


def _seeded_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise UserError(f"data: found {n} item(s); at least 2 are needed for a train/test split")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _labels_of(raw: _Raw) -> tuple[np.ndarray | None, np.ndarray | None]:
    if raw.y_train is None:
        return None, None
    lookup = {c: i for i, c in enumerate(raw.classes)}
    return (
        np.array([lookup[c] for c in raw.y_train], dtype=np.int64),
        np.array([lookup[c] for c in raw.y_test], dtype=np.int64),
    )


def _split_raw(items: list, labels: list[str] | None, sources: list[str]) -> _Raw:
    """Seeded 80/20 split of unsplit items."""
    tr, te = _seeded_split(len(items))
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
    classes = sorted(set(labels)) if labels else None
    return _Raw(
        train=pick(items, tr), test=pick(items, te),
        y_train=pick(labels, tr) if labels else None, y_test=pick(labels, te) if labels else None,
        classes=classes, src_train=pick(sources, tr), src_test=pick(sources, te),
    )


def _has_splits(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


# ---------------------------------------------------------------- digits


def _digits(spec: str) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("--data digits needs scikit-learn (pip install 'zspace[train]')") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    tr, te = _seeded_split(len(x))
    src = [f"digits/{i}" for i in range(len(x))]
    return Dataset(
        name="digits", spec=spec, modality="image", transform=ImageTransform((1, 8, 8)),
        x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
        classes=[str(c) for c in range(10)],
        sources_train=[src[i] for i in tr], sources_test=[src[i] for i in te],
    )


# ---------------------------------------------------------------- IDX

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw), checking magic, dimensions and length."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise UserError(f"{path}: IDX header is truncated or has no dimensions")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = len(data) - 4 - 4 * ndim
    if body != expected:
        raise UserError(
            f"{path}: IDX file is truncated or padded: header says {dims} "
            f"({expected} bytes of data), file has {body}"
        )
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: missing IDX file {stem}[.gz]")


CLASS_NAMES_FILE = "classes.txt"


def idx_class_names(root: Path, labels: np.ndarray) -> list[str]:
    """Names of an IDX set's classes: `classes.txt` beside the files (line i names label i), else the numbers.

    IDX files carry label numbers only; Fashion-MNIST's 0 is "T-shirt/top". The names
    go into plots, index payloads and reports."""
    top = int(labels.max()) if len(labels) else -1
    path = root / CLASS_NAMES_FILE
    if not path.is_file():
        return [str(c) for c in range(top + 1)]
    names = [line.strip() for line in _decode_utf8(_read_bytes(path), str(path)).splitlines() if line.strip()]
    if len(names) <= top:
        raise UserError(f"{path}: {len(names)} class names, but the labels go up to {top}; give one name per line for 0 to {top}")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: class names must be distinct")
    return names


def _idx(spec: str, root: Path, name: str) -> Dataset:
    if not root.is_dir():
        raise UserError(f"--data: {name} expects a folder of IDX files, got file {str(root)!r}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{root}: {split} images {list(images.shape)} and labels {list(labels.shape)} do not match "
                "(expected [N, H, W] images and [N] labels)"
            )
        scale = 255.0 if images.dtype == np.uint8 else max(float(np.abs(images).max()), 1.0)
        arrays[split] = (images.reshape(len(images), -1).astype(np.float32) / scale, labels.astype(np.int64))
    _, h, w = read_idx(_idx_file(root, "t10k-images-idx3-ubyte")).shape
    labels = np.concatenate([arrays["train"][1], arrays["test"][1]])
    return Dataset(
        name=name, spec=spec, modality="image", transform=ImageTransform((1, h, w)),
        x_train=arrays["train"][0], y_train=arrays["train"][1],
        x_test=arrays["test"][0], y_test=arrays["test"][1], classes=idx_class_names(root, labels),
        sources_train=[f"{name}/train/{i}" for i in range(len(arrays["train"][0]))],
        sources_test=[f"{name}/test/{i}" for i in range(len(arrays["test"][0]))],
    )


# ---------------------------------------------------------------- images


def _image_files(root: Path) -> tuple[list[Path], list[str] | None]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{root}: no PNG or JPEG images found")
    subdirs = any(p.parent != root for p in files)
    labels = [p.relative_to(root).parts[0] for p in files] if subdirs else None
    if labels is not None and any(p.parent == root for p in files):
        raise UserError(f"{root}: images both at the top and in class subfolders; use one layout")
    return files, labels


def _image_folder(root: Path) -> _Raw:
    if not root.is_dir():
        raise UserError(f"--data: images expects a folder, got file {str(root)!r}")
    if _has_splits(root):
        tr, ytr = _image_files(root / "train")
        te, yte = _image_files(root / "test")
        classes = sorted(set(ytr) | set(yte)) if ytr and yte else None
        return _Raw(tr, te, ytr if classes else None, yte if classes else None, classes,
                    source_paths(tr), source_paths(te))
    files, labels = _image_files(root)
    return _split_raw(files, labels, source_paths(files))


def source_paths(files: list[Path]) -> list[str]:
    """Where each item came from, as an absolute path: an index stores it in the item's payload, and a path
    relative to wherever the build ran would mean nothing to a server started elsewhere."""
    return [str(p.resolve()) for p in files]


def _featurise_images(spec: str, raw: _Raw, transform, image_shape) -> Dataset:
    if transform is None:
        if image_shape is None:
            first = decode_image(_read_bytes(raw.train[0]), str(raw.train[0]))
            grey = first.mode in ("1", "L", "LA", "I", "I;16", "F")
            image_shape = (1 if grey else 3, first.size[1], first.size[0])
        transform = ImageTransform(tuple(image_shape))

    def featurise(paths: list[Path]) -> np.ndarray:
        return np.stack([transform.from_bytes(_read_bytes(p), str(p)) for p in paths])

    y_train, y_test = _labels_of(raw)
    return Dataset(
        name="images", spec=spec, modality="image", transform=transform,
        x_train=featurise(raw.train), y_train=y_train, x_test=featurise(raw.test), y_test=y_test,
        classes=raw.classes, sources_train=raw.src_train, sources_test=raw.src_test,
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


# ---------------------------------------------------------------- texts


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from None


def _text_files(root: Path) -> tuple[list[str], list[str] | None, list[str]]:
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"{root}: no .txt files found")
    texts = [_decode_utf8(_read_bytes(p), str(p)) for p in files]
    subdirs = any(p.parent != root for p in files)
    labels = [p.relative_to(root).parts[0] for p in files] if subdirs else None
    return texts, labels, source_paths(files)


def _text_folder(root: Path) -> _Raw:
    if _has_splits(root):
        tr, ytr, str_ = _text_files(root / "train")
        te, yte, ste = _text_files(root / "test")
        classes = sorted(set(ytr) | set(yte)) if ytr and yte else None
        return _Raw(tr, te, ytr if classes else None, yte if classes else None, classes, str_, ste)
    texts, labels, sources = _text_files(root)
    return _split_raw(texts, labels, sources)


def _jsonl(path: Path) -> _Raw:
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"--data: texts expects a folder of .txt files or a .jsonl file, got {str(path)!r}")
    text = _decode_utf8(_read_bytes(path), str(path))
    texts, labels, ids = [], [], []
    seen: dict[str, int] = {}  # id -> line
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{n}: expected an object with a string field 'text'")
        texts.append(row["text"])
        labels.append(None if row.get("label") is None else str(row["label"]))
        if row.get("id") is not None:
            item_id = str(row["id"])
            if item_id in seen:
                raise UserError(f"{path}:{n}: id {item_id!r} is used again (first on line {seen[item_id]}); ids must be unique")
            seen[item_id] = n
        ids.append(str(row["id"]) if row.get("id") is not None else f"{path.name}:{n}")
    if not texts:
        raise UserError(f"{path}: no documents found")
    has_labels = all(v is not None for v in labels)
    raw = _split_raw(texts, labels if has_labels else None, ids)
    raw.sources_are_ids = len(seen) == len(texts)  # every document has its own id
    return raw


def strip_headers(post: str) -> str:
    """A news post without its header block, keeping the Subject line."""
    head, sep, body = post.partition("\n\n")
    if not sep:
        return post
    subject = next((ln[8:] for ln in head.splitlines() if ln.lower().startswith("subject:")), "")
    return subject + "\n" + body


def _newsgroups(path: Path) -> _Raw:
    """The 'bydate' archive (.tar.gz) or its extracted folders; posts decoded as latin-1."""
    posts: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}

    def add(rel: str, data: bytes) -> None:
        parts = rel.strip("./").split("/")
        for split in ("train", "test"):
            top = f"20news-bydate-{split}"
            if top in parts and len(parts) >= parts.index(top) + 3:
                i = parts.index(top)
                posts[split].append((parts[i + 1], "/".join(parts[i:]), strip_headers(data.decode("latin-1"))))

    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile():
                        add(member.name, tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"{path}: cannot read 20 Newsgroups archive ({exc})") from None
    else:
        for p in path.rglob("*"):
            if p.is_file():
                add(p.relative_to(path).as_posix(), _read_bytes(p))
    if not posts["train"] or not posts["test"]:
        raise UserError(f"{path}: expected 20news-bydate-train/ and 20news-bydate-test/ with one post per file")
    for split in posts:
        posts[split].sort(key=lambda t: t[1])
    groups = sorted({g for g, _, _ in posts["train"] + posts["test"]})
    return _Raw(
        train=[t for _, _, t in posts["train"]], test=[t for _, _, t in posts["test"]],
        y_train=[g for g, _, _ in posts["train"]], y_test=[g for g, _, _ in posts["test"]],
        classes=groups, src_train=[s for _, s, _ in posts["train"]], src_test=[s for _, s, _ in posts["test"]],
    )


def _featurise_texts(spec, name, raw: _Raw, transform, vocab_size, weighting) -> Dataset:
    if transform is None:
        transform = TextTransform.fit(raw.train, size=vocab_size, weighting=weighting)
    y_train, y_test = _labels_of(raw)
    return Dataset(
        name=name, spec=spec, modality="text", transform=transform,
        x_train=transform.apply(raw.train), y_train=y_train,
        x_test=transform.apply(raw.test), y_test=y_test, classes=raw.classes,
        sources_train=raw.src_train, sources_test=raw.src_test, sources_are_ids=raw.sources_are_ids,
    )
