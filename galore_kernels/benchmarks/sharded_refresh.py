"""The refresh of a sharded gradient on 2 processes: the sketch through all-reduces against gathering G
to an owner, beside one process refreshing the whole G. One table.

``galore-kernels bench --only sharded_refresh``. Each shape is a gradient with a slowly decaying spectrum
(σ_i ∝ i^-0.5) sliced along the dimension its projection keeps, as ``kept_dim_placement_fn`` slices it.
Per method: the median wall time of one refresh on rank 0 (both processes start together), the bytes
each process hands to collectives (measured on the calls; the larger of the two processes), the largest
tensor any process creates during the refresh (a gather's owner holds the whole G), and the captured
energy ‖B·G'‖² relative to one process's randomized projector.
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

from .harness import stream_table, synchronized_clock

TITLE = "Sharded refresh on 2 processes: sketch through all-reduces vs gather to an owner"
WORLD_SIZE = 2
METHODS = ("one process", "sketch", "gather")


@dataclass(frozen=True)
class ShardedRefreshRun:
    """Gradient shapes (m, n) refreshed at ``rank``, each ``repeats`` times per method."""

    shapes: tuple[tuple[int, int], ...] = ((1024, 2816), (2048, 5632))
    rank: int = 128
    repeats: int = 3


SIZES = {
    "full": ShardedRefreshRun(),
    "quick": ShardedRefreshRun(shapes=((1024, 2816),), repeats=1),
    "smoke": ShardedRefreshRun(shapes=((64, 160),), rank=8, repeats=1),
}
COLUMNS = ("shape", "method", "median ms", "MB to collectives (busiest process)", "largest tensor MB", "energy")


class Row(NamedTuple):
    shape: str
    method: str
    median_ms: float
    collective_bytes: int
    largest_bytes: int
    energy: float


class _Watch(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor (bytes) an op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def _counting_collectives() -> tuple[list[int], list]:
    """Wrap torch.distributed's collectives to add each call's tensor bytes on this process to a list."""
    import torch.distributed as dist

    sent: list[int] = []
    originals = []

    def wrap(name: str, tensor_of):
        real = getattr(dist, name)

        def call(*args, **kwargs):
            sent.append(sum(t.numel() * t.element_size() for t in tensor_of(*args, **kwargs)))
            return real(*args, **kwargs)

        originals.append((name, real))
        setattr(dist, name, call)

    wrap("all_reduce", lambda tensor, **kw: [tensor])
    wrap("broadcast", lambda tensor, **kw: [tensor])
    wrap("all_gather", lambda parts, tensor, **kw: parts)
    wrap("gather", lambda tensor, parts=None, **kw: parts if parts else [tensor])
    return sent, originals


def _gradient(m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    return (u * torch.arange(1, min(m, n) + 1) ** -0.5) @ v.T


def _measure_shape(shape: tuple[int, int], run: ShardedRefreshRun) -> list[tuple]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ..config import GaLoreConfig
    from ..projector import compute_projector, oriented, resolve_side
    from ..sharded import ShardLayout, kept_matrix_dim
    from ..sharded.refresh import gathered_projector, sketched_projector

    g = _gradient(*shape)
    side = resolve_side("std", shape)
    config = GaLoreConfig(rank=run.rank)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    local = distribute_tensor(g, mesh, [Shard(kept_matrix_dim(side))])
    layout = ShardLayout.of(local)
    single = compute_projector(g, run.rank, side, seed=1)
    reference = (single @ oriented(g, side)).square().sum()
    refreshes = {
        "one process": lambda: compute_projector(g, run.rank, side, seed=1),
        "sketch": lambda: sketched_projector(local.to_local(), layout, side, config, seed=1),
        "gather": lambda: gathered_projector(local.to_local(), layout, side, config, seed=1, owner=0),
    }
    rows = []
    for method, refresh in refreshes.items():
        times = []
        for _ in range(run.repeats):
            dist.barrier()
            start = synchronized_clock()
            b = refresh()
            times.append(synchronized_clock() - start)
        sent, originals = _counting_collectives()
        try:
            with _Watch() as watch:
                refresh()
        finally:
            for name, real in originals:
                setattr(dist, name, real)
        measured = torch.tensor([sum(sent), watch.largest], dtype=torch.int64)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        energy = float((b @ oriented(g, side)).square().sum() / reference)
        rows.append((f"{shape[0]}×{shape[1]}", method, 1e3 * statistics.median(times), int(measured[0]),
                     int(measured[1]), energy))
    return rows


def _worker(rank: int, world_size: int, port: int, run: ShardedRefreshRun, out_dir: str) -> None:
    from ..distributed.launch import init_gloo

    init_gloo(rank, world_size, port)
    try:
        rows = [row for shape in run.shapes for row in _measure_shape(shape, run)]
        if rank == 0:
            torch.save(rows, Path(out_dir) / "rows.pt")
    finally:
        torch.distributed.destroy_process_group()


def measure(settings: ShardedRefreshRun = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """The rows of every shape and method, after the 2-process gloo run (the CPU, whatever ``device``)."""
    from ..distributed.launch import run_on_ranks

    with tempfile.TemporaryDirectory() as out_dir:
        run_on_ranks(_worker, WORLD_SIZE, settings, out_dir)
        rows = torch.load(Path(out_dir) / "rows.pt", weights_only=True)
    for row in rows:
        yield Row(*row)


def format_row(row: Row) -> str:
    """
    >>> format_row(Row("1024×2816", "sketch", 41.25, 2_000_000, 12_000_000, 0.999994))
    '| 1024×2816 | sketch | 41.2 | 2.00 | 12.00 | 0.99999 |'
    """
    return (
        f"| {row.shape} | {row.method} | {row.median_ms:.1f} | {row.collective_bytes / 1e6:.2f} | "
        f"{row.largest_bytes / 1e6:.2f} | {row.energy:.5f} |"
    )


def print_table(
    rows: Iterable[Row],
    settings: ShardedRefreshRun = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line, the configuration and the table."""
    configuration = (
        f"{WORLD_SIZE} processes (gloo, 127.0.0.1, 1 thread each); fp32 gradient sliced along the kept "
        f"dimension, r={settings.rank}, p=8, 2 power iterations; median of {settings.repeats}"
    )
    stream_table(COLUMNS, map(format_row, rows), "cpu", file or sys.stdout, preamble=(configuration,))
