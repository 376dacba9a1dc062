"""One optimizer step: our reference GaLoreAdamW vs galore-torch's, side by side. One table.

``galore-kernels bench --only step [--repeats N]``. fp32 weights, ``proj_type="std"``; ours with
``backend="torch"`` (the reference) and ``svd="randomized"``, galore-torch runs ``torch.linalg.svd``.
Steady-state steps (no refresh) and refresh steps are timed separately: medians of ``repeats`` steps
after the first (state creation and the initial refresh). Without galore-torch its columns say
"not installed".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple, TextIO

import torch

from ..config import GaLoreConfig
from ..optim import GaLoreAdamW
from .harness import SMOKE_SHAPES, STEP_SHAPES, Case, ShapeSweep, power_law_gradient, seconds_per_call, stream_table

TITLE = "Optimizer step: our reference vs galore-torch"
NOT_INSTALLED = "not installed"


SIZES = {
    "full": ShapeSweep(tuple(STEP_SHAPES), repeats=5),
    "quick": ShapeSweep(tuple(STEP_SHAPES[:3]), repeats=3),
    "smoke": ShapeSweep(tuple(SMOKE_SHAPES), repeats=1),
}


COLUMNS = ("shape", "rank", "step kind", "galore-torch ms", "ours (reference) ms", "galore-torch / ours")


class Row(NamedTuple):
    m: int
    n: int
    rank: int
    refresh: bool  # a step that recomputes the projector, else a steady one
    galore_torch_ms: float | None  # None: galore-torch is not installed
    ours_ms: float


def _step(gradient: torch.Tensor, rank: int, refresh: bool, optimizer: str) -> Callable[[], object]:
    """``optimizer.step`` on one fp32 weight whose gradient is ``gradient``; ImportError without galore-torch."""
    weight = torch.nn.Parameter(torch.randn(gradient.shape, device=gradient.device))
    weight.grad = gradient
    # gap=1 refreshes on every step; a large gap never refreshes after the first step (the warm-up call).
    group = {"params": [weight], "rank": rank, "update_proj_gap": 1 if refresh else 10**9,
             "scale": GaLoreConfig.scale, "proj_type": "std"}
    if optimizer == "ours":
        return GaLoreAdamW([group], lr=1e-3, backend="torch").step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's AdamW deprecation, and its dependencies' imports
        import galore_torch

        return galore_torch.GaLoreAdamW([group], lr=1e-3).step


def cases(m: int, n: int, rank: int, refresh: bool) -> list[Case]:
    """The rows of one shape and step kind: galore-torch, then ours; each call is one ``step()``.

    >>> [(case.group, case.name) for case in cases(96, 160, 16, refresh=False)]
    [('steady step 96x160 r=16', 'galore-torch'), ('steady step 96x160 r=16', 'ours')]
    """
    group = f"{'refresh' if refresh else 'steady'} step {m}x{n} r={rank}"
    return [
        Case(group, optimizer, partial(_step, rank=rank, refresh=refresh, optimizer=optimizer))
        for optimizer in ("galore-torch", "ours")
    ]


def measure(settings: ShapeSweep = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """Two rows per shape (steady, refresh), yielded as they are measured."""
    for m, n, rank in settings.shapes:
        g = power_law_gradient(m, n, device=device)
        for refresh in (False, True):
            ms: dict[str, float | None] = {}
            for case in cases(m, n, rank, refresh):
                try:
                    call = case.prepare(g)
                except ImportError:
                    ms[case.name] = None
                    continue
                ms[case.name] = 1e3 * seconds_per_call(call, settings.timing)
            yield Row(m, n, rank, refresh, ms["galore-torch"], ms["ours"])


def format_row(row: Row) -> str:
    """
    >>> format_row(Row(1024, 1024, 128, True, 152.44, 61.6))
    '| 1024×1024 | 128 | refresh | 152.4 | 61.6 | 2.47× |'
    >>> format_row(Row(1024, 1024, 128, False, None, 2.4))
    '| 1024×1024 | 128 | steady | not installed | 2.4 | not installed |'
    """
    kind = "refresh" if row.refresh else "steady"
    if row.galore_torch_ms is None:
        theirs = ratio = NOT_INSTALLED
    else:
        theirs, ratio = f"{row.galore_torch_ms:.1f}", f"{row.galore_torch_ms / row.ours_ms:.2f}×"
    return f"| {row.m}×{row.n} | {row.rank} | {kind} | {theirs} | {row.ours_ms:.1f} | {ratio} |"


def print_table(
    rows: Iterable[Row],
    settings: ShapeSweep = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line and the table, each row printed as soon as ``rows`` yields it."""
    stream_table(COLUMNS, map(format_row, rows), device, file)
