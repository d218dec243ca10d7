"""What an image's bytes say before anything is decoded: its size, and the PNG chunks decoding needs.

Pillow's `Image.open` reads a PNG's chunks up to the first pixels, decompressing every
zTXt and iTXt on the way: a small PNG full of compressed text takes a third of a second
to open (benchmarks/README.md, "Red-team run, round 3"), so a request of such images
held whatever thread opened them for seconds. The
size of a PNG is in its first chunk and a JPEG's in its frame header; both are read
here in microseconds, and the chunks that carry no pixels are dropped before Pillow
sees a PNG at all.
"""

from __future__ import annotations

import struct

from zspace.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# The chunks that decoding the pixels reads; text, colour profiles, timestamps and the rest only describe them.
PNG_PIXEL_CHUNKS = frozenset((b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"))
MAX_PNG_CHUNKS = 65_536     # a 64 MB PNG in 8 KB IDAT chunks has 8,000; more is a file made to cost time
MAX_JPEG_SEGMENTS = 4_096   # segments before the frame header; real files have a few dozen
# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC, which share the range).
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """(width, height) from a PNG's IHDR or a JPEG's frame header; UserError naming `what` otherwise."""
    if not data:
        raise UserError(f"{what}: empty image bytes")
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise UserError(f"{what}: cannot decode image (damaged PNG data: no IHDR chunk first)")
        return struct.unpack_from(">II", data, 16)
    if data.startswith(JPEG_SIGNATURE):
        return _jpeg_size(data, what)
    raise UserError(f"{what}: not a PNG or JPEG image")


def _jpeg_size(data: bytes, what: str) -> tuple[int, int]:
    pos, n = 2, len(data)
    for _ in range(MAX_JPEG_SEGMENTS):
        while pos < n and data[pos] == 0xFF:  # a marker, after any fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers with no segment
            continue
        if pos + 2 > n:
            break
        length = struct.unpack_from(">H", data, pos)[0]
        if marker in JPEG_SOF:
            if pos + 7 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image, or scan data before any frame header
            break
        pos += length
    else:
        raise UserError(f"{what}: more than {MAX_JPEG_SEGMENTS} JPEG segments before the frame header")
    raise UserError(f"{what}: cannot decode image (damaged JPEG data: no frame header)")


def png_pixel_chunks(data: bytes, what: str = "image") -> bytes:
    """A PNG with only the chunks its pixels need (PNG_PIXEL_CHUNKS), each kept byte for byte with its CRC.

    The pixels decode the same: Pillow applies no gamma or colour profile when it decodes.
    A damaged chunk structure is left for the decoder to report."""
    pos, n, kept = len(PNG_SIGNATURE), len(data), [PNG_SIGNATURE]
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 8 > n:
            break
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if kind in PNG_PIXEL_CHUNKS:
            kept.append(data[pos:end])
        if kind == b"IEND" or end > n:
            break
        pos = end
    else:
        raise UserError(f"{what}: more than {MAX_PNG_CHUNKS} PNG chunks")
    return b"".join(kept)
