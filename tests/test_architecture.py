"""The layering of docs/architecture.md, enforced: every import of every module, walked.

    zspace (core)      bundle, transforms, data, runtime, files, errors, ...: no other layer
    zspace.v1          the generated protocol code: nothing of ours
    zspace.kserve      the generated KServe v2 protocol code: nothing of ours
    zspace.training    core                      (the only layer with torch)
    zspace.index       core
    zspace.service     core, index, v1, kserve
    zspace.app         everything: the composition root (CLI, client CLI, index CLI, quickstart)

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layer -> its folder in the repository.
FOLDERS = {"zspace": ROOT / "zspace", "zspace.v1": ROOT / "zspace" / "v1", "zspace.kserve": ROOT / "zspace" / "kserve",
           "zspace.training": ROOT / "training",
           "zspace.index": ROOT / "index", "zspace.service": ROOT / "service", "zspace.app": ROOT / "zspace" / "app"}
MAY_IMPORT = {
    "zspace": {"zspace"},
    "zspace.v1": {"zspace.v1"},
    "zspace.kserve": {"zspace.kserve"},
    "zspace.training": {"zspace", "zspace.training"},
    "zspace.index": {"zspace", "zspace.index"},
    "zspace.service": {"zspace", "zspace.v1", "zspace.kserve", "zspace.index", "zspace.service"},
    "zspace.app": set(FOLDERS),
}
# Third-party packages a layer must not import: the serving image has no torch, the core stays light.
MUST_NOT = {
    "zspace": {"torch", "grpc", "faiss", "onnx", "matplotlib"},
    "zspace.index": {"torch", "grpc", "onnx"},
    "zspace.service": {"torch", "onnx", "matplotlib"},
}


def layer_of_module(name: str) -> str | None:
    """The layer a dotted module name belongs to (None: not ours)."""
    if name in ("service", "index", "training") or name.split(".")[0] in ("service", "index", "training"):
        return "bare"  # the old top-level names: they no longer exist once installed
    if name != "zspace" and not name.startswith("zspace."):
        return None
    for layer in ("zspace.app", "zspace.v1", "zspace.kserve", "zspace.training", "zspace.index", "zspace.service"):
        if name == layer or name.startswith(layer + "."):
            return layer
    return "zspace"


def modules() -> list[tuple[str, Path]]:
    """(layer, file) for every module of the package."""
    nested = [FOLDERS["zspace.app"], FOLDERS["zspace.v1"], FOLDERS["zspace.kserve"]]  # layers inside the core's folder
    out = []
    for layer, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if layer == "zspace" and any(n in path.parents for n in nested):
                continue
            out.append((layer, path))
    return out


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_import_respects_the_layers():
    wrong = []
    for layer, path in modules():
        for line, name in imports_of(path, layer):
            target = layer_of_module(name)
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if target == "bare":
                wrong.append(f"{where}: use the namespaced name (zspace.{name})")
            elif target is not None and target not in MAY_IMPORT[layer]:
                wrong.append(f"{where}: layer {layer} may import only {sorted(MAY_IMPORT[layer])}")
            elif target is None and name.split(".")[0] in MUST_NOT.get(layer, ()):
                wrong.append(f"{where}: layer {layer} must not depend on {name.split('.')[0]}")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_every_layer_and_catches_a_bad_import(tmp_path):
    """The check above must be able to fail: a core module importing the service is caught."""
    assert {layer for layer, _ in modules()} == set(FOLDERS)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from zspace.service.server import Server\n    import service.client\n")
    names = [name for _, name in imports_of(bad, "zspace")]
    assert [layer_of_module(n) for n in names] == ["zspace.service", "bare"]
    assert "zspace.service" not in MAY_IMPORT["zspace"]


@pytest.mark.parametrize("name", ["service", "index", "training"])
def test_installed_package_adds_no_top_level_service_index_or_training(name, tmp_path):
    """`pip install` (editable here) must not put `service`, `index` or `training` on anyone's path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import importlib.util, sys; import zspace.{name}; sys.exit(0 if importlib.util.find_spec({name!r}) is None else 1)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"`import {name}` works outside the checkout, or zspace.{name} does not: {done.stderr}"
