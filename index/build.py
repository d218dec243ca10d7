"""Build an index from a data set with an exported encoder (ONNX Runtime, no torch).

Keys are `<dataset>/<split>/<row>` (e.g. `mnist/train/123`); payloads carry the
label (class name when known), the split and the item's source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zspace.index.latent_index import LatentIndex, min_train_points
from zspace.bundle import load_bundle, resolve_bundle
from zspace.data import load_dataset
from zspace.progress import Progress
from zspace.runtime import onnx_session
from zspace.transforms import transform_from_dict


def build_index(model_ref: Path, data_spec: str, out: Path, factory: str = "Flat", metric: str | None = None,
                split: str = "train", batch_size: int = 1024, device: str = "auto", quiet: bool = False) -> LatentIndex:
    bundle = load_bundle(resolve_bundle(model_ref))
    ds = load_dataset(data_spec, transform=transform_from_dict(bundle.manifest["transform"]))
    metric = metric or ("cosine" if ds.modality == "text" else "l2")
    splits = {"train": [("train", ds.x_train, ds.y_train, ds.sources_train)],
              "test": [("test", ds.x_test, ds.y_test, ds.sources_test)]}
    splits["all"] = splits["train"] + splits["test"]
    encoder = onnx_session(bundle.graph("encoder"), device)
    index = LatentIndex.create(out, bundle.name, bundle.version, bundle.latent_dim, factory=factory, metric=metric)
    for name, x, y, sources in splits[split]:
        bar = None if quiet else Progress(-(-len(x) // batch_size), f"index {name}")
        for start in range(0, len(x), batch_size):
            rows = range(start, min(start + batch_size, len(x)))
            codes = encoder.run(None, {"x": np.ascontiguousarray(x[start:rows.stop])})[0]  # VAE kinds: the means
            keys = [f"{ds.name}/{name}/{i}" for i in rows]
            payloads = [{"split": name, "source": sources[i] if sources else None,
                         **({"label": ds.classes[int(y[i])] if ds.classes else int(y[i])} if y is not None else {})}
                        for i in rows]
            index.upsert(keys, codes, payloads, maintain=False)
            if bar:
                bar.update()
        if bar:
            bar.close(f"{index.stats()['count']} items")
    if min_train_points(factory):
        index.rebuild()  # trains on every code at once (FAISS warns below 39 per IVF list)
    else:
        index.snapshot()
    return index
