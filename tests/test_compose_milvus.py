"""docker-compose.milvus.yml cannot run here (its Milvus, etcd and MinIO images cannot be pulled on this
machine); what can be checked is its shape: the services, their wiring, and what the replicas need."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_milvus_compose_file_wires_replicas_to_milvus_standalone():
    spec = yaml.safe_load((ROOT / "docker-compose.milvus.yml").read_text())
    services = spec["services"]
    assert set(services) == {"etcd", "minio", "standalone", "zspace"}
    for name in ("etcd", "minio", "standalone"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: a pinned official image, got {image}"
        assert "healthcheck" in services[name]
    milvus = services["standalone"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"] == {"ETCD_ENDPOINTS": "etcd:2379", "MINIO_ADDRESS": "minio:9000"}
    assert {d: c["condition"] for d, c in milvus["depends_on"].items()} == {"etcd": "service_healthy",
                                                                           "minio": "service_healthy"}
    z = services["zspace"]
    assert "milvus" in z["build"]["args"]["SERVE_EXTRA"] and "container_name" not in z, "replicas: no fixed name"
    assert str(z["deploy"]["replicas"]).startswith("${ZSPACE_REPLICAS")
    assert z["environment"]["ZSPACE_MILVUS_URI"] == "http://standalone:19530"
    assert z["depends_on"]["standalone"]["condition"] == "service_healthy"
    assert any(v.endswith(":/indexes:ro") for v in z["volumes"]), "replicas only read index.json"
    assert z["stop_signal"] == "SIGTERM" and z["healthcheck"]["test"][-1] == "zspace.service.healthcheck"
    # The image the replicas build installs what the extra names.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install --no-compile "/src[${SERVE_EXTRA}]"' in dockerfile


def test_the_deployment_says_where_milvus_is(tmp_path, monkeypatch):
    """ZSPACE_MILVUS_URI replaces a server URI from index.json (the host built it against 127.0.0.1)."""
    import pytest

    from zspace.index.backends import open_index
    from zspace.index.errors import IndexError_

    folder = tmp_path / "ix"
    folder.mkdir()
    (folder / "index.json").write_text('{"format_version": 1, "backend": "milvus", "uri": "http://127.0.0.1:1", '
                                       '"collection": "c", "model": {"name": "m", "version": 1}, "dim": 4, '
                                       '"metric": "l2", "factory": "Flat"}')
    monkeypatch.setenv("ZSPACE_MILVUS_URI", "http://127.0.0.1:2")
    with pytest.raises(IndexError_, match="cannot open http://127.0.0.1:2"):
        open_index(folder)
