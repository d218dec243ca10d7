"""KServe v2 / Open Inference Protocol on the zspace port, driven by the real tritonclient (tests/kserve_driver.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving import start_thread

from zspace.bundle import load_bundle
from zspace.data import load_dataset
from zspace.runtime import onnx_session
from zspace.service.config import Limits

HERE = Path(__file__).resolve().parent
MAX_ROWS = 32


@pytest.fixture(scope="module")
def repo(vae_bundle) -> Path:
    return vae_bundle.parents[1]


@pytest.fixture(scope="module")
def server(repo):
    with start_thread(repo, limits=Limits(max_rows=MAX_ROWS)) as s:
        yield s


def drive(target: str, scenario: str, out: Path, *extra: str) -> dict:
    """Run the tritonclient driver in its own process (see its docstring for why); its result.json."""
    done = subprocess.run([sys.executable, str(HERE / "kserve_driver.py"), target, scenario, str(out), *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def reference(repo: Path, graph: str, feed: np.ndarray) -> list[np.ndarray]:
    bundle = load_bundle(repo / "digits" / "1")
    return onnx_session(bundle.graph(graph)).run(None, {bundle.graphs[graph].input: feed})


def test_tritonclient_reads_metadata_and_infers_like_in_process_onnx_runtime(server, repo, tmp_path):
    x = np.ascontiguousarray(load_dataset("digits").x_test[:6], dtype=np.float32)
    x_u8 = np.round(x * 255).astype(np.uint8)
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x_u8.npy", x_u8)
    np.save(tmp_path / "z.npy", z)
    r = drive(server.target, "basic", tmp_path)

    assert r["live"] and r["ready"] and r["model_ready"] and r["decoder_ready"] and r["version_1_ready"]
    assert not r["unknown_ready"]
    assert r["server"]["name"] == "zspace"
    bundle = load_bundle(repo / "digits" / "1")
    meta = r["metadata"]
    assert meta["name"] == "digits.encoder" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": bundle.graphs["encoder"].input, "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["shape"] for o in meta["outputs"]] == [["-1", "4"], ["-1", "4"]]  # mean and log sigma^2
    assert r["decoder_metadata"]["inputs"][0]["shape"] == ["-1", "4"]
    assert r["config"]["max_batch_size"] == MAX_ROWS and r["config"]["dynamic_batching"]["preferred_batch_size"] == [64]

    mean, logvar = reference(repo, "encoder", x)
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy"), mean, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "logvar.npy"), logvar, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "mean_typed.npy"), mean, atol=1e-5)
    # UINT8 images are divided by 255 as the bundle's image transform does; FP16 is read as sent.
    np.testing.assert_allclose(np.load(tmp_path / "mean_u8.npy"), reference(repo, "encoder", x_u8 / np.float32(255))[0],
                               atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "mean_f16.npy"),
                               reference(repo, "encoder", x.astype(np.float16).astype(np.float32))[0], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "x_hat.npy"), reference(repo, "decoder", z)[0], atol=1e-5)
    assert r["only_outputs"] == [meta["outputs"][1]["name"]], "only the requested output is sent"
    assert r["typed_id"] == "t1" and r["typed_version"] == "1"
    assert 'method="ModelInfer",model="digits.encoder"' in server.metrics_text(), "the same metrics as zspace.v1"


def test_bad_inputs_get_the_status_codes_the_protocol_uses(server, tmp_path):
    np.save(tmp_path / "x.npy", np.ascontiguousarray(load_dataset("digits").x_test[:3], dtype=np.float32))
    (tmp_path / "max_rows").write_text(str(MAX_ROWS))
    r = drive(server.target, "bad", tmp_path)
    expect = {
        "unknown_model": ("NOT_FOUND", "unknown model: 'nope.encoder'"),
        "unknown_graph": ("NOT_FOUND", "digits.encoder, digits.decoder"),
        "unknown_version": ("NOT_FOUND", "no version 99"),
        "bad_version": ("INVALID_ARGUMENT", "model_version: expected a positive integer"),
        "wrong_datatype": ("INVALID_ARGUMENT", "datatype 'INT32' is not accepted"),
        "uint8_latents": ("INVALID_ARGUMENT", "UINT8 is for 8-bit images"),
        "wrong_shape": ("INVALID_ARGUMENT", "unexpected shape [3, 10], expected [-1, 64]"),
        "wrong_input_name": ("INVALID_ARGUMENT", "unexpected inference input 'pixels'"),
        "oversized_batch": ("INVALID_ARGUMENT", f"batch of {MAX_ROWS + 1} rows is over max_batch_size {MAX_ROWS}"),
        "unknown_output": ("INVALID_ARGUMENT", "unexpected inference output 'nope'"),
        "nan": ("INVALID_ARGUMENT", "contains NaN or infinity"),
        "metadata_unknown": ("NOT_FOUND", "unknown model"),
        "byte_length": ("INVALID_ARGUMENT", "unexpected total byte size 764, expecting 768"),
    }
    for case, (status, says) in expect.items():
        assert r[case]["status"] == status, (case, r[case])
        assert says in r[case]["message"], (case, r[case])


def test_probes_need_no_token_and_inference_does(repo, tmp_path):
    np.save(tmp_path / "x.npy", np.ascontiguousarray(load_dataset("digits").x_test[:2], dtype=np.float32))
    with start_thread(repo, token="s3cret") as s:
        r = drive(s.target, "auth", tmp_path, "s3cret")
    assert r["live"] and r["ready"]
    assert r["no_token"]["status"] == "UNAUTHENTICATED"
    assert r["token"]["status"] == "OK"
