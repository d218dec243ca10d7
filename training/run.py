"""The run folder: what one training run leaves behind, and the one place that reads and writes it.

  run.json        config, model config, data description, the fitted feature transform
  metrics.jsonl   one line per epoch (train and validation figures)
  last.pt         model + optimiser + schedule state, for --resume
  best.pt         the weights with the lowest validation loss (what export and evaluate use)
  *.png           loss curves, reconstructions, samples, latent map (plots.py)

Checkpoints are written atomically: a run killed mid-save keeps its previous
checkpoint, so --resume always finds a whole one.
"""

from __future__ import annotations

import io
import json
from dataclasses import fields
from pathlib import Path

import torch

from zspace.data import Dataset, load_dataset
from zspace.errors import UserError
from zspace.files import write_atomic
from zspace.training.models import ModelConfig, build_model
from zspace.transforms import transform_from_dict

RUN_INFO, METRICS, LAST, BEST = "run.json", "metrics.jsonl", "last.pt", "best.pt"


def write_run(run: Path, info: dict) -> None:
    write_atomic(Path(run) / RUN_INFO, json.dumps(info, indent=1))


def read_run(run: Path) -> dict:
    path = Path(run) / RUN_INFO
    if not path.is_file():
        raise UserError(f"{run}: not a training run (no {RUN_INFO})")
    return json.loads(path.read_text())


def load_run_data(run: Path, spec: str | None = None) -> Dataset:
    """The run's data set (or SPEC) through the run's own fitted transform."""
    info = read_run(run)
    return load_dataset(spec or info["config"]["data"], transform=transform_from_dict(info["transform"]))


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: the file is the old checkpoint or the new one, never half of each."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def load_model(run: Path, which: str = BEST):
    """(model, run info) from a run folder, on the CPU, in eval mode."""
    info = read_run(run)
    known = {f.name for f in fields(ModelConfig)}  # runs written by other versions may carry more keys
    given = {k: v for k, v in info["model"].items() if k in known}
    tuples = {k: tuple(given[k]) for k in ("hidden", "channels", "input_shape") if given.get(k) is not None}  # JSON lists
    mcfg = ModelConfig(**{**given, **tuples})
    model = build_model(mcfg)
    path = Path(run) / which
    if not path.is_file():
        raise UserError(f"{run}: no {which}; the run has not finished an epoch")
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.eval(), info


def append_metrics(run: Path, row: dict) -> None:
    """One epoch's figures, appended and flushed at once (a crash loses at most the epoch in progress)."""
    with open(Path(run) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
