"""Benchmark inputs, timing, and the environment line every table starts with."""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

import torch

# (m, n, rank): a Llama-7B-like attention slice, a 1B-like MLP slice, and a wide 8B-like shape, scaled
# to what a 2-core CPU measures in seconds.
REFRESH_SHAPES = [(1024, 2816, 128), (2048, 2048, 256), (2048, 5632, 256)]
STEP_SHAPES = [(1024, 1024, 128), (1024, 2816, 128), (2816, 1024, 128), (2048, 5632, 256)]
# One tiny case for --smoke runs: they check that a benchmark works; their times mean nothing.
SMOKE_SHAPES = [(96, 160, 16)]


@dataclass(frozen=True)
class ShapeSettings:
    """What a shape-sweeping benchmark measures: (m, n, rank) cases, and timed repeats of each.

    >>> ShapeSettings(tuple(SMOKE_SHAPES), repeats=1).shapes
    ((96, 160, 16),)
    """

    shapes: tuple[tuple[int, int, int], ...]
    repeats: int


def stream_table(
    columns: Sequence[str],
    lines: Iterable[str],
    device: str | torch.device,
    file: TextIO | None = None,
    preamble: Sequence[str] = (),
) -> None:
    """The environment line, ``preamble``, a markdown header of ``columns``, then each row line as soon as
    ``lines`` yields it (a run cut short keeps what it measured)."""
    file = file or sys.stdout
    print(environment(device), *preamble, sep="\n", file=file)
    print("| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", sep="\n", file=file)
    for line in lines:
        print(line, file=file, flush=True)


def power_law_gradient(
    m: int, n: int, seed: int = 0, exponent: float = -0.5, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A gradient-like fp32 matrix with singular values σ_i ∝ i^exponent (slow decay: a hard case).

    The random factors are drawn on the CPU (the same numbers on every machine) and orthonormalized on
    ``device``.

    >>> s = torch.linalg.svdvals(power_law_gradient(20, 30))
    >>> bool(torch.allclose(s[:3], torch.tensor([1, 2, 3]) ** -0.5, atol=1e-5))
    True
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen).to(device)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen).to(device)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32, device=device) ** exponent
    return (u * sigma) @ v.T


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a host clock sees it (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed warm-up call (allocator, LAPACK
    workspace, kernel compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment(device: str | torch.device | None = None) -> str:
    """Date, device and versions, for the header of every table. ``device`` defaults to CUDA if available.

    >>> environment("cpu").count(" | ")
    2
    """
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} {platform.processor() or platform.machine()}"
    return (
        f"{datetime.date.today().isoformat()} | {name}, {torch.get_num_threads()} threads | "
        f"galore_kernels {version('galore_kernels')}, torch {torch.__version__}, triton {version('triton')}, "
        f"galore-torch {version('galore-torch')}, bitsandbytes {version('bitsandbytes')}, "
        f"transformers {version('transformers')}, python {platform.python_version()}"
    )
