"""The multi-process tests' common steps: run a module's worker on every process, read back the results
each process saved as ``rank{R}.pt``, and set the environment torchrun would give a Trainer worker."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from galore_kernels.distributed.launch import run_on_ranks


def run_and_load(worker: Callable[..., None], world_size: int, out_dir: Path, *args, deadline_s: float = 240.0) -> list:
    """``worker(rank, world_size, port, str(out_dir), *args)`` on ``world_size`` processes, then every
    process's ``rank{R}.pt`` from ``out_dir``, in rank order."""
    run_on_ranks(worker, world_size, str(out_dir), *args, deadline_s=deadline_s)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def run_on_gpus_and_load(worker: Callable[..., None], world_size: int, out_dir: Path) -> list:
    """:func:`run_and_load` with ``"cuda"`` as the worker's last argument: one GPU per process over NCCL;
    skips the test with fewer GPUs."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs (NCCL, one per process), {torch.cuda.device_count()} visible")
    return run_and_load(worker, world_size, out_dir, "cuda")


def set_torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """The variables torchrun sets, which Trainer (accelerate) reads to join the process group."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
