"""Data-parallel training (`zspace train --nproc N`): 2 CPU processes (gloo) against one, same global batch."""

from __future__ import annotations

import json

import pytest
import torch

ARGS = ["train", "--data", "digits", "--model", "ae", "--latent-dim", "3", "--hidden", "32,16", "--epochs", "3",
        "--batch-size", "64", "--seed", "3"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch_and_resume(tmp_path, cli):
    code, out = cli(*ARGS, "--out", tmp_path / "one")
    assert code == 0, out
    code, out = cli(*ARGS, "--nproc", "2", "--out", tmp_path / "two")
    assert code == 0, out
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [21, 42, 63], "the same global batches"
    # Stated tolerance: the same arithmetic but for the order of one sum (the gradient all-reduce): 1e-5 relative.
    for a, b in zip(one, two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    w1 = torch.load(tmp_path / "one" / "best.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2

    # Stopped after the first epoch (a time limit), resumed with two processes: the same run as uninterrupted.
    code, out = cli(*ARGS, "--nproc", "2", "--time-limit", "0.0001", "--out", tmp_path / "resumed")
    assert code == 0 and len(metrics(tmp_path / "resumed")) == 1, out
    code, out = cli(*ARGS, "--nproc", "2", "--resume", "--out", tmp_path / "resumed")
    assert code == 0, out
    resumed = metrics(tmp_path / "resumed")
    assert [r["val_loss"] for r in resumed] == pytest.approx([r["val_loss"] for r in two], rel=1e-5)


def test_a_vae_trains_on_two_processes_and_bad_uses_are_named(tmp_path, cli):
    code, out = cli("train", "--data", "digits", "--model", "vae", "--latent-dim", "2", "--hidden", "16", "--epochs", "2",
                    "--nproc", "2", "--out", tmp_path / "vae")
    assert code == 0, out
    assert all(r["val_loss"] < 1e6 for r in metrics(tmp_path / "vae"))
    code, out = cli("train", "--data", "digits", "--model", "pca", "--latent-dim", "2", "--nproc", "2", "--out", tmp_path / "p")
    assert code == 2 and "PCA is fitted in one step" in out
