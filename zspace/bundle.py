"""The model bundle: `models/<name>/<version>/` with two ONNX graphs and a manifest.

Training writes it, the service and the index read it; this module is the one
place that knows its layout. Loading verifies every graph's SHA-256 against the
manifest, so a bundle that was edited or half-copied is refused, not served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from zspace.errors import UserError

FORMAT_VERSION = 1
KINDS = ("pca", "ae", "vae", "beta_vae")
VAE_KINDS = ("vae", "beta_vae")
MODALITIES = ("image", "text", "vector")
GRAPHS = ("encoder", "decoder")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REQUIRED = (
    "format_version", "name", "version", "kind", "modality", "input_dim", "latent_dim",
    "transform", "output", "prior", "training", "metrics", "export", "files",
)


class BundleError(UserError):
    """A bundle that cannot be used: missing file, bad manifest, wrong hash."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def input_dim(self) -> int:
        return int(self.manifest["input_dim"])

    def graph(self, which: str) -> Path:
        return self.path / self.manifest["files"][which]["path"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UserError(f"--name: {name!r} is not a valid model name (letters, digits, '.', '_', '-'; at most 64)")
    return name


def versions(repo: Path, name: str) -> list[int]:
    """The integer versions present under repo/name, ascending."""
    root = Path(repo) / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def validate_manifest(m: dict, where: str) -> None:
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise BundleError(f"{where}: manifest lacks {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: manifest format_version {m['format_version']!r}, this zspace reads {FORMAT_VERSION}")
    if m["kind"] not in KINDS:
        raise BundleError(f"{where}: kind {m['kind']!r} is not one of {', '.join(KINDS)}")
    if m["modality"] not in MODALITIES:
        raise BundleError(f"{where}: modality {m['modality']!r} is not one of {', '.join(MODALITIES)}")
    for g in GRAPHS:
        entry = m["files"].get(g)
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise BundleError(f"{where}: manifest has no path and sha256 for the {g} graph")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle folder, check its manifest and verify each graph's hash."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: manifest is not a JSON object")
    validate_manifest(manifest, str(path))
    for g in GRAPHS:
        entry = manifest["files"][g]
        graph = path / entry["path"]
        if not graph.is_file():
            raise BundleError(f"{path}: {g} graph {entry['path']} is missing")
        digest = sha256_file(graph)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{path}: {entry['path']} has SHA-256 {digest[:16]}…, the manifest says "
                f"{entry['sha256'][:16]}…; the file was changed or damaged"
            )
    return Bundle(path=path, manifest=manifest)


def resolve_bundle(ref: str | os.PathLike) -> Path:
    """`models/NAME/VERSION` as given, or `models/NAME` -> its highest version."""
    ref = Path(ref)
    if (ref / "manifest.json").is_file():
        return ref
    found = versions(ref.parent, ref.name)
    if not found:
        raise BundleError(f"{ref}: neither a bundle nor a folder of numbered versions")
    return ref / str(found[-1])


def write_manifest(path: Path, manifest: dict) -> None:
    """Write manifest.json atomically (temp file + rename), so a reader never sees half."""
    validate_manifest(manifest, str(path))
    tmp = path / "manifest.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / "manifest.json")
