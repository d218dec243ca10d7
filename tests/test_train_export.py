"""Training runs, resume, evaluation and export to real ONNX bundles."""

import json

import numpy as np
import pytest
import torch
from helpers import train_run

from zspace.bundle import BundleError, load_bundle, resolve_bundle
from zspace.data import load_dataset
from zspace.errors import UserError
from zspace.runtime import onnx_session
from zspace.training.evaluate import coder_from_bundle, coder_from_run, evaluate, importance_sampled, retrieval
from zspace.training.export import export_run
from zspace.training.run import load_model, read_metrics
from zspace.transforms import transform_from_dict


def test_run_folder_contents(vae_run):
    for name in ("run.json", "metrics.jsonl", "best.pt", "last.pt"):
        assert (vae_run / name).is_file()
    rows = read_metrics(vae_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert {"val_kl", "val_neg_elbo", "val_sq_error"} <= rows[0].keys()


def test_resume_is_identical_to_one_go(tmp_path):
    whole = train_run(tmp_path / "whole", model="vae", epochs=3)
    part = train_run(tmp_path / "part", model="vae", epochs=3, stop_after=1)
    assert len(read_metrics(part)) == 1
    from zspace.training.train import TrainConfig, train

    cfg = json.loads((part / "run.json").read_text())["config"]
    train(TrainConfig(**{**cfg, "hidden": tuple(cfg["hidden"])}), part, resume=True, quiet=True)
    a = torch.load(whole / "last.pt", weights_only=False)["model"]
    b = torch.load(part / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_metrics(part)] == [1, 2, 3]


def test_out_folder_with_a_run_is_not_overwritten(vae_run):
    with pytest.raises(UserError, match="already holds a run"):
        train_run(vae_run)


def test_bundle_layout_parity_and_manifest(vae_bundle):
    bundle = load_bundle(vae_bundle)
    m = bundle.manifest
    assert vae_bundle.name == "1" and m["name"] == "digits" and m["kind"] == "vae"
    assert m["input_shape"] == [1, 8, 8] and m["input_dim"] == 64 and m["latent_dim"] == 4
    assert m["prior"] == {"type": "standard_normal"} and m["output"]["range"] == [0.0, 1.0]
    assert max(m["export"]["parity_max_abs"].values()) <= 1e-4
    assert m["training"]["data"]["spec"] == "digits" and m["training"]["seed"] == 0
    assert m["files"]["encoder"]["outputs"] == ["mean", "logvar"]
    # Dynamic batch axis: ONNX Runtime equals torch at batch sizes never seen at export.
    enc = onnx_session(bundle.graph("encoder"))
    dec = onnx_session(bundle.graph("decoder"))
    x = load_dataset("digits").x_test[:37]
    mean, logvar = enc.run(None, {"x": x})
    assert mean.shape == (37, 4) and logvar.shape == (37, 4)
    assert dec.run(None, {"z": mean})[0].shape == (37, 64)


def test_onnx_equals_torch_through_coders(vae_run, vae_bundle):
    x = load_dataset("digits").x_test[:50]
    run, bundle = coder_from_run(vae_run), coder_from_bundle(vae_bundle)
    assert np.abs(run.encode(x)[0] - bundle.encode(x)[0]).max() < 1e-4
    z = run.encode(x)[0]
    assert np.abs(run.decode(z) - bundle.decode(z)).max() < 1e-4


def test_tampered_bundle_is_refused(vae_bundle, tmp_path):
    import shutil

    copy = tmp_path / "digits" / "1"
    shutil.copytree(vae_bundle, copy)
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="decoder.onnx has SHA-256 .* the file was changed or damaged"):
        load_bundle(copy)
    assert resolve_bundle(tmp_path / "digits") == copy


def test_bundle_is_readable_by_other_users(vae_bundle):
    import stat

    assert vae_bundle.stat().st_mode & stat.S_IROTH and vae_bundle.stat().st_mode & stat.S_IXOTH, \
        "a server running as another user (the container's) must be able to read the bundle"


def test_versions_increase_and_exist_is_refused(vae_run, tmp_path):
    assert export_run(vae_run, tmp_path, "d").name == "1"
    assert export_run(vae_run, tmp_path, "d").name == "2"
    with pytest.raises(UserError, match="already exists"):
        export_run(vae_run, tmp_path, "d", version=2)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["1", "2"], "no staging folders left behind"


