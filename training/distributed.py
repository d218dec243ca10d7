"""Data-parallel training: `zspace train ... --nproc N`, or under torchrun.

N processes on this machine, one rank each, joined by torch.distributed (gloo on
the CPU, nccl on CUDA, one GPU per rank). Every rank runs train.train with its
rank: the same model (DistributedDataParallel broadcasts rank 0's weights), the
same global batches, each rank its slice of each batch, gradients averaged by
DDP, noise seeded per rank; rank 0 alone validates and writes the run folder, so
a data-parallel run folder is an ordinary one (export, evaluate and --resume
work on it, with any --nproc).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

from zspace.errors import UserError
from zspace.training.train import TrainConfig, resolve_device, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(cfg: TrainConfig) -> str:
    return "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"


def _rank_main(rank: int, world: int, init: str, cfg: TrainConfig, out: Path, resume: bool, quiet: bool,
               time_limit_s: float | None, spawned: bool = True) -> None:
    import torch.distributed as dist

    # The cores are shared out among the ranks (gloo's all-reduce needs a core of its own too).
    cfg = replace(cfg, threads=cfg.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(_backend(cfg), init_method=init, rank=rank, world_size=world)
    code = 0
    try:
        train(cfg, out, resume=resume, quiet=quiet, time_limit_s=time_limit_s, rank=rank, world=world)
        dist.barrier()  # every rank done communicating before any tears the group down
    except UserError as exc:
        if rank == 0:
            print(f"Error: {exc}", file=sys.stderr, flush=True)
        code = 2
    finally:
        dist.destroy_process_group()
    if spawned:
        # Leave without running interpreter-exit destructors: gloo's threads, torn down there, once in a
        # few runs ended a finished rank with "terminate called without an active exception".
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def train_parallel(cfg: TrainConfig, out: Path, nproc: int, resume: bool = False, quiet: bool = False,
                   time_limit_s: float | None = None) -> Path:
    """Train with `nproc` processes on this machine (see the module doc); the run folder, as train() returns it."""
    import torch
    import torch.multiprocessing as mp

    if nproc < 1:
        raise UserError(f"--nproc: expected a positive number, got {nproc}")
    if cfg.model == "pca":
        raise UserError("--nproc: PCA is fitted in one step; train it with --nproc 1")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: one GPU per process, and torch sees {torch.cuda.device_count()}")
    init = f"tcp://127.0.0.1:{_free_port()}"
    try:
        mp.start_processes(_rank_main, args=(nproc, init, cfg, Path(out), resume, quiet, time_limit_s), nprocs=nproc,
                           start_method="spawn", join=True)
    except mp.ProcessExitedException as exc:
        if exc.exit_code == 2:
            raise UserError("--nproc: training stopped (the message above says why)") from None
        raise
    return Path(out)


def train_under_torchrun(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False,
                         time_limit_s: float | None = None) -> Path:
    """`torchrun --nproc-per-node N -m zspace.app.cli train ...`: the rank and world come from torchrun's environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _rank_main(rank, world, "env://", cfg, Path(out), resume, quiet, time_limit_s, spawned=False)
    return Path(out)
