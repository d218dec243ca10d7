"""A folder of 64x64 images to measure image models on when no photo set is at hand.

    python -m benchmarks.shapes --out benchmarks/results/shapes64 --per-class 1000

Three classes (circle, square, triangle): one shape per image, of random size,
position, rotation (triangles) and colour, on a random dark background with a
little pixel noise. Seeded, so every machine draws the same images. Written as
PNG files in class subfolders, the layout `images:DIR` reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np

CLASSES = ("circle", "square", "triangle")


def draw(kind: str, rng: np.random.Generator, size: int = 64):
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.12, 0.3) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if kind == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        turn = rng.uniform(0, 2 * math.pi)
        pen.polygon([(cx + r * math.cos(turn + k * 2 * math.pi / 3), cy + r * math.sin(turn + k * 2 * math.pi / 3))
                     for k in range(3)], fill=colour)
    pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_shapes(out: Path, per_class: int, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(kind, rng, size).save(out / kind / f"{i:05d}.png")
    return out


@click.command()
@click.option("--out", default="benchmarks/results/shapes64", help="Folder to write (class subfolders).")
@click.option("--per-class", default=1000, help="Images per class.")
@click.option("--seed", default=0, help="Seed of the drawing.")
def main(out, per_class, seed):
    path = write_shapes(Path(out), per_class, seed)
    print(f"wrote {per_class * len(CLASSES)} images of 64x64 to {path}")


if __name__ == "__main__":
    main()
