"""A newcomer's first hour, round 2: what a new user met on a fresh clone (tracebacks for their mistakes, a
filter the client did not take, a slow evaluation without warning, pictures of one class, paths that meant
nothing elsewhere), each checked here with real files, runs and servers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import train_run
from serving import digits_served

from zspace.index.contract import FilterError
from zspace.service.client import ZSpaceClient


def one_line_error(code: int, out: str, names: str) -> None:
    assert code == 2 and "Traceback" not in out and names in out, out[-2000:]
    assert len(out.strip().splitlines()) == 1, out


def test_a_text_query_on_an_image_index_names_the_option(deployment, cli):
    code, out = cli("index", "search", deployment / "indexes" / "digits", "--text", "a red summer dress", "-k", "3",
                    "--models", deployment / "models")
    one_line_error(code, out, "--text: this index holds codes of digits/1, a model of images; query it with --png")


def test_resume_takes_the_run_settings_and_refuses_a_conflicting_option_by_name(tmp_path, cli):
    out = tmp_path / "run"
    code, text = cli("train", "--model", "ae", "--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--batch-size", "64",
                     "--time-limit", "0.0001", "--out", out)
    assert code == 0, text
    code, text = cli("train", "--model", "ae", "--latent-dim", "3", "--resume", "--out", out)
    one_line_error(code, text, "--latent-dim 3: the run in")
    code, text = cli("train", "--data", "idx:/nowhere", "--resume", "--out", out)
    one_line_error(code, text, "--data idx:/nowhere: the run in")
    code, text = cli("train", "--resume", "--out", out)  # no --latent-dim, no --model: the run's own
    assert code == 0, text
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["latent_dim"] == 2 and info["config"]["model"] == "ae"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2, "the second epoch ran"


def test_evaluating_a_model_on_data_of_another_width_names_data(image_dir, tmp_path, cli):
    run = train_run(tmp_path / "photos", data=f"images:{image_dir}", model="ae", latent_dim=2, hidden=(8,), epochs=1,
                    arch="mlp")
    code, out = cli("evaluate", run, "--data", "digits")
    one_line_error(code, out, "--data: digits has 64 features a row")


def test_evaluating_a_model_folder_says_which_version_to_take(deployment, cli):
    code, out = cli("evaluate", deployment / "models" / "digits")
    one_line_error(code, out, "a model folder, not one of its versions; evaluate")
    assert str(deployment / "models" / "digits" / "1") in out


def test_the_python_client_takes_a_dict_filter(vae_bundle, tmp_path):
    with digits_served(vae_bundle, tmp_path) as s, ZSpaceClient(s.target) as c:
        hits = c.search("digits", vectors=np.zeros((2, 4), np.float32), k=3, where={"label": 3})
        assert [len(h) for h in hits] == [3, 3] and all(h.payload["label"] == "3" for row in hits for h in row)
        same = c.search("digits", vectors=np.zeros((2, 4), np.float32), k=3, where=("label", "3"))
        assert [[h.key for h in row] for row in same] == [[h.key for h in row] for row in hits]
        both = c.search("digits", vectors=np.zeros((1, 4), np.float32), k=3, where={"label": 3, "split": "test"})
        assert both[0] and all(h.payload["label"] == "3" and h.payload["split"] == "test" for h in both[0])
        with pytest.raises(FilterError, match="where: expected conditions"):
            c.search("digits", vectors=np.zeros((1, 4), np.float32), where=42)


def test_evaluate_says_what_the_slow_part_costs_and_defaults_to_a_small_k(vae_run, cli):
    from zspace.app.cli import evaluate

    assert next(p for p in evaluate.params if p.name == "k").default == 100
    code, out = cli("evaluate", vae_run, "--nll-examples", "8", "--baselines", "none")
    assert code == 0 and "IS-NLL, 100 importance samples x 8 rows" in out, out[-2000:]


def test_reconstructions_show_every_class():
    from zspace.training.plots import across_classes

    y = np.repeat(np.arange(4), 25)  # a folder read class by class: the first 25 rows are all class 0
    picked = across_classes(y, len(y), 16)
    assert len(picked) == 16 and set(y[picked]) == {0, 1, 2, 3}
    assert np.array_equal(picked, across_classes(y, len(y), 16)), "seeded"
    assert len(across_classes(None, 5, 16)) == 5


def test_client_encode_says_where_it_wrote(deployment, tmp_path, cli):
    with digits_served(deployment / "models" / "digits" / "1", tmp_path / "served") as s:
        x = tmp_path / "x.npy"
        np.save(x, np.zeros((2, 64), np.float32))
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            code, out = cli("client", "--target", s.target, "encode", "--model", "digits", "--npy", x)
        finally:
            os.chdir(cwd)
    assert code == 0 and f"wrote {tmp_path / 'codes.npy'}" in out, out


def test_index_payloads_store_the_source_as_an_absolute_path(image_dir, tmp_path):
    from zspace.index.build import build_index
    from zspace.training.export import export_run

    run = train_run(tmp_path / "photos", data=f"images:{image_dir}", model="ae", latent_dim=2, hidden=(8,), epochs=1,
                    arch="mlp")
    bundle = export_run(run, tmp_path / "models", "photos")
    cwd = os.getcwd()
    os.chdir(image_dir.parent)
    try:
        index = build_index(bundle, f"images:{image_dir.name}", tmp_path / "indexes" / "photos", quiet=True)
    finally:
        os.chdir(cwd)
    try:
        hit = index.search(np.zeros((1, 2), np.float32), 1)[0][0]
        assert os.path.isabs(hit.payload["source"]) and os.path.isfile(hit.payload["source"]), hit.payload
    finally:
        index.close()


def test_training_prints_an_estimate_after_the_first_epoch(tmp_path, cli):
    code, out = cli("train", "--model", "ae", "--latent-dim", "2", "--hidden", "16", "--epochs", "3", "--batch-size", "64",
                    "--out", tmp_path / "run")
    assert code == 0 and "more minutes for the other 2 epochs at this pace" in out, out[-2000:]
