"""What every benchmark shares: shapes, the gradient, named cases, the one timer, and the table printer.

A benchmark module lists its rows as :class:`Case` objects; ``galore-kernels bench``'s tables time them
with :func:`seconds_per_call`, and bench/'s pytest-benchmark rows time the same objects with
pytest-benchmark, its timer set to :func:`synchronized_clock` and its rounds to the table's
:class:`Timing`, so that both report the same median of the same calls.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TextIO

import torch

# (m, n, rank): a Llama-7B-like attention slice, a 1B-like MLP slice, and a wide 8B-like shape, scaled
# to what a 2-core CPU measures in seconds.
REFRESH_SHAPES = [(1024, 2816, 128), (2048, 2048, 256), (2048, 5632, 256)]
STEP_SHAPES = [(1024, 1024, 128), (1024, 2816, 128), (2816, 1024, 128), (2048, 5632, 256)]
# One tiny case for --smoke runs: they check that a benchmark works; their times mean nothing.
SMOKE_SHAPES = [(96, 160, 16)]


@dataclass(frozen=True)
class Timing:
    """How one case is timed: ``warmup`` untimed calls, then ``batches`` batches of ``calls`` back-to-back
    calls, the median per call reported.

    The warm-up takes what only the first calls pay: an optimizer's first step (state creation and the
    initial projector), the allocator, LAPACK workspace, Triton compilation.

    >>> Timing(batches=3)
    Timing(warmup=1, calls=1, batches=3)
    """

    warmup: int = 1
    calls: int = 1
    batches: int = 5


@dataclass(frozen=True)
class ShapeSweep:
    """A shape-sweeping table's run (refresh, step): the (m, n, rank) cases, and timed repeats of each, one
    call at a time after one warm-up call.

    >>> ShapeSweep(tuple(SMOKE_SHAPES), repeats=2).timing
    Timing(warmup=1, calls=1, batches=2)
    """

    shapes: tuple[tuple[int, int, int], ...]
    repeats: int

    @property
    def timing(self) -> Timing:
        """Single calls: a refresh or an optimizer step on these shapes takes milliseconds to seconds on a
        CPU, long beside a clock read."""
        return Timing(warmup=1, calls=1, batches=self.repeats)


class Case(NamedTuple):
    """One row of a benchmark, as a table and a pytest-benchmark row both time it.

    ``prepare(gradient)`` builds what the row needs around ``gradient`` (weights, an optimizer, its state)
    on the gradient's device and in its dtype, and returns one call to time; it raises ImportError when
    the row's comparator is not installed. Preparing on demand lets pytest collect the cases on a machine
    without the device, and a table hold one row's tensors at a time.
    """

    group: str  # the rows compared side by side: one shape, rank (and dtype)
    name: str  # the row
    prepare: Callable[[torch.Tensor], Callable[[], object]]
    flops: float = 0.0  # per call; 0: not counted
    traffic: float = 0.0  # bytes read and written per call; 0: not counted


def synchronized_clock() -> float:
    """``time.perf_counter()`` once the GPU has finished the work queued on it (when this process uses
    CUDA; a CPU has no queue), so that a clock read after a call counts the call's device work.

    This is the clock of every benchmark: :func:`seconds_per_call` and bench/'s pytest-benchmark rows.

    >>> synchronized_clock() <= synchronized_clock()
    True
    """
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def warm_up(call: Callable[[], object], timing: Timing) -> None:
    """``timing.warmup`` untimed calls of ``call``."""
    for _ in range(timing.warmup):
        call()


def seconds_per_call(call: Callable[[], object], timing: Timing) -> float:
    """Median seconds per call of ``call`` over ``timing``'s batches, after its warm-up calls.

    A batch's calls run back to back between two clock reads, so on a GPU the host's launch overhead
    overlaps device work as it does in training, and one synchronization is spread over the batch; the
    median over batches drops outliers.

    >>> calls = []
    >>> seconds_per_call(lambda: calls.append(1), Timing(warmup=2, calls=3, batches=4)) >= 0, len(calls)
    (True, 14)
    """
    warm_up(call, timing)
    per_call = []
    for _ in range(timing.batches):
        start = synchronized_clock()
        for _ in range(timing.calls):
            call()
        per_call.append((synchronized_clock() - start) / timing.calls)
    return statistics.median(per_call)


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
