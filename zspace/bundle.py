"""The model bundle: `models/<name>/<version>/` with two ONNX graphs and a manifest.

The bundle is the contract between training (which writes it), the index and
the service (which read it). This module is the one place that knows its
layout: the manifest is parsed and checked into a typed `Bundle` here, written
here, and the rule for version folders lives here. Loading verifies every
graph's SHA-256 against the manifest, so a bundle that was edited or
half-copied is refused, not served. docs/architecture.md describes the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from zspace.errors import UserError
from zspace.files import write_atomic

log = logging.getLogger("zspace.bundle")

FORMAT_VERSION = 1
KINDS = ("pca", "ae", "vae", "beta_vae", "hash")  # hash: semantic hashing, binary codes of latent_dim bits
VAE_KINDS = ("vae", "beta_vae")
MODALITIES = ("image", "text", "vector")
LIKELIHOODS = ("bernoulli", "gaussian", "multinomial")
PRIORS = ("standard_normal", "gaussian")
GRAPHS = ("encoder", "decoder")
# Numeric precision of a bundle's graphs. fp32 is what export writes; int8 (dynamic quantization of the weights) and
# fp16 (float16 weights and arithmetic, float32 inputs and outputs) are variants made from an fp32 bundle, each with
# its own tolerance against the fp32 graphs, checked on the rows of `files.parity` at export and at every load.
PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_INPUTS = {"encoder": "x", "decoder": "z"}
MAX_NAME_CHARS = 64  # a model name: a folder name, and a label on every metric
NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}$")
REQUIRED = (
    "format_version", "name", "version", "kind", "modality", "input_dim", "latent_dim",
    "transform", "output", "prior", "training", "metrics", "export", "files",
)


class BundleError(UserError):
    """A bundle that cannot be used: missing file, bad manifest, wrong hash."""


@dataclass(frozen=True)
class GraphFile:
    """One ONNX graph of a bundle, as the manifest lists it."""

    path: str                 # relative to the bundle folder
    sha256: str
    input: str                # the graph's one input: x (encoder) or z (decoder)
    outputs: tuple[str, ...]  # encoder: mean (+ logvar for VAE kinds, + bits for hash); decoder: x_hat


@dataclass(frozen=True)
class Bundle:
    """A bundle's manifest, checked and typed. `manifest` keeps the whole JSON for people and reports."""

    path: Path
    format_version: int
    name: str
    version: int
    kind: str
    modality: str
    input_dim: int
    input_shape: tuple[int, ...] | None  # (C, H, W) for images
    latent_dim: int
    transform: dict                      # zspace.transforms.transform_from_dict reads it
    likelihood: str
    output_range: tuple[float, float] | None
    out_logvar: tuple[float, ...] | None  # learned per-feature log-variance of a Gaussian decoder
    prior: dict                          # what Generate samples: {"type": standard_normal | gaussian, ...}
    graphs: dict[str, GraphFile]
    manifest: dict = field(repr=False, compare=False)
    precision: str = "fp32"
    tolerance: dict[str, float] | None = None  # variants: max |variant - fp32| promised per graph on the parity rows
    parity_file: str | None = None             # variants: parity.npz, the fp32 graphs' answers to fixed rows

    @property
    def is_vae(self) -> bool:
        return self.kind in VAE_KINDS

    @property
    def is_hash(self) -> bool:
        """Semantic hashing: `mean` is the code's probabilities, `bits` them thresholded and packed (uint8)."""
        return self.kind == "hash"

    @property
    def precision_from(self) -> int | None:
        """A variant made from a bundle of this repository: the fp32 version it came from (None for fp32 bundles
        and for variants exported straight from a run)."""
        return ((self.manifest.get("precision") or {}).get("from") or {}).get("version")

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    def graph(self, which: str) -> Path:
        return self.path / self.graphs[which].path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_name(name: str, option: str = "--name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"{option}: {name!r} is not a valid model name (letters, digits, '.', '_', '-'; at most {MAX_NAME_CHARS})")
    return name


# ---------------------------------------------------------------- the version-folder rule


def is_version_folder(path: Path) -> bool:
    """A version is a folder named by a positive integer in ASCII digits (Triton's rule); anything else is
    ignored. str.isdigit() alone also takes "²", which int() refuses, and "١", which int() reads as 1."""
    name = path.name
    return name.isascii() and name.isdigit() and int(name) > 0 and path.is_dir()


_WARNED: set[str] = set()


def usable_name(path: Path, what: str) -> bool:
    """Whether a folder's name can be served: names travel in requests and answers as UTF-8, and a name
    that is not (bytes the file system holds, decoded by Python as surrogate escapes) cannot. Such a
    folder is skipped with one warning, not one per rescan."""
    try:
        path.name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        shown_path = os.fsencode(path).decode("utf-8", "backslashreplace")
        if shown_path not in _WARNED:
            _WARNED.add(shown_path)
            log.warning("%s %s skipped: its name is not UTF-8", what, shown_path)
        return False


def versions(repo: Path, name: str) -> list[int]:
    """The integer versions present under repo/name, ascending."""
    root = Path(repo) / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if is_version_folder(p))


