"""Data parallel on 2 processes: plain DDP, the low-rank communication hook and layer-wise data parallel.
One table.

``galore-kernels bench --only data_parallel``. Two processes train the same stack of square linear layers
(GaLoreAdamW8bit, rank r): with DistributedDataParallel, once plain and once with
:func:`galore_kernels.distributed.low_rank_hook`, and layer-wise (``layerwise=True``) with
:class:`galore_kernels.distributed.LayerwiseDataParallel` and no DDP. Per mode: the median wall time of a
step between refreshes (forward, backward with its all-reduce, ``step()``) on rank 0, and the elements
all-reduced by a step between refreshes and by a refresh step (fp32: 4 bytes each; layer-wise adds one
presence element per parameter). The refresh period is longer than the run, so after step 0 no projector
refreshes; step 0 is the refresh step and is not timed.

On a CPU (the default) the processes join a gloo group over 127.0.0.1, one thread each. With a CUDA device
they join an NCCL group, one GPU per process (``torch.cuda.set_device(rank)``), which needs 2 GPUs: NCCL
does not run 2 ranks on one GPU reliably (collectives between two ranks sharing a device can hang), so
with fewer the table says so and is skipped.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from .harness import environment, stream_table, synchronized_clock

TITLE = "Data parallel on 2 processes: plain DDP vs low-rank communication vs layer-wise"
WORLD_SIZE = 2
MODES = ("plain DDP", "low-rank hook", "layer-wise")


@dataclass(frozen=True)
class DataParallelRun:
    """The model every mode trains (``layers`` × Linear(``width``, ``width``), GaLore ``rank``) and the
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


def _train(mode: str, run: DataParallelRun, device: torch.device) -> Row:
    from torch.nn.parallel import DistributedDataParallel

    from ..distributed import LayerwiseDataParallel, LowRankHookState, low_rank_hook
    from ..optim import GaLoreAdamW8bit

    torch.manual_seed(0)
    layers = [torch.nn.Linear(run.width, run.width, bias=False) for _ in range(run.layers)]
    model = torch.nn.Sequential(*layers).to(device)
    opt = GaLoreAdamW8bit(
        [{"params": list(model.parameters()), "rank": run.rank, "update_proj_gap": 10**9}], lr=1e-4,
        layerwise=mode == "layer-wise",
    )
    if mode == "layer-wise":  # no DDP: each weight's window is all-reduced inside backward, then it steps
        forward, counter = model, LayerwiseDataParallel(opt)
    else:
        forward = DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device.index])
        counter = LowRankHookState(opt)
        if mode == "low-rank hook":
            forward.register_comm_hook(counter, low_rank_hook)
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    elements, times = [], []
    for _ in range(1 + run.steps):
        counter.elements_reduced = 0
        start = synchronized_clock()
        forward(torch.randn(64, run.width, generator=gen).to(device)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(synchronized_clock() - start)
        elements.append(counter.elements_reduced)
    # Plain DDP's own all-reduce is not counted by the hook: it sends every gradient element.
    everything = sum(p.numel() for p in model.parameters())
    if mode == "plain DDP":
        elements = [everything] * len(elements)
    return Row(mode, 1e3 * statistics.median(times[1:]), elements[1], elements[0])


def _worker(rank: int, world_size: int, port: int, run: DataParallelRun, out_dir: str, device_type: str) -> None:
    from ..distributed.launch import init_gloo, init_nccl

    if device_type == "cuda":
        device = init_nccl(rank, world_size, port)
    else:
        init_gloo(rank, world_size, port)
        device = torch.device("cpu")
    try:
        rows = [_train(mode, run, device) for mode in MODES]
        if rank == 0:
            torch.save([tuple(row) for row in rows], Path(out_dir) / "rows.pt")
    finally:
        torch.distributed.destroy_process_group()


def missing_gpus(device: str | torch.device) -> str | None:
    """Why the run cannot happen on ``device`` here (a CUDA run with fewer than 2 GPUs), or None."""
    if torch.device(device).type != "cuda" or torch.cuda.device_count() >= WORLD_SIZE:
        return None
    return (
        f"skipped: the CUDA run needs {WORLD_SIZE} GPUs (NCCL, one GPU per process; NCCL does not run "
        f"{WORLD_SIZE} ranks on one GPU reliably), {torch.cuda.device_count()} visible"
    )


def measure(settings: DataParallelRun = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """The rows of every mode, after the 2-process run: gloo on the CPU, NCCL on 2 GPUs for a CUDA
    ``device``; none where :func:`missing_gpus` says why not."""
    from ..distributed.launch import run_on_ranks

    if missing_gpus(device):
        return
    with tempfile.TemporaryDirectory() as out_dir:
        run_on_ranks(_worker, WORLD_SIZE, settings, out_dir, torch.device(device).type)
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
    """The environment line, the configuration and the table; on a CUDA device with fewer than 2 GPUs,
    the environment line and why the table is skipped."""
    s = settings
    skipped = missing_gpus(device)
    if skipped:
        print(environment(device), skipped, sep="\n", file=file or sys.stdout)
        return
    processes = "NCCL, one GPU each" if torch.device(device).type == "cuda" else "gloo, 127.0.0.1, 1 thread each"
    configuration = (
        f"{WORLD_SIZE} processes ({processes}); {s.layers} × Linear({s.width}, {s.width}) fp32, "
        f"GaLoreAdamW8bit r={s.rank}; batch 64 per process; median of {s.steps} steps after step 0"
    )
    stream_table(COLUMNS, map(format_row, rows), device, file, preamble=(configuration,))
