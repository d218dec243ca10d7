"""Opening and building an index by backend name: the one place that knows which backends there are.

Each backend is a class with the surface of `contract.LatentCodeIndex` and three class-level
entry points this module calls: `open_folder(path, manifest, snapshots, follow)`,
`build(out, spec, model, dim, metric, fill)` (an index made whole or not at all, filled by
`fill`) and `default_factory(metric)`. Backends are imported when first named, so a FAISS-only
user never imports pymilvus.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from zspace.index.contract import IndexSpec, LatentCodeIndex, check_binding, read_manifest
from zspace.index.errors import IndexError_

# backend name -> (module, class)
BACKENDS = {"faiss": ("zspace.index.latent_index", "LatentIndex"),
            "milvus": ("zspace.index.milvus_index", "MilvusIndex")}


def backend_class(name: str):
    """The class of a backend named in index.json or by --backend."""
    if name not in BACKENDS:
        raise IndexError_(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def open_index(path: Path, model_name: str | None = None, model_version: int | None = None,
               snapshots: bool = True, follow: bool = False) -> LatentCodeIndex:
    """Open an index folder of any backend; with a model given, refuse an index of another one.

    snapshots and follow concern backends that keep a local copy (FAISS): see LatentIndex."""
    manifest = read_manifest(path)
    check_binding(manifest, Path(path), model_name, model_version)
    return backend_class(manifest.get("backend", "faiss")).open_folder(Path(path), manifest, snapshots, follow)


def build(out: Path, spec: IndexSpec, model: tuple[str, int], dim: int, metric: str,
          fill: Callable[[LatentCodeIndex], None]) -> LatentCodeIndex:
    """A new index at `out` of `spec.backend`, filled by `fill`, made whole or not at all; the index, open."""
    out = Path(out)
    if (out / "index.json").exists():
        raise IndexError_(f"{out}: an index already exists here")
    return backend_class(spec.backend).build(out, spec, model, dim, metric, fill)


def default_factory(spec: IndexSpec, metric: str) -> str:
    return spec.factory or backend_class(spec.backend).default_factory(metric)
