"""Starting a function on several local processes joined in a gloo group: loopback only, a free port per
launch, a deadline on the whole run and a timeout on every collective, so a run fails instead of hanging.
Used by the data-parallel benchmark and the distributed tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["COLLECTIVE_TIMEOUT", "free_port", "init_gloo", "run_on_ranks"]

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join the gloo group of a launch on one thread (the processes share the machine's cores); every
    collective times out after :data:`COLLECTIVE_TIMEOUT`."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )


def run_on_ranks(worker: Callable[..., None], world_size: int, *args, deadline_s: float = 240.0) -> None:
    """Spawn ``worker(rank, world_size, port, *args)`` on ``world_size`` processes and wait for all of them;
    raise if one fails or the deadline passes (the processes are then killed). ``worker`` must be a
    module-level function (the processes are spawned, not forked)."""
    context = mp.start_processes(
        worker, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.0, end - time.monotonic())):
        if time.monotonic() >= end:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes did not finish within {deadline_s} s")
