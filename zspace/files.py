"""Writing files so that a crash or a concurrent reader never sees half of one.

Servers watch the model repository and index folders while training, export and
index builds write into them, and `kill -9` can strike at any moment. Every file
zspace writes in place goes through `write_atomic`: the reader finds the old
bytes or the new ones, and once it returns the new ones survive a power cut.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zspace.errors import UserError

# The process's umask, read once at import: reading it means setting it, and setting it while other
# threads create files would give theirs the wrong mode.
UMASK = os.umask(0o022)
os.umask(UMASK)


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a new file) in `folder` durable: the directory entry is data too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | memoryview) -> Path:
    """Temp file beside `path`, fsync, rename over `path`, fsync the folder: all or nothing.

    data: bytes, text, or any buffer (a numpy array's bytes are written without a copy)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # A temp name of its own (mkstemp): two processes writing the same file (a server's workers) must
    # never write into one temp file. mkstemp makes it 0600; the file gets the mode open() would give.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside `final` to fill; renamed into place when the block succeeds, removed when it fails.

    A watcher of the parent folder (the server's rescans) sees the finished folder
    or nothing, never a half-written one, and a failure leaves nothing to clean up.
    Watchers skip hidden names, which is why the staging folder's starts with a dot.
    """
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"{final}: already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it 0700: a server running as another user could not read it
    try:
        yield tmp
        os.rename(tmp, final)  # over an empty folder too (POSIX rename), never over a non-empty one
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when the block or the rename failed


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of a file, None when there is none: the same path may come to name another file
    (a folder replaced by `rm -rf X; mv .X.new X`), and this tells the two apart."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
