"""Projector refresh: exact SVD vs randomized, time and captured top-r energy. One table.

``galore-kernels bench --only refresh [--repeats N]``. Gradients with σ_i ∝ i^-0.5 (a slowly decaying,
hard spectrum); randomized with the defaults p = 8, q = 2. Times are medians of ``repeats`` calls after
one warm-up; the energy is ‖B·G'‖² of the randomized projector over that of the exact one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, TextIO

import torch

from ..projector import compute_projector, oriented, resolve_side
from .cases import REFRESH_SHAPES, SMOKE_SHAPES, median_seconds, power_law_gradient, stream_table
from .cases import ShapeSettings as Settings

TITLE = "Refresh: exact vs randomized"


SIZES = {
    "full": Settings(tuple(REFRESH_SHAPES), repeats=3),
    "quick": Settings(tuple(REFRESH_SHAPES[:1]), repeats=1),
    "smoke": Settings(tuple(SMOKE_SHAPES), repeats=1),
}


COLUMNS = ("shape", "rank", "exact ms", "randomized ms", "speed-up", "energy captured (randomized / exact)")


class Row(NamedTuple):
    m: int
    n: int
    rank: int
    exact_ms: float
    randomized_ms: float
    energy_ratio: float  # captured energy, randomized / exact


def measure(settings: Settings = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """One row per shape, yielded as it is measured."""
    for m, n, rank in settings.shapes:
        g = power_law_gradient(m, n, device=device)
        side = resolve_side("std", (m, n))
        exact_s = median_seconds(lambda: compute_projector(g, rank, side, method="exact"), settings.repeats, device)
        rand_s = median_seconds(lambda: compute_projector(g, rank, side, seed=1), settings.repeats, device)
        g_side = oriented(g, side)
        energy = {
            method: (compute_projector(g, rank, side, method=method, seed=1) @ g_side).double().square().sum().item()
            for method in ("exact", "randomized")
        }
        yield Row(m, n, rank, 1e3 * exact_s, 1e3 * rand_s, energy["randomized"] / energy["exact"])


def format_row(row: Row) -> str:
    """
    >>> format_row(Row(1024, 2816, 128, 638.2, 182.0, 0.99684))
    '| 1024×2816 | 128 | 638 | 182 | 3.5× | 0.9968 |'
    """
    return (
        f"| {row.m}×{row.n} | {row.rank} | {row.exact_ms:.0f} | {row.randomized_ms:.0f} | "
        f"{row.exact_ms / row.randomized_ms:.1f}× | {row.energy_ratio:.4f} |"
    )


def print_table(
    rows: Iterable[Row],
    settings: Settings = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line and the table, each row printed as soon as ``rows`` yields it."""
    stream_table(COLUMNS, map(format_row, rows), device, file)
