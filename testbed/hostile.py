"""Inputs built to cost a server: huge images, images whose text chunks cost time to open."""

from __future__ import annotations

import numpy as np


def big_png(side: int = 6000) -> bytes:
    """A PNG of side x side pixels (36 megapixels by default) of a smooth pattern: 1 MB on the wire,
    a few hundred milliseconds to decode."""
    import io

    from PIL import Image

    a = np.add.outer(np.arange(side) % 256, np.arange(side) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([a, a.T, a // 2], -1)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def text_chunk_png(chunks: int = 63, side: int = 64) -> bytes:
    """A small PNG (about 66 KB) carrying `chunks` zlib-compressed text chunks of a megabyte each: Pillow
    decompresses every one when it opens the file (about 0.3 s), though not one pixel depends on them."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"note{i}", "x" * 1_000_000, zip=True)
    buf = io.BytesIO()
    pixels = (np.random.default_rng(0).random((side, side)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()
