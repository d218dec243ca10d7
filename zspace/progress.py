"""A minimal progress line for long loops (training epochs, encoding, benchmarks).

On a terminal it redraws one line; in logs (CI, pipes) it prints one line when
the task finishes, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, total: int, label: str, stream=None, every_s: float = 0.2):
        self.total, self.label = max(int(total), 1), label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s, self.done, self.t0, self.last = every_s, 0, time.monotonic(), 0.0

    def line(self, note: str = "") -> str:
        elapsed = time.monotonic() - self.t0
        frac = self.done / self.total
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * 20)
        return f"{self.label} [{bar:<20}] {self.done}/{self.total} {elapsed:.0f}s<{eta:.0f}s {note}".rstrip()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and (now - self.last >= self.every_s or self.done >= self.total):
            self.stream.write("\r" + self.line(note) + "\033[K")
            self.stream.flush()
            self.last = now

    def close(self, note: str = "") -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(note) + ("\033[K\n" if self.tty else "\n"))
        self.stream.flush()


@contextmanager
def stage(label: str, enabled: bool = True, stream=None):
    """One line per step of a long job that has no natural counter (export, evaluation): what ran and how long.

        with stage("export: encoder graph"):
            ...
    prints `export: encoder graph ... 4.2s` when the block ends (and `... failed` if it raised)."""
    if not enabled:
        yield
        return
    stream = stream or sys.stderr
    t0 = time.monotonic()
    try:
        yield
    except BaseException:
        stream.write(f"{label} ... failed after {time.monotonic() - t0:.1f}s\n")
        stream.flush()
        raise
    stream.write(f"{label} ... {time.monotonic() - t0:.1f}s\n")
    stream.flush()
