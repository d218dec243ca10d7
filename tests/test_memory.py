"""glibc malloc tuning for the server process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from zspace.memory import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_keeps_freed_memory_unless_the_user_set_glibc_variables(monkeypatch):
    # In a child process: mallopt changes the whole process, not just this test.
    code = "from zspace.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"MALLOC_TRIM_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": ":".join(sys.path)})
    assert env_out.stdout.strip() == "False"


def test_keep_freed_memory_leaves_malloc_alone_when_told(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
