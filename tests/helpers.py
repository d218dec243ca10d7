"""Plain helpers the tests share (fixtures live in conftest.py, which tests never import)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write an IDX file (uint8) the way the MNIST files are laid out."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


TOPICS = {
    "space": "orbit rocket launch nasa shuttle moon planet satellite astronaut mission",
    "cars": "engine wheel brake tire dealer sedan mileage transmission motor drive",
    "food": "recipe bake flour oven sugar butter dinner kitchen taste spice",
}


def make_docs(n_per_topic: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for i in range(n_per_topic):
            text = " ".join(rng.choice(vocab, size=12)) + " and the of it"
            docs.append({"id": f"{label}-{i}", "text": text, "label": label})
    return docs


def train_run(out: Path, stop_after: int | None = None, **overrides) -> Path:
    from zspace.training.train import TrainConfig, train

    cfg = dict(data="digits", model="ae", latent_dim=4, hidden=(32, 16), epochs=2, batch_size=64, seed=0, threads=2)
    cfg.update(overrides)
    return train(TrainConfig(**cfg), out, quiet=True, stop_after=stop_after)
