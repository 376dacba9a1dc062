"""One optimizer step: our reference GaLoreAdamW vs galore-torch's, side by side. One table.

``galore-kernels bench --only step [--repeats N]``. fp32 weights, ``proj_type="std"``; ours with
``backend="torch"`` (the reference) and ``svd="randomized"``, galore-torch runs ``torch.linalg.svd``.
Steady-state steps (no refresh) and refresh steps are timed separately: medians of ``repeats`` steps
after the first (state creation and the initial refresh). Without galore-torch its columns say
"not installed".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple, TextIO

import torch

from ..optim import GaLoreAdamW
from .cases import SMOKE_SHAPES, STEP_SHAPES, median_seconds, power_law_gradient, stream_table
from .cases import ShapeSettings as Settings

TITLE = "Optimizer step: our reference vs galore-torch"
NOT_INSTALLED = "not installed"


SIZES = {
    "full": Settings(tuple(STEP_SHAPES), repeats=5),
    "quick": Settings(tuple(STEP_SHAPES[:3]), repeats=3),
    "smoke": Settings(tuple(SMOKE_SHAPES), repeats=1),
}


COLUMNS = ("shape", "rank", "step kind", "galore-torch ms", "ours (reference) ms", "galore-torch / ours")


class Row(NamedTuple):
    m: int
    n: int
    rank: int
    refresh: bool  # a step that recomputes the projector, else a steady one
    galore_torch_ms: float | None  # None: galore-torch is not installed
    ours_ms: float


def _galore_torch():
    """galore-torch's module, or None when it (or a dependency of it) cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import galore_torch
    except ImportError:
        return None
    return galore_torch


def _median_step_ms(cls, m: int, n: int, rank: int, refresh: bool, repeats: int, device, **kwargs) -> float:
    weight = torch.nn.Parameter(torch.randn(m, n, device=device))
    weight.grad = power_law_gradient(m, n, device=device)
    # gap=1 refreshes on every step; a large gap never refreshes after the first step.
    group = {"params": [weight], "rank": rank, "update_proj_gap": 1 if refresh else 10**9, "scale": 0.25,
             "proj_type": "std"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's AdamW deprecation
        opt = cls([group], lr=1e-3, **kwargs)
    # median_seconds' warm-up call is the first step: state creation and the initial refresh.
    return 1e3 * median_seconds(opt.step, repeats, device)


def measure(settings: Settings = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """Two rows per shape (steady, refresh), yielded as they are measured."""
    galore_torch = _galore_torch()
    for m, n, rank in settings.shapes:
        for refresh in (False, True):
            theirs = None
            if galore_torch is not None:
                theirs = _median_step_ms(galore_torch.GaLoreAdamW, m, n, rank, refresh, settings.repeats, device)
            ours = _median_step_ms(GaLoreAdamW, m, n, rank, refresh, settings.repeats, device, backend="torch")
            yield Row(m, n, rank, refresh, theirs, ours)


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
    settings: Settings = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line and the table, each row printed as soon as ``rows`` yields it."""
    stream_table(COLUMNS, map(format_row, rows), device, file)
