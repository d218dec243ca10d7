"""Writing files so that a crash or a concurrent reader never sees half of one.

Servers watch the model repository and index folders while training, export and
index builds write into them, and `kill -9` can strike at any moment. Every file
zspace writes in place goes through `write_atomic`: the reader finds the old
bytes or the new ones, and once it returns the new ones survive a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a new file) in `folder` durable: the directory entry is data too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Temp file beside `path`, fsync, rename over `path`, fsync the folder: all or nothing."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
