"""Keep freed memory in the process instead of handing it back to the kernel at once.

glibc's malloc serves big blocks (a 256-row request is 800 KB, and gRPC,
protobuf and numpy each hold a copy) from fresh pages and trims its heap
after every large free. A server that receives such requests all day then
pays the kernel to map and zero the same megabytes again and again, which
can cost as much system time as gRPC's own work for the request. Raising the thresholds makes the heap keep (at most
`keep_mb`) freed memory for the next request.

Settings a user gives through glibc's own environment variables
(MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_) win: we
then leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
ENV_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def libc_function(name: str):
    """A function of the C library by name, or None where there is no such library or function."""
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path), name) if path else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory(keep_mb: int = 256) -> bool:
    """Tune glibc malloc for a long-running server; False where it does not apply (not glibc, or set by env)."""
    if any(name in os.environ for name in ENV_SETTINGS):
        return False
    mallopt = libc_function("mallopt")  # musl and others have none
    if mallopt is None:
        return False
    keep = keep_mb << 20
    # Blocks up to 32 MiB come from the heap (glibc's ceiling for this threshold on 64-bit),
    # and the heap is trimmed only when more than `keep` bytes lie free at its top.
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, keep) == 1
    ok &= mallopt(M_TOP_PAD, 16 << 20) == 1
    return bool(ok)


def release_freed_memory() -> bool:
    """Hand the free pages of every malloc heap back to the kernel now (glibc's malloc_trim); False where
    there is no such call. Costs milliseconds: for after a burst, not for every request."""
    malloc_trim = libc_function("malloc_trim")
    return malloc_trim is not None and malloc_trim(0) == 1


PILLOW_BLOCK_BYTES = 64 << 20  # above malloc's mmap threshold (32 MiB, keep_freed_memory)


def decoded_images_outside_the_heap() -> None:
    """Make Pillow allocate big images in blocks that malloc maps and unmaps on its own.

    Pillow holds a decoded image in blocks of 16 MiB; under keep_freed_memory's 32 MiB mmap
    threshold those come from the thread's malloc heap and stay there after the image is
    freed, a few hundred MB per decoding thread after one big image. Blocks of 64 MiB are
    mapped and given back the moment the image is freed, at the same peak
    (benchmarks/README.md, "Red-team run, round 3", has the figures). Small images are
    unaffected: a block is never bigger than the image."""
    from PIL import Image

    Image.core.set_block_size(PILLOW_BLOCK_BYTES)
