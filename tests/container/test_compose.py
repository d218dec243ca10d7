"""The deployment for real: build the image, `compose up`, call it from the host, drain it, `compose down`.

Marked `container`: the fast suite skips it; scripts/container-smoke.sh runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from testbed.servers import free_port

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parents[2]


def compose_cmd() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("podman-compose"):
        return ["podman-compose"]
    pytest.skip("neither `docker compose` nor podman-compose is available")


def engine() -> str:
    return "docker" if compose_cmd()[0] == "docker" else "podman"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from zspace.index.build import build_index
    from zspace.training.export import export_run
    from zspace.training.train import TrainConfig, train

    work = tmp_path_factory.mktemp("deploy")
    run = train(TrainConfig(data="digits", model="vae", latent_dim=4, hidden=(64, 32), epochs=3, seed=0),
                work / "run", quiet=True)
    bundle = export_run(run, work / "models", "digits")
    build_index(bundle, "digits", work / "indexes" / "digits", quiet=True).close()
    for p in [work / "indexes", *(work / "indexes").rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)  # the image runs as uid 10001
    port, metrics, http = free_port(), free_port(), free_port()
    name = f"zspace-smoke-{os.getpid()}"
    env = {**os.environ, "ZSPACE_MODELS": str(work / "models"), "ZSPACE_INDEXES": str(work / "indexes"),
           "ZSPACE_PORT": str(port), "ZSPACE_METRICS_PORT": str(metrics), "ZSPACE_HTTP_PORT": str(http),
           "ZSPACE_CONTAINER": name,
           "ZSPACE_MAX_DELAY_MS": "1500", "ZSPACE_THREADS": "1", "BUILDAH_FORMAT": "docker",
           "ZSPACE_WORKERS": "2"}  # the supervised group in the container: drain and health go through the parent
    compose = compose_cmd() + ["-p", name]
    subprocess.run(compose + ["build"], cwd=ROOT, env=env, check=True)
    subprocess.run(compose + ["up", "-d"], cwd=ROOT, env=env, check=True)
    try:
        yield {"target": f"127.0.0.1:{port}", "metrics": metrics, "http": http, "bundle": bundle, "name": name, "compose": compose, "env": env}
    finally:
        subprocess.run(compose + ["down"], cwd=ROOT, env=env)


def wait_healthy(target: str, timeout: float = 120) -> None:
    from zspace.service.client import ZSpaceClient

    deadline = time.monotonic() + timeout
    with ZSpaceClient(target, timeout=3, retries=1) as c:
        while time.monotonic() < deadline:
            try:
                if c.health() == "SERVING":
                    return
            except Exception:
                pass
            time.sleep(1)
    raise TimeoutError(f"{target} did not become SERVING in {timeout}s")


def test_encode_generate_search_then_drain(deployment):
    from zspace.bundle import load_bundle
    from zspace.data import load_dataset
    from zspace.runtime import onnx_session
    from zspace.service.client import ZSpaceClient

    wait_healthy(deployment["target"])
    bundle = load_bundle(deployment["bundle"])
    enc, dec = onnx_session(bundle.graph("encoder")), onnx_session(bundle.graph("decoder"))
    x = load_dataset("digits").x_test[:8]
    with ZSpaceClient(deployment["target"], timeout=30) as c:
        mean, logvar = c.encode("digits", x)
        want_mean, want_logvar = enc.run(None, {"x": x})
        assert np.allclose(mean, want_mean, atol=1e-5) and np.allclose(logvar, want_logvar, atol=1e-5)
        gen = c.generate("digits", count=4, seed=1)
        assert np.allclose(gen.x, dec.run(None, {"z": gen.latents})[0], atol=1e-5)
        hits = c.search("digits", x[:2], k=3)
        assert all(len(row) == 3 for row in hits) and hits[0][0][0].startswith("digits/train/")
        info = c.get_model("digits")
        assert info.execution_provider == "CPUExecutionProvider"
        with urllib.request.urlopen(f"http://127.0.0.1:{deployment['metrics']}/metrics", timeout=10) as r:
            assert "zspace_workers_serving 2.0" in r.read().decode(), "ZSPACE_WORKERS=2 reached the container"
        # HTTP is on in the container: the explorer's page and the same codes as JSON.
        http = f"http://127.0.0.1:{deployment['http']}"
        with urllib.request.urlopen(f"{http}/ui/", timeout=10) as r:
            assert b"zspace explorer" in r.read()
        request = urllib.request.Request(f"{http}/v1/models/digits/encode", method="POST",
                                         data=json.dumps({"inputs": {"tensor": x[:2].tolist()}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert np.allclose(json.loads(r.read())["mean"], want_mean[:2], atol=1e-5)

        # SIGTERM with a request in flight: the request (held ~1.5 s in the batch queue) still succeeds.
        result = {}
        worker = threading.Thread(target=lambda: result.update(codes=c.encode("digits", x[:1])[0]))
        worker.start()
        time.sleep(0.4)
        stop = subprocess.run(deployment["compose"] + ["stop", "zspace"], cwd=ROOT, env=deployment["env"],
                              capture_output=True, text=True)
        worker.join(60)
    assert stop.returncode == 0, stop.stderr
    assert result["codes"].shape == (1, 4), "the in-flight request finished"
    state = subprocess.run([engine(), "inspect", deployment["name"], "--format", "{{.State.ExitCode}}"],
                           capture_output=True, text=True)
    assert state.stdout.strip() == "0", f"exit code {state.stdout.strip()} {state.stderr}"
