"""Build an index from a data set with an exported encoder (ONNX Runtime, no torch).

Keys are the items' own ids where the data set has them (a .jsonl's `id` field),
else `<dataset>/<split>/<row>` (e.g. `mnist/train/123`, see `dataset_key`);
payloads carry the label (class name when known), the split and the item's source.
The index is built in a hidden folder and renamed into place when complete, so a
server watching the indexes folder never serves half of it and a failed build
leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zspace.bundle import load_bundle, resolve_bundle
from zspace.data import load_dataset
from zspace.errors import UserError
from zspace.index import backends
from zspace.index.contract import IndexSpec, LatentCodeIndex
from zspace.index.errors import IndexError_
from zspace.progress import Progress
from zspace.runtime import RuntimeOptions, open_runtime


def dataset_key(dataset: str, split: str, row: int) -> str:
    """The key of a data set's item: `<dataset>/<split>/<row>`."""
    return f"{dataset}/{split}/{row}"


def parse_dataset_key(key: str) -> tuple[str, str, int]:
    """(dataset, split, row) of a key made by `dataset_key`; ValueError for any other key."""
    dataset, split, row = key.rsplit("/", 2)
    return dataset, split, int(row)


def build_index(model_ref: Path, data_spec: str, out: Path, spec: IndexSpec = IndexSpec(), split: str = "train",
                batch_size: int = 1024, device: str = "auto", quiet: bool = False) -> LatentCodeIndex:
    """Encode a data set's split and store the codes in a new index of the backend `spec` names.

    How each backend makes the folder whole or not at all is its own (index/backends.py);
    everything that can be checked is checked before the data set is loaded and encoded."""
    out = Path(out)
    if (out / "index.json").exists():
        raise IndexError_(f"{out}: an index already exists here")
    backends.backend_class(spec.backend).check_spec(spec, out)
    runtime = open_runtime(load_bundle(resolve_bundle(model_ref)), RuntimeOptions(device=device))
    bundle = runtime.bundle
    ds = load_dataset(data_spec, transform=runtime.transform)
    metric = spec.metric or ("hamming" if bundle.is_hash else "cosine" if ds.modality == "text" else "l2")
    if metric == "hamming" and not bundle.is_hash:
        raise IndexError_(f"--metric hamming: {bundle.label} is a {bundle.kind} model with float codes; a hamming "
                          "index holds the bits of a hash model (zspace train --model hash --bits N)")
    code = codes_of if metric != "hamming" else bits_of
    splits = {"train": [("train", ds.x_train, ds.y_train, ds.sources_train)],
              "test": [("test", ds.x_test, ds.y_test, ds.sources_test)]}
    splits["all"] = splits["train"] + splits["test"]

    def fill(index: LatentCodeIndex) -> None:
        for name, x, y, sources in splits[split]:
            bar = None if quiet else Progress(-(-len(x) // batch_size), f"index {name}")
            for start in range(0, len(x), batch_size):
                rows = range(start, min(start + batch_size, len(x)))
                codes = code(runtime, np.ascontiguousarray(x[start : rows.stop]))
                # The user's own ids when the data carries them (a .jsonl's `id`), else <dataset>/<split>/<row>.
                keys = [sources[i] if ds.sources_are_ids else dataset_key(ds.name, name, i) for i in rows]
                payloads = [{"split": name, "source": sources[i] if sources else None,
                             **({"label": ds.classes[int(y[i])] if ds.classes else int(y[i])} if y is not None else {})}
                            for i in rows]
                index.upsert(keys, codes, payloads, maintain=False)
                if bar:
                    bar.update()
            if bar:
                bar.close(f"{index.stats()['count']} items")
        index.finish_build()

    return backends.build(out, spec, (bundle.name, bundle.version), bundle.latent_dim, metric, fill)


def codes_of(runtime, x: np.ndarray) -> np.ndarray:
    """Float codes: the encoder's first output (VAE kinds: the means; hash: the bits' probabilities)."""
    return runtime.encode(x)[0]


def bits_of(runtime, x: np.ndarray) -> np.ndarray:
    """A hash model's bits, packed 8 to a byte (uint8): what a hamming index stores."""
    return runtime.encode(x)[1]


def query_codes(index: LatentCodeIndex, models: Path, pngs: list[str], texts: list[str], device: str = "auto") -> np.ndarray:
    """Codes of image files or documents through the index's own model (its codes mean nothing to another)."""
    name, version = index.model
    runtime = open_runtime(load_bundle(Path(models) / name / str(version)), RuntimeOptions(device=device))
    modality = runtime.bundle.modality
    if pngs and modality != "image" or texts and modality != "text":
        option = "--png" if pngs else "--text"
        fits = {"image": "--png, ", "text": "--text, "}.get(modality, "")
        raise UserError(f"{option}: this index holds codes of {name}/{version}, a model of {modality}s; "
                        f"query it with {fits}--key or --npy")
    if pngs:
        x = np.stack([runtime.transform.from_bytes(Path(p).read_bytes(), p) for p in pngs])
    else:
        x = runtime.transform.apply(list(texts))
    return (bits_of if index.binary else codes_of)(runtime, x)
