"""Data parallel on 2 CPU processes: plain DDP against the low-rank communication hook. One table.

``galore-kernels bench --only data_parallel``. Two gloo processes on this machine, one thread each, train
the same stack of square linear layers (GaLoreAdamW8bit, rank r) with DistributedDataParallel, once
plain and once with :func:`galore_kernels.distributed.low_rank_hook`. Per mode: the median wall time of a
step between refreshes (forward, backward with its all-reduce, ``step()``) on rank 0, and the elements
all-reduced by a step between refreshes and by a refresh step (fp32: 4 bytes each). The refresh period is
longer than the run, so after step 0 no projector refreshes; step 0 is the refresh step and is not timed.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from .harness import stream_table, synchronized_clock

TITLE = "Data parallel on 2 CPU processes: plain DDP vs low-rank communication"
WORLD_SIZE = 2
MODES = ("plain DDP", "low-rank hook")


@dataclass(frozen=True)
class DataParallelRun:
    """The model both modes train (``layers`` × Linear(``width``, ``width``), GaLore ``rank``) and the
    number of timed steps after step 0."""

    layers: int = 8
    width: int = 1024
    rank: int = 128
    steps: int = 10


SIZES = {
    "full": DataParallelRun(),
    "quick": DataParallelRun(steps=4),
    "smoke": DataParallelRun(layers=2, width=64, rank=8, steps=2),
}
COLUMNS = ("mode", "median step ms", "elements all-reduced (between refreshes)", "MB per step", "refresh step")


class Row(NamedTuple):
    mode: str
    median_ms: float
    elements: int  # all-reduced by a step that refreshes nothing
    refresh_elements: int  # all-reduced by step 0, which refreshes every projector


def _train(mode: str, run: DataParallelRun) -> Row:
    from torch.nn.parallel import DistributedDataParallel

    from ..distributed import LowRankHookState, low_rank_hook
    from ..optim import GaLoreAdamW8bit

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(run.width, run.width, bias=False) for _ in range(run.layers)])
    ddp = DistributedDataParallel(model)
    opt = GaLoreAdamW8bit(
        [{"params": list(model.parameters()), "rank": run.rank, "update_proj_gap": 10**9}], lr=1e-4
    )
    counter = LowRankHookState(opt)
    if mode == "low-rank hook":
        ddp.register_comm_hook(counter, low_rank_hook)
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    elements, times = [], []
    for _ in range(1 + run.steps):
        counter.elements_reduced = 0
        start = synchronized_clock()
        ddp(torch.randn(64, run.width, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(synchronized_clock() - start)
        elements.append(counter.elements_reduced)
    # Plain DDP's own all-reduce is not counted by the hook: it sends every gradient element.
    everything = sum(p.numel() for p in model.parameters())
    if mode == "plain DDP":
        elements = [everything] * len(elements)
    return Row(mode, 1e3 * statistics.median(times[1:]), elements[1], elements[0])


def _worker(rank: int, world_size: int, port: int, run: DataParallelRun, out_dir: str) -> None:
    from ..distributed.launch import init_gloo

    init_gloo(rank, world_size, port)
    try:
        rows = [_train(mode, run) for mode in MODES]
        if rank == 0:
            torch.save([tuple(row) for row in rows], Path(out_dir) / "rows.pt")
    finally:
        torch.distributed.destroy_process_group()


def measure(settings: DataParallelRun = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """Both rows, after the 2-process run (gloo on the CPU whatever ``device`` says: NCCL is not wired yet)."""
    from ..distributed.launch import run_on_ranks

    with tempfile.TemporaryDirectory() as out_dir:
        run_on_ranks(_worker, WORLD_SIZE, settings, out_dir)
        rows = torch.load(Path(out_dir) / "rows.pt", weights_only=True)
    for row in rows:
        yield Row(*row)


def format_row(row: Row) -> str:
    """
    >>> format_row(Row("low-rank hook", 41.25, 1048576, 8388608))
    '| low-rank hook | 41.2 | 1,048,576 | 4.2 | 8,388,608 |'
    """
    return (
        f"| {row.mode} | {row.median_ms:.1f} | {row.elements:,} | {row.elements * 4 / 1e6:.1f} | "
        f"{row.refresh_elements:,} |"
    )


def print_table(
    rows: Iterable[Row],
    settings: DataParallelRun = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line, the configuration and the table."""
    s = settings
    configuration = (
        f"{WORLD_SIZE} processes (gloo, 127.0.0.1, 1 thread each); {s.layers} × Linear({s.width}, {s.width}) fp32, "
        f"GaLoreAdamW8bit r={s.rank}; batch 64 per process; median of {s.steps} steps after step 0"
    )
    stream_table(COLUMNS, map(format_row, rows), "cpu", file, preamble=(configuration,))
