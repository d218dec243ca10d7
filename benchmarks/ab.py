"""Two servers side by side: this checkout's `zspace serve` against another checkout's, in alternating rounds.

    git worktree add /tmp/before <commit>
    python -m benchmarks.ab --other /tmp/before --other-module zspace.cli --models models [--rounds 5]

Each round starts one server, loads it with `--clients` concurrent 1-row Encodes
of the quickstart's digits model for `--seconds`, stops it, then does the same
with the other: the servers take turns, so a slow spell of the shared machine
lands on both. The figure is the ratio of the mean rates (this / other). It
measures per-request overhead, which is what 1-row requests at high concurrency
are made of. The other checkout runs from its own folder (its packages shadow
the installed ones), with this environment's Python and libraries.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import ROOT, ServerChild, free_port
from benchmarks.serve import encode_load


def server(checkout: Path, module: str, models: Path) -> ServerChild:
    port = free_port()
    args = [sys.executable, "-m", module, "serve", "--models", str(models), "--port", str(port), "--metrics-port", "0",
            "--poll-s", "0"]
    return ServerChild(args, port, cwd=checkout).wait_listening()


@click.command()
@click.option("--other", type=click.Path(exists=True, file_okay=False), required=True, help="The other checkout.")
@click.option("--other-module", default="zspace.app.cli", help="Its CLI module (before 2026-11-30: zspace.cli).")
@click.option("--models", type=click.Path(exists=True, file_okay=False), default="models", help="Model repository.")
@click.option("--model", default="digits", help="Model to encode with.")
@click.option("--rounds", default=5, help="Rounds; each runs both servers once.")
@click.option("--clients", default=64, help="Concurrent Encodes.")
@click.option("--rows", default=1, help="Rows per Encode.")
@click.option("--seconds", default=4.0, help="Load per server per round.")
def main(other, other_module, models, model, rounds, clients, rows, seconds):
    from zspace.bundle import load_bundle, resolve_bundle

    dim = load_bundle(resolve_bundle(Path(models) / model)).input_dim
    rates = {"this": [], "other": []}
    for r in range(rounds):
        for side, checkout, module in (("other", Path(other).resolve(), other_module), ("this", ROOT, "zspace.app.cli")):
            child = server(checkout, module, Path(models).resolve())
            time.sleep(1)
            got = asyncio.run(encode_load(child.target, np.zeros((rows, dim), np.float32), clients, seconds, 10**6, model))
            child.stop()
            rates[side].append(got["req_s"])
            print(f"round {r + 1} {side:<5} {got['req_s']:8.0f} req/s  p50 {got['p50_ms']:.1f} ms  p99 {got['p99_ms']:.1f} ms",
                  flush=True)
    this, that = float(np.mean(rates["this"])), float(np.mean(rates["other"]))
    print(f"this {this:.0f} req/s, other {that:.0f} req/s: ratio {this / that:.3f}")


if __name__ == "__main__":
    main()
