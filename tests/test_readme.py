"""Every shell and Python block of the README runs as printed, in order, against a quickstart's workdir.

A block the test cannot run (it installs packages, needs a container engine or
trains for tens of minutes) says so in an HTML comment right above it:
`<!-- not run by tests/test_readme.py: REASON -->`. The files the README names
as the user's own (photos/, docs.jsonl, a.png, b.png, query.png, batch.npy) are
made here; the server the client blocks talk to is started here, and its
addresses replace the README's 127.0.0.1:50051 (gRPC) and 127.0.0.1:8000 (HTTP).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_docs
from serving import start_thread

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "not run by tests/test_readme.py:"
BLOCK = re.compile(r"(?:<!-- (?P<mark>[^\n]*?) -->\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M)


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, body, skip reason) of every fenced block."""
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        mark = m.group("mark")
        reason = mark[len(SKIP):].strip() if mark and mark.startswith(SKIP) else None
        out.append((text[: m.start("body")].count("\n"), m.group("lang"), m.group("body"), reason))
    return out


RUNNABLE = [b for b in readme_blocks() if b[1] in ("bash", "python")]


def test_every_skipped_block_says_why_and_most_blocks_run():
    skipped = [b for b in RUNNABLE if b[3] is not None]
    assert all(reason for *_, reason in skipped), "a skipped block must give its reason"
    assert len(RUNNABLE) - len(skipped) >= 5, "the README's runnable blocks went missing"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A quickstart's workdir (short training), the user's own files, and the quickstart's server on a free port."""
    from PIL import Image

    from zspace.data import load_dataset
    from zspace.transforms import ImageTransform

    work = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["zspace", "quickstart", "--workdir", str(work), "--epochs", "3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()  # a short table of where everything is; the JSON goes to a file
    assert len(summary) <= 30 and summary[-1].startswith("full summary")
    assert json.loads((work / "runs" / "quickstart-digits-vae" / "quickstart.json").read_text())["served"]["generated"] == 16
    assert "--epochs N" in done.stderr, "the quickstart says how long it takes and how to shorten it"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (work / "photos" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(work / "photos" / cls / f"{i}.png")
    (work / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in make_docs()) + "\n")
    digits, t = load_dataset("digits").x_test, ImageTransform((1, 8, 8))
    for name, row in (("a.png", 0), ("b.png", 1), ("query.png", 2)):
        (work / name).write_bytes(t.to_png(digits[row]))
    np.save(work / "batch.npy", digits[:4])
    with start_thread(work / "models", indexes=work / "indexes", http_port=0) as server:
        yield work, env, server.target, f"127.0.0.1:{server.server.http_port}"


@pytest.mark.parametrize("line, lang, body, reason", RUNNABLE, ids=[f"{b[1]}-line{b[0]}" for b in RUNNABLE])
def test_readme_block_runs_as_printed(workdir, line, lang, body, reason):
    if reason is not None:
        pytest.skip(reason)
    work, env, target, http_target = workdir
    body = body.replace("127.0.0.1:50051", target).replace("127.0.0.1:8000", http_target)
    cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README line {line}:\n{body}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}"
