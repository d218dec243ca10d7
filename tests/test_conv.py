"""Convolutional models: AE, VAE and β-VAE with --arch conv on images of any size, exported with the
same parity check, served and indexed unchanged; --arch auto picks conv for images from 16x16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from serving import start_thread

from zspace.bundle import load_bundle
from zspace.data import load_dataset
from zspace.service.client import ZSpaceClient
from zspace.training.models import ModelConfig, build_model
from zspace.training.train import TrainConfig, check_config


def image_folder(root, size: tuple[int, int], n: int = 12, mode: str = "RGB"):
    """Two classes of random images of one size (width, height)."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (1, 10, 10), (3, 17, 9), (1, 5, 5)])
@pytest.mark.parametrize("kind", ["ae", "vae", "hash"])
def test_conv_nets_retrace_any_image_size(shape, kind):
    c, h, w = shape
    cfg = ModelConfig(kind=kind, input_dim=c * h * w, latent_dim=8, arch="conv", input_shape=shape)
    model = build_model(cfg)
    x = torch.rand(3, c * h * w)
    z = model.encode(x)[0]
    assert z.shape == (3, 8) and model.decode(z).shape == (3, c * h * w)
    loss, _ = model.loss(x)
    loss.backward()  # every layer takes part
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind, extra", [("ae", []), ("vae", []), ("beta-vae", ["--beta", "4"])])
def test_cli_trains_exports_serves_and_indexes_conv_models(kind, extra, cli, tmp_path):
    data = image_folder(tmp_path / "imgs", (20, 14))
    run, models = tmp_path / "run", tmp_path / "models"
    code, out = cli("train", "--data", f"images:{data}", "--model", kind, "--latent-dim", "4", "--arch", "conv",
                    "--channels", "8,16", "--epochs", "2", "--batch-size", "8", "--out", run, *extra)
    assert code == 0, out
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["arch"] == "conv" and info["model"]["input_shape"] == [3, 14, 20]
    code, out = cli("export", run, "--repo", models, "--name", "pics")
    assert code == 0, out
    bundle = load_bundle(models / "pics" / "1")
    assert max(bundle.manifest["export"]["parity_max_abs"].values()) <= 1e-4
    code, out = cli("index", "build", "--model", models / "pics", "--data", f"images:{data}",
                    "--out", tmp_path / "indexes" / "ix")
    assert code == 0, out
    with start_thread(models, indexes=tmp_path / "indexes") as s, ZSpaceClient(s.target, timeout=20) as c:
        png = (data / "a" / "0.png").read_bytes()
        mean, logvar = c.encode("pics", images=[png])
        assert mean.shape == (1, 4) and (logvar is not None) == (kind != "ae")
        assert c.reconstruct("pics", images=[png]).x.shape == (1, 3 * 14 * 20)
        hits = c.search("ix", images=[png], k=3)[0]
        assert hits[0].payload["source"].endswith("a/0.png") and hits[0].distance == pytest.approx(0, abs=1e-4)


def test_arch_auto_and_refusals(tmp_path):
    small = load_dataset(f"images:{image_folder(tmp_path / 's', (15, 28), 4, 'L')}")
    big = load_dataset(f"images:{image_folder(tmp_path / 'b', (28, 28), 4)}")
    assert check_config(TrainConfig(data="x", model="ae", latent_dim=4), small)[1].arch == "mlp"  # 15 px wide: too small
    assert check_config(TrainConfig(data="x", model="vae", latent_dim=4), big)[1].arch == "conv"
    assert check_config(TrainConfig(data="x", model="pca", latent_dim=4), big)[1].arch == "mlp"
    from zspace.errors import UserError

    with pytest.raises(UserError, match="--arch conv: for image data"):
        check_config(TrainConfig(data="digits", model="ae", latent_dim=2, arch="conv"), load_dataset("texts:" + str(
            _texts(tmp_path))))
    with pytest.raises(UserError, match="PCA is linear"):
        check_config(TrainConfig(data="x", model="pca", latent_dim=4, arch="conv"), big)


def _texts(tmp_path):
    folder = tmp_path / "texts" / "t"
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"words {i} more words here and there", encoding="utf-8")
    return tmp_path / "texts"