def version_dirs(repo: Path) -> list[Path]:
    """Every repo/NAME/VERSION folder, in order (hidden NAME folders, such as staging ones, skipped)."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(v for n in repo.iterdir() if n.is_dir() and not n.name.startswith(".") and usable_name(n, "model folder")
                  for v in n.iterdir() if is_version_folder(v))


def repository_hint(repo: Path) -> str:
    """What a repository with no NAME/VERSION bundles holds instead, and what was expected (for a warning)."""
    expected = "expected NAME/VERSION/manifest.json folders (e.g. models/digits/1/manifest.json)"
    if (repo / "manifest.json").is_file():
        return f"this is a bundle folder itself; serve its repository instead ({repo.parent.parent}); {expected}"
    if any(is_version_folder(p) and (p / "manifest.json").is_file() for p in repo.iterdir() if p.is_dir()):
        return f"this is one model's folder of versions; serve its parent instead ({repo.parent}); {expected}"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in repo.iterdir() if not p.name.startswith("."))
    return f"no model bundles found; {expected}; found: {', '.join(found[:10]) or 'nothing'}" + (" ..." if len(found) > 10 else "")


def resolve_bundle(ref: str | os.PathLike) -> Path:
    """`models/NAME/VERSION` as given, or `models/NAME` -> its highest version."""
    ref = Path(ref)
    if (ref / "manifest.json").is_file():
        return ref
    found = versions(ref.parent, ref.name)
    if not found:
        raise BundleError(f"{ref}: neither a bundle nor a folder of numbered versions")
    return ref / str(found[-1])


# ---------------------------------------------------------------- manifest -> Bundle


def _field(m: dict, key: str, where: str, types: type | tuple, what: str):
    value = m.get(key)
    if isinstance(value, bool) or not isinstance(value, types):  # JSON true is no integer here
        raise BundleError(f"{where}: manifest field {key!r} must be {what}, got {value!r}"[:400])
    return value


def _choice(m: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
    value = m.get(key)
    if value not in choices:
        raise BundleError(f"{where}: manifest field {key!r} is {value!r}, expected one of {', '.join(choices)}"[:400])
    return value


def _positive(m: dict, key: str, where: str) -> int:
    value = _field(m, key, where, int, "a positive integer")
    if value < 1:
        raise BundleError(f"{where}: manifest field {key!r} must be a positive integer, got {value}")
    return value


def _graph_file(files: dict, which: str, where: str) -> GraphFile:
    entry = files.get(which)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        raise BundleError(f"{where}: manifest field 'files.{which}' needs a path and a sha256 for the {which} graph")
    if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
        raise BundleError(f"{where}: manifest field 'files.{which}.path' must stay inside the bundle, got {entry['path']!r}")
    outputs = entry.get("outputs") or (["mean"] if which == "encoder" else ["x_hat"])
    return GraphFile(path=entry["path"], sha256=entry["sha256"], input=entry.get("input") or GRAPH_INPUTS[which],
                     outputs=tuple(outputs))


def parse_manifest(m: object, path: Path) -> Bundle:
    """Check a manifest field by field and type it; a missing or wrong field is refused by name."""
    where = str(path)
    if not isinstance(m, dict):
        raise BundleError(f"{where}: manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise BundleError(f"{where}: manifest lacks {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: manifest format_version {m['format_version']!r}, this zspace reads {FORMAT_VERSION}")
    name = check_name(m["name"], f"{where}: manifest field 'name'")
    version = _positive(m, "version", where)
    kind = _choice(m, "kind", where, KINDS)
    modality = _choice(m, "modality", where, MODALITIES)
    input_dim, latent_dim = _positive(m, "input_dim", where), _positive(m, "latent_dim", where)
    transform = _field(m, "transform", where, dict, "an object")
    output = _field(m, "output", where, dict, "an object")
    likelihood = _choice(output, "likelihood", f"{where}: output", LIKELIHOODS)
    prior = _field(m, "prior", where, dict, "an object")
    _choice(prior, "type", f"{where}: prior", PRIORS)
    files = _field(m, "files", where, dict, "an object")
    shape = m.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise BundleError(f"{where}: manifest field 'input_shape' must be a list of positive integers, got {shape!r}"[:400])
    logvar = output.get("logvar")
    if logvar is not None and (not isinstance(logvar, list) or len(logvar) != input_dim):
        raise BundleError(f"{where}: manifest field 'output.logvar' must list {input_dim} numbers")
    out_range = output.get("range")
    precision, tolerance, parity_file = _precision(m, files, where)
    return Bundle(
        path=Path(path), format_version=FORMAT_VERSION, name=name, version=version, kind=kind, modality=modality,
        input_dim=input_dim, input_shape=tuple(shape) if shape else None, latent_dim=latent_dim,
        transform=transform, likelihood=likelihood, output_range=tuple(out_range) if out_range else None,
        out_logvar=tuple(logvar) if logvar is not None else None, prior=prior,
        graphs={g: _graph_file(files, g, where) for g in GRAPHS}, manifest=m,
        precision=precision, tolerance=tolerance, parity_file=parity_file,
    )


def _precision(m: dict, files: dict, where: str) -> tuple[str, dict[str, float] | None, str | None]:
    """(precision, tolerance per graph, parity file) of a manifest; a bundle without `precision` is fp32.

    A variant must say how far it may be from the fp32 graphs and carry the rows that check it: without
    them a server could not tell a sound int8 graph from a broken one."""
    block = m.get("precision")
    if block is None:
        return "fp32", None, None
    if not isinstance(block, dict):
        raise BundleError(f"{where}: manifest field 'precision' must be an object, got {block!r}"[:400])
    name = _choice(block, "name", f"{where}: precision", PRECISIONS)
    if name == "fp32":
        return name, None, None
    tolerance = block.get("tolerance")
    if (not isinstance(tolerance, dict) or set(tolerance) != set(GRAPHS)
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in tolerance.values())):
        raise BundleError(f"{where}: manifest field 'precision.tolerance' must give a number >= 0 for "
                          f"{' and '.join(GRAPHS)}, got {tolerance!r}"[:400])
    entry = files.get("parity")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        raise BundleError(f"{where}: manifest field 'files.parity' (path and sha256 of the parity rows) is needed "
                          f"by a {name} bundle")
    if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
        raise BundleError(f"{where}: manifest field 'files.parity.path' must stay inside the bundle, got {entry['path']!r}")
    return name, {g: float(tolerance[g]) for g in GRAPHS}, entry["path"]


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
    bundle = parse_manifest(manifest, path)
    hashed = {f"{which} graph": (entry.path, entry.sha256) for which, entry in bundle.graphs.items()}
    if bundle.parity_file:
        hashed["parity rows"] = (bundle.parity_file, manifest["files"]["parity"]["sha256"])
    for which, (relative, sha) in hashed.items():
        file = path / relative
        if not file.is_file():
            raise BundleError(f"{path}: {which} {relative} is missing")
        digest = sha256_file(file)
        if digest != sha:
            raise BundleError(
                f"{path}: {relative} has SHA-256 {digest[:16]}…, the manifest says "
                f"{sha[:16]}…; the file was changed or damaged"
            )
    return bundle


def write_manifest(folder: Path, manifest: dict) -> Bundle:
    """Check and write manifest.json atomically, so a reader never sees half; returns the typed bundle."""
    bundle = parse_manifest(manifest, Path(folder))
    write_atomic(Path(folder) / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return bundle