def test_evaluate_reports_model_beside_pca(vae_run, vae_bundle):
    from_run = evaluate(vae_run, k=20, progress=False)
    from_bundle = evaluate(vae_bundle, k=20, progress=False)
    for report in (from_run, from_bundle):
        assert {"sq_error", "mse", "nll_is", "neg_elbo", "precision@10", "mAP", "5nn_accuracy"} <= report["model"].keys()
        assert {"sq_error", "precision@10", "mAP"} <= report["pca"].keys()
        assert report["model"]["nll_is"] <= report["model"]["neg_elbo"] + 1e-6  # IS bound is tighter
    assert from_run["model"]["sq_error"] == pytest.approx(from_bundle["model"]["sq_error"], rel=1e-4)
    assert from_run["pca"] == from_bundle["pca"]


def test_retrieval_metrics_on_a_known_case():
    db = np.array([[0.0], [1.0], [10.0], [11.0]], np.float32)
    dby = np.array([0, 0, 1, 1])
    q = np.array([[0.2], [10.4]], np.float32)
    r = retrieval(q, np.array([0, 1]), db, dby, "l2", at=(1, 2, 4), knn=1)
    assert r["precision@1"] == 1.0 and r["precision@2"] == 1.0 and r["precision@4"] == 0.5
    assert r["mAP"] == 1.0 and r["1nn_accuracy"] == 1.0
    wrong = retrieval(q, np.array([1, 0]), db, dby, "l2", at=(1,), knn=1)
    assert wrong["precision@1"] == 0.0 and wrong["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)


@pytest.mark.parametrize("kind", ["pca", "ae", "beta_vae"])
def test_other_kinds_export(kind, tmp_path):
    extra = {"capacity_max": 5.0} if kind == "beta_vae" else {}
    run = train_run(tmp_path / kind, model=kind, epochs=1, **extra)
    bundle = load_bundle(export_run(run, tmp_path / "repo", kind))
    prior = bundle.manifest["prior"]
    assert prior["type"] == ("standard_normal" if kind == "beta_vae" else "gaussian")
    if kind != "beta_vae":
        chol = np.asarray(prior["cholesky"])
        assert chol.shape == (4, 4) and np.allclose(chol, np.tril(chol))


def test_text_model_uses_the_stored_vocabulary(jsonl_file, tmp_path):
    run = train_run(tmp_path / "text", data=f"texts:{jsonl_file}", model="ae", latent_dim=2, hidden=(16,),
                    epochs=2, vocab_size=30, weighting="tfidf")
    bundle = load_bundle(export_run(run, tmp_path / "repo", "docs"))
    m = bundle.manifest
    assert m["modality"] == "text" and m["output"]["likelihood"] == "multinomial"
    transform = transform_from_dict(m["transform"])
    ds = load_dataset(f"texts:{jsonl_file}", vocab_size=30, weighting="tfidf")
    texts = ["orbit rocket launch nasa", "recipe bake flour"]
    assert np.array_equal(transform.apply(texts), ds.transform.apply(texts))
    enc = onnx_session(bundle.graph("encoder"))
    model, _ = load_model(run)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(transform.apply(texts)))[0].numpy()
    assert np.abs(enc.run(None, {"x": transform.apply(texts)})[0] - want).max() < 1e-4


def test_importance_sampling_with_one_sample_is_the_elbo(vae_run):
    coder = coder_from_run(vae_run)
    x = load_dataset("digits").x_test[:20]
    r = importance_sampled(coder, x, k=1, progress=False)
    assert r["nll_is"] == pytest.approx(r["neg_elbo"])


def test_small_data_gets_a_smaller_batch_and_enough_steps():
    from zspace.training.train import MIN_STEPS, TrainConfig, sized_for

    small, note = sized_for(TrainConfig(epochs=0, batch_size=0), 540)  # ~600 images, 10% held out
    assert small.batch_size == 16 and small.epochs * -(-540 // 16) >= MIN_STEPS
    assert "batch 16 (auto" in note and "epochs (auto" in note
    mnist, _ = sized_for(TrainConfig(epochs=0, batch_size=0), 54_000)
    assert (mnist.batch_size, mnist.epochs) == (128, 30), "large data: the 2006 recipe's sizes, unchanged"
    given, note = sized_for(TrainConfig(epochs=7, batch_size=64), 540)
    assert (given.batch_size, given.epochs, note) == (64, 7, None), "explicit values are kept"


def test_the_cli_says_what_it_chose(idx_dir, tmp_path, cli):
    code, text = cli("train", "--data", f"idx:{idx_dir}", "--model", "ae", "--latent-dim", "2", "--hidden", "8",
                     "--out", tmp_path / "run")
    assert code == 0, text
    assert "train: 54 rows: batch 16 (auto" in text and "750 epochs (auto" in text
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["config"]["batch_size"], info["config"]["epochs"]) == (16, 750)
