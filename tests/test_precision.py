"""Precision variants of a bundle (int8, fp16): made by export and by `zspace quantize`, measured, checked at
load against their own tolerance, and chosen by the server per model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import train_run
from serving import start_thread

from zspace.bundle import BundleError, load_bundle, write_manifest
from zspace.runtime import check_variant, onnx_session, open_runtime
from zspace.service.client import ZSpaceClient

COST_KEYS = {"rows", "code_max_abs", "code_mean_abs", "code_max_of_range", "sq_error", "sq_error_fp32",
             "sq_error_change", "p_at_10", "p_at_10_fp32", "p_at_10_change"}


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("runs") / "ae", model="ae", latent_dim=8, hidden=(64, 32), epochs=3)


@pytest.fixture(scope="module")
def repo(ae_run, tmp_path_factory, cli) -> Path:
    """models/digits: 1 fp32 (export), 2 int8 (quantize), 3 fp16 (quantize from 1)."""
    root = tmp_path_factory.mktemp("precision") / "models"
    for args in (("export", str(ae_run), "--repo", str(root), "--name", "digits"),
                 ("quantize", str(root / "digits"), "--precision", "int8"),
                 ("quantize", str(root / "digits" / "1"), "--precision", "fp16")):
        code, text = cli(*args)
        assert code == 0, text
    return root


def test_the_exported_graph_quantizes_as_it_is(repo, tmp_path):
    """ONNX Runtime's quantizer used to fail on the exporter's restated weight shapes ("Inferred shape and
    existing shape differ"); the exported file itself must quantize."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for graph in ("encoder", "decoder"):
        quantize_dynamic(str(repo / "digits" / "1" / f"{graph}.onnx"), str(tmp_path / f"{graph}.onnx"),
                         weight_type=QuantType.QInt8)
        assert (tmp_path / f"{graph}.onnx").stat().st_size > 0


def test_quantize_writes_the_next_version_with_its_cost_and_tolerance(repo):
    fp32, int8, fp16 = (load_bundle(repo / "digits" / str(v)) for v in (1, 2, 3))
    assert (fp32.precision, int8.precision, fp16.precision) == ("fp32", "int8", "fp16")
    for variant in (int8, fp16):
        block = variant.manifest["precision"]
        assert block["from"] == {"name": "digits", "version": 1, "sha256": {g: fp32.graphs[g].sha256 for g in fp32.graphs}}
        assert set(block["cost"]) >= COST_KEYS and block["cost"]["rows"] == 359
        assert block["cost"]["sq_error_fp32"] == pytest.approx(fp32.manifest["metrics"]["test_sq_error"], rel=1e-4)
        assert variant.manifest["metrics"]["test_sq_error"] == block["cost"]["sq_error"]
        assert all(block["tolerance"][g] >= block["parity_max_abs"][g] for g in ("encoder", "decoder"))
        assert (variant.path / "parity.npz").is_file() and variant.manifest["files"]["parity"]["rows"] == 64
        # float32 at the graph's edges, whatever is inside
        for g in ("encoder", "decoder"):
            session = onnx_session(variant.graph(g))
            assert session.get_inputs()[0].type == "tensor(float)"
            assert all(o.type == "tensor(float)" for o in session.get_outputs())
    ops = {n.op_type for n in __import__("onnx").load(str(int8.graph("encoder"))).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    # int8 costs something, fp16 almost nothing; both within a few per cent here
    assert int8.manifest["precision"]["cost"]["code_max_abs"] > fp16.manifest["precision"]["cost"]["code_max_abs"]
    assert abs(int8.manifest["precision"]["cost"]["sq_error_change"]) < 0.1
    assert abs(int8.manifest["precision"]["cost"]["p_at_10_change"]) < 0.05


def test_export_can_write_a_variant_directly(ae_run, tmp_path, cli):
    code, text = cli("export", str(ae_run), "--repo", str(tmp_path), "--name", "d8", "--precision", "int8")
    assert code == 0, text
    bundle = load_bundle(tmp_path / "d8" / "1")
    assert bundle.precision == "int8" and bundle.manifest["precision"]["from"]["run"] == str(ae_run)
    assert "P@10" in text and "squared error" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d8"]  # the fp32 staging folder is gone
    assert not (tmp_path / "d8" / "1" / "fp32").exists()


def test_a_variant_outside_its_tolerance_is_refused_at_load_and_the_rest_serve(repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(repo, root)
    bundle = load_bundle(root / "digits" / "2")
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    manifest["precision"]["tolerance"]["encoder"] = 1e-12  # a promise the int8 graph cannot keep
    write_manifest(bundle.path, manifest)
    with pytest.raises(BundleError, match="the int8 encoder on CPUExecutionProvider differs from the fp32 graph by .* "
                                          "promises at most 1.00e-12"):
        check_variant(open_runtime(load_bundle(bundle.path)))
    with start_thread(root) as s, ZSpaceClient(s.target) as c:
        listed = c.list_models()
        assert [(m.version, m.precision) for m in listed.models] == [(1, "fp32"), (3, "fp16")]
        assert "digits/2" == listed.broken[0].path and "promises at most" in listed.broken[0].error


def test_quantize_refuses_what_it_cannot_do(repo, cli, tmp_path):
    code, text = cli("quantize", str(repo / "digits" / "2"), "--precision", "int8")
    assert code == 2 and "is int8; quantize its fp32 version (1)" in text
    code, text = cli("quantize", str(repo / "digits" / "1"), "--precision", "int8", "--version", "2")
    assert code == 2 and "already exists" in text
    code, text = cli("quantize", str(repo / "digits" / "1"), "--precision", "int4")
    assert code == 2 and "int4" in text and "Traceback" not in text
    code, text = cli("quantize", str(repo / "digits" / "1"), "--precision", "int8", "--data", str(tmp_path / "none"))
    assert code == 2 and "--data" in text and "Traceback" not in text
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2", "3"]  # nothing half-made


def test_the_server_answers_with_the_chosen_precision(repo, tmp_path):
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    expected = {v: open_runtime(load_bundle(repo / "digits" / str(v))).encode(x)[0] for v in (1, 2, 3)}
    with start_thread(repo) as s, ZSpaceClient(s.target) as c:  # default: the highest version (fp16 here)
        assert [(m.version, m.precision, m.precision_from, m.answers_latest) for m in c.list_models().models] == \
            [(1, "fp32", 0, False), (2, "int8", 1, False), (3, "fp16", 1, True)]
        np.testing.assert_array_equal(c.encode("digits", x)[0], expected[3])
    with start_thread(repo, precision="int8") as s, ZSpaceClient(s.target) as c:
        np.testing.assert_array_equal(c.encode("digits", x)[0], expected[2])
        assert c.get_model("digits").precision == "int8" and c.get_model("digits").answers_latest
        np.testing.assert_array_equal(c.encode("digits", x, version=1)[0], expected[1])  # a version asked by number
    root = tmp_path / "models"
    shutil.copytree(repo, root)
    (root / "digits" / "serving.json").write_text(json.dumps({"precision": "fp32", "max_batch": 8}))
    with start_thread(root, precision="int8") as s, ZSpaceClient(s.target) as c:  # the model's file wins
        np.testing.assert_array_equal(c.encode("digits", x)[0], expected[1])
        assert c.get_model("digits").version == 1
    (root / "digits" / "serving.json").write_text(json.dumps({"precision": "int7"}))
    with start_thread(root) as s, ZSpaceClient(s.target) as c:
        broken = c.list_models().broken
        assert broken and all("serving.json: precision: expected one of fp32, fp16, int8, got 'int7'" in b.error
                              for b in broken)


def test_a_hash_model_variant_reports_how_many_bits_agree(tmp_path, cli):
    run = train_run(tmp_path / "hash", model="hash", bits=16, latent_dim=16, hidden=(64, 32), epochs=2)
    assert cli("export", str(run), "--repo", str(tmp_path / "m"), "--name", "h")[0] == 0
    code, text = cli("quantize", str(tmp_path / "m" / "h"), "--precision", "int8")
    assert code == 0, text
    cost = load_bundle(tmp_path / "m" / "h" / "2").manifest["precision"]["cost"]
    assert 0.9 <= cost["bits_agreement"] <= 1.0 and "bits agree" in text
