"""The command line through click's runner: the documented shapes, and bad input as one clear line."""

import gzip
import json

import pytest


def test_every_command_has_help_with_defaults(cli):
    for cmd in ("train", "evaluate", "export", "quickstart"):
        code, out = cli(cmd, "--help")
        assert code == 0 and "--" in out
    code, out = cli("train", "--help")
    assert "[default: 1000,500,250]" in out and "[default: digits]" in out


def test_train_evaluate_export_round_trip(tmp_path, cli):
    out = tmp_path / "run"
    code, text = cli("train", "--data", "digits", "--model", "ae", "--latent-dim", "3", "--hidden", "32,16",
                     "--epochs", "2", "--batch-size", "128", "--seed", "1", "--device", "auto", "--out", out)
    assert code == 0, text
    assert (out / "loss_curves.png").is_file() and (out / "reconstructions.png").is_file() and (out / "latent_map.png").is_file()
    code, text = cli("evaluate", out, "--data", "digits", "--json", tmp_path / "eval.json")
    assert code == 0, text
    assert "precision@10" in text and "pca-3" in text
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["sq_error"] > 0
    code, text = cli("export", out, "--repo", tmp_path / "models", "--name", "tiny")
    assert code == 0, text
    bundle = tmp_path / "models" / "tiny" / "1"
    assert text.strip().splitlines()[-1] == str(bundle) and "export: encoder graph" in text  # path last; progress before
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["model"]["sq_error"] > 0  # the evaluation travels with the bundle
    code, text = cli("evaluate", bundle)
    assert code == 0, text


def test_iwae_and_warm_up_from_the_command_line(tmp_path, cli):
    code, text = cli("train", "--data", "digits", "--model", "vae", "--latent-dim", "2", "--hidden", "16", "--epochs", "2",
                     "--iw-samples", "4", "--kl-warmup-steps", "20", "--binarize", "--out", tmp_path / "iw")
    assert code == 0, text
    rows = [json.loads(line) for line in (tmp_path / "iw" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["val_neg_elbo"] > 0 for r in rows)
    code, text = cli("train", "--data", "digits", "--model", "ae", "--latent-dim", "2", "--iw-samples", "4",
                     "--out", tmp_path / "bad")
    assert code == 2 and "--iw-samples: the importance-weighted bound is for --model vae" in text


def test_evaluate_options_and_a_time_limited_run_that_resumes(tmp_path, cli):
    out = tmp_path / "run"
    code, text = cli("train", "--data", "digits", "--model", "vae", "--latent-dim", "3", "--hidden", "32",
                     "--epochs", "40", "--time-limit", "0.0001", "--out", out)
    assert code == 0 and "time limit" in text, text
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) < 40, "stopped early"
    code, text = cli("train", "--data", "digits", "--model", "vae", "--latent-dim", "3", "--hidden", "32",
                     "--epochs", "3", "--resume", "--out", out)
    assert code == 0, text
    code, text = cli("evaluate", out, "--baselines", "none", "--queries", "50", "--k", "5", "--json", tmp_path / "e.json")
    assert code == 0, text
    report = json.loads((tmp_path / "e.json").read_text())
    assert "pca" not in report and "raw" not in report and report["model"]["mAP_queries"] == 50
    assert "cross-entropies" in text, "a Bernoulli decoder on grey levels is not called a likelihood"
    code, text = cli("evaluate", out, "--baselines", "pca,pixels")
    assert code == 2 and "--baselines: unknown pixels" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "mnist:/no/such/dir", "--latent-dim", "2", "--out", "{tmp}/r"], "does not exist"),
        (["train", "--data", "digits", "--latent-dim", "64", "--out", "{tmp}/r"], "--latent-dim: must be between 1 and 63"),
        (["train", "--data", "digits", "--model", "gan", "--latent-dim", "2", "--out", "{tmp}/r"], "'gan' is not one of"),
        (["train", "--data", "cifar", "--latent-dim", "2", "--out", "{tmp}/r"], "unknown data set 'cifar'"),
        (["train", "--data", "digits", "--hidden", "10,x", "--latent-dim", "2", "--out", "{tmp}/r"], "comma-separated layer sizes"),
        (["train", "--data", "texts:{tmp}/latin.txt", "--latent-dim", "2", "--out", "{tmp}/r"], "texts expects a folder"),
        (["evaluate", "{tmp}"], "neither a training run"),
        (["export", "{tmp}", "--name", "x", "--repo", "{tmp}/m"], "not a training run"),
        (["export", "{tmp}", "--name", "../x", "--repo", "{tmp}/m"], "not a valid model name"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message, cli):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    code, text = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, text
    assert message in text and "Traceback" not in text


def test_truncated_idx_and_non_utf8_and_corrupt_image(idx_dir, text_dir, image_dir, tmp_path, cli):
    f = idx_dir / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-1]))
    (text_dir / "food" / "x.txt").write_bytes(b"\xff\xfe")
    (image_dir / "dogs" / "0.jpg").write_bytes(b"\xff\xd8\xff broken")
    for spec, message in ((f"mnist:{idx_dir}", "truncated"), (f"texts:{text_dir}", "not valid UTF-8"),
                          (f"images:{image_dir}", "cannot decode image")):
        code, text = cli("train", "--data", spec, "--latent-dim", "2", "--out", tmp_path / "r")
        assert code == 2 and message in text and "Traceback" not in text, text


def test_bundle_with_a_wrong_hash(vae_bundle, tmp_path, cli):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(vae_bundle, copy)
    (copy / "encoder.onnx").write_bytes((copy / "encoder.onnx").read_bytes()[:-10])
    code, text = cli("evaluate", copy)
    assert code == 2 and "encoder.onnx has SHA-256" in text and "Traceback" not in text


def test_serve_options_keep_their_environment_names(cli, tmp_path, monkeypatch):
    """Deployments set options as ZSPACE_SERVE_<OPTION> (docker-compose.yml): the names must not drift."""
    monkeypatch.setenv("ZSPACE_SERVE_MAX_QUEUE", "0")
    code, out = cli("serve", "--models", tmp_path)
    assert code == 2 and "--max-queue" in out
    monkeypatch.delenv("ZSPACE_SERVE_MAX_QUEUE")
    monkeypatch.setenv("ZSPACE_SERVE_THREADS", "-1")
    code, out = cli("serve", "--models", tmp_path)
    assert code == 2 and "--threads" in out


def test_train_options_take_their_defaults_from_train_config():
    """One source for each training default: the command line and Python callers train the same model."""
    import dataclasses

    from zspace.app.cli import train
    from zspace.training.train import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in train.params:
        name = "model" if param.name == "kind" else param.name
        if name not in fields or name == "latent_dim":  # latent_dim: required on the command line
            continue
        default = param.default
        if name in ("hidden", "channels"):
            default = tuple(int(v) for v in default.split(","))
        if name == "model":
            default = default.replace("-", "_")
        assert default == fields[name], f"--{param.name.replace('_', '-')}: {default!r} vs TrainConfig.{name} {fields[name]!r}"
        checked += 1
    assert checked >= 25
    assert dataclasses.fields(TrainConfig) and TrainConfig.__dataclass_params__.frozen
