"""The RPC wrapper and the servicer's composition, through a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import numpy as np
import pytest
from serving import start_thread

from zspace.bundle import BundleError, load_bundle
from zspace.errors import NotFound
from zspace.service.metrics import Metrics
from zspace.service.rpc import RpcHandlers, rpc
from zspace.service.servicer import ModelRpcs, add_zspace_service
from zspace.v1 import zspace_pb2 as pb
from zspace.v1 import zspace_pb2_grpc as pb_grpc


class Probe(RpcHandlers):
    """GetModel behaves as the requested model name says: the cases the wrapper must map."""

    RPCS = ("GetModel",)

    @rpc
    async def GetModel(self, request, context):
        name = request.model.name
        if name == "missing":
            raise NotFound("model 'missing' is not loaded")
        if name == "bug":
            raise KeyError("a stray key")  # a bug, not the client's fault
        if name == "slow":
            await asyncio.sleep(5)
        return pb.ModelInfo(name=name)


def test_status_mapping_deadline_and_metrics_through_a_real_server():
    metrics = Metrics()
    probe = Probe(metrics)

    async def main():
        server = grpc.aio.server()
        servicer = pb_grpc.ZSpaceServicer()
        servicer.GetModel = probe.GetModel
        pb_grpc.add_ZSpaceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ZSpaceStub(channel)
                for name, timeout in (("ok", 5), ("missing", 5), ("bug", 5), ("slow", 0.3)):
                    try:
                        await stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name=name)), timeout=timeout)
                        codes[name] = ("OK", "")
                    except grpc.aio.AioRpcError as exc:
                        codes[name] = (exc.code().name, exc.details())
        finally:
            await server.stop(1)
        return codes

    codes = asyncio.run(main())
    assert codes["ok"][0] == "OK"
    assert codes["missing"] == ("NOT_FOUND", "model 'missing' is not loaded")
    assert codes["bug"] == ("INTERNAL", "GetModel: internal error (logged on the server)"), "a KeyError is a bug"
    assert codes["slow"][0] == "DEADLINE_EXCEEDED"
    assert metrics.requests == {("GetModel", "", "OK"): 1, ("GetModel", "", "NOT_FOUND"): 1,
                                ("GetModel", "", "INTERNAL"): 1, ("GetModel", "", "DEADLINE_EXCEEDED"): 1}


def test_every_rpc_is_served_by_exactly_one_part():
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(1))  # registration is the same API on the sync server
    with pytest.raises(ValueError, match="RPCs not served"):
        add_zspace_service(server, Probe())
    models = ModelRpcs(repo=None, limits=None)
    with pytest.raises(ValueError, match="served twice"):
        add_zspace_service(server, models, Probe())


@pytest.mark.parametrize("field, value, message", [
    ("kind", "gan", "'kind' is 'gan', expected one of pca, ae, vae, beta_vae"),
    ("latent_dim", "8", "'latent_dim' must be a positive integer"),
    ("latent_dim", True, "'latent_dim' must be a positive integer"),
    ("prior", {"type": "uniform"}, "'type' is 'uniform'"),
    ("files", {"encoder": {"path": "../x.onnx", "sha256": "0"}, "decoder": {"path": "d", "sha256": "0"}}, "must stay inside"),
    ("input_shape", [1, -8, 8], "'input_shape' must be a list of positive integers"),
])
def test_a_wrong_manifest_field_is_refused_by_name(vae_bundle, tmp_path, field, value, message):
    copy = tmp_path / "digits" / "1"
    shutil.copytree(vae_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[field] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message.replace("[", r"\[")):
        load_bundle(copy)


def test_a_missing_manifest_field_is_named(vae_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(vae_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["prior"], manifest["latent_dim"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest lacks latent_dim, prior"):
        load_bundle(copy)


def test_serving_json_overrides_a_models_batching_and_a_bad_one_is_reported(vae_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(vae_bundle, models / "digits" / "1")
    (models / "digits" / "serving.json").write_text(json.dumps({"max_batch": 3, "instances": 2}))
    with start_thread(models) as s:
        rt = s.server.repo.get("digits")
        assert (rt.encode_batcher.max_batch, rt.encode_batcher.instances) == (3, 2)
        assert rt.batching.max_delay_ms == s.server.cfg.batch.max_delay_ms, "the rest is the server's"
        (models / "digits" / "serving.json").write_text(json.dumps({"max_batchh": 3}))
        s.rescan()
        broken = s.server.repo.broken
        assert any("unknown setting max_batchh" in e and "serving.json" in e for e in broken.values()), broken


def test_repeated_bugs_log_one_traceback_a_minute(caplog):
    from zspace.service.rpc import BugLog

    bugs = BugLog(window_s=60)
    with caplog.at_level("ERROR", logger="zspace.serve"):
        for _ in range(500):
            try:
                raise KeyError("a stray key")
            except KeyError as exc:
                bugs.report("GetModel", exc)
        bugs.last[("GetModel", "KeyError")] = (bugs.last[("GetModel", "KeyError")][0] - 61, 499)  # a minute on
        try:
            raise KeyError("again")
        except KeyError as exc:
            bugs.report("GetModel", exc)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2 and "499 more KeyError" in caplog.text


def test_cuda_is_exact_unless_tf32_is_asked_for():
    from zspace.runtime import cuda_provider, providers_for

    assert cuda_provider() == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert cuda_provider(tf32=True)[1] == {"use_tf32": "1"}
    assert providers_for("cpu", cuda_tf32=True) == ["CPUExecutionProvider"]


def test_io_binding_runner_equals_session_run_across_threads_and_growth(vae_bundle):
    """The io_binding path (zspace.cuda_io) answers exactly what session.run does, for every batch size and
    from several threads at once; on a GPU machine the same test runs it on CUDA with page-locked buffers."""
    from concurrent.futures import ThreadPoolExecutor

    from zspace.bundle import load_bundle
    from zspace.cuda_io import PinnedRunner, pinned_host, plain_host
    from zspace.runtime import RuntimeOptions, gpu_visible, open_runtime

    runtime = open_runtime(load_bundle(vae_bundle), RuntimeOptions(device="auto"))
    cuda = runtime.provider.startswith("CUDA")
    alloc = pinned_host() if cuda else plain_host
    encode, decode = PinnedRunner(runtime.encoder, alloc), PinnedRunner(runtime.decoder, alloc)
    rng = np.random.default_rng(0)

    def check(rows: int) -> None:
        x = rng.random((rows, runtime.bundle.input_dim), dtype=np.float32)
        want = runtime.encoder.run(None, {runtime.encoder.get_inputs()[0].name: x})
        got = encode(x)
        assert [g.shape for g in got] == [w.shape for w in want] and len(got) == 2  # mean and logvar
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        z = want[0]
        np.testing.assert_array_equal(decode(z)[0], runtime.decoder.run(None, {runtime.decoder.get_inputs()[0].name: z})[0])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, [1, 7, 300, 1, 700, 3, 256, 1025]))
    first = encode(np.zeros((1, runtime.bundle.input_dim), np.float32))[0]
    encode(np.ones((5, runtime.bundle.input_dim), np.float32))
    assert first.shape == (1, runtime.bundle.latent_dim) and np.isfinite(first).all()  # a later run left it alone
    with pytest.raises(ValueError, match="expected rows of"):
        encode(np.zeros((2, 3), np.float32))
    assert runtime.io == ("auto" if cuda and gpu_visible() else "plain")
