"""Starting a function on several local processes joined in a gloo group: loopback only, a free port per
launch, a deadline on the whole run and a timeout on every collective, so a run fails instead of hanging.
Used by the data-parallel benchmark, the distributed tests and ``galore-kernels train --nproc``
(:func:`run_on_ranks_watched`: progress relayed while it runs). :func:`init_nccl` joins an NCCL group
instead, one GPU per process, for the benchmark's CUDA run."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["COLLECTIVE_TIMEOUT", "free_port", "init_gloo", "init_nccl", "run_on_ranks", "run_on_ranks_watched"]

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
    module-level function (the processes are spawned, not forked). A worker that returned leaves through
    :func:`_exit_after`, so whatever it wrote to files must be closed by then (``torch.save`` closes)."""
    context = mp.start_processes(
        _exit_after, args=(worker, world_size, free_port(), *args), nprocs=world_size, join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.0, end - time.monotonic())):
        if time.monotonic() >= end:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes did not finish within {deadline_s} s")


def _exit_after(rank: int, worker: Callable[..., None], *args) -> None:
    """Run ``worker(rank, *args)``; once it has returned, destroy the process groups and end the process
    without interpreter finalization. Gloo's worker threads can still hold finished work whose tensors
    are freed during finalization, and the process then aborts (SIGABRT, "terminate called without an
    active exception") after everything succeeded: seen once in a CI run of the data-parallel benchmark,
    on a worker that had destroyed its process group. An exception still propagates to torch as usual."""
    worker(rank, *args)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_nccl(rank: int, world_size: int, port: int) -> torch.device:
    """Join the NCCL group of a launch with GPU ``rank`` as this process's device, and return it; every
    collective times out after :data:`COLLECTIVE_TIMEOUT`. One GPU per process: NCCL does not run two ranks
    on one GPU reliably (its collectives between them can hang), so this needs ``world_size`` GPUs."""
    if torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"NCCL with {world_size} processes needs {world_size} GPUs, {torch.cuda.device_count()} visible"
        )
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT, device_id=device,
    )
    return device


def run_on_ranks_watched(
    worker: Callable[..., None],
    world_size: int,
    *args,
    watch: Callable[[], None],
    interval_s: float = 0.2,
    deadline_s: float | None = None,
) -> None:
    """:func:`run_on_ranks` for a run of any length that reports as it goes: ``watch()`` is called about
    every ``interval_s`` while the processes run and once after they end (to relay their progress, e.g.
    from a queue in ``args``); no deadline unless ``deadline_s`` is given (every collective still times out).
    A process that fails raises ``RuntimeError("process I: <its exception's last line>")``, chained to
    torch's exception with the full traceback. Whatever ends the wait (a failure, the deadline, Ctrl-C, an
    exception from ``watch``), no process outlives it."""
    context = mp.start_processes(
        worker, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    end = math.inf if deadline_s is None else time.monotonic() + deadline_s
    try:
        while True:
            try:
                done = context.join(timeout=max(0.0, min(interval_s, end - time.monotonic())))
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # torch stopped the others
                last_line = str(error).strip().splitlines()[-1]
                raise RuntimeError(f"process {error.error_index}: {last_line}") from error
            watch()
            if done:
                return
            if time.monotonic() >= end:
                raise TimeoutError(f"{world_size} processes did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
