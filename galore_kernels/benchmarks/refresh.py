"""Projector refresh: exact SVD vs randomized, time and captured top-r energy. One table.

``galore-kernels bench --only refresh [--repeats N]``. Gradients with σ_i ∝ i^-0.5 (a slowly decaying,
hard spectrum); randomized with the defaults p = 8, q = 2, Ω drawn as ``backend="auto"`` draws it (the
native library on the CPU where it is built). Times are medians of ``repeats`` calls after one warm-up;
the energy is ‖B·G'‖² of the randomized projector over that of the exact one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple, TextIO

import torch

from .. import native
from ..projector import compute_projector, oriented, resolve_side
from .harness import REFRESH_SHAPES, SMOKE_SHAPES, Case, ShapeSweep, power_law_gradient, seconds_per_call, stream_table

TITLE = "Refresh: exact vs randomized"


SIZES = {
    "full": ShapeSweep(tuple(REFRESH_SHAPES), repeats=3),
    "quick": ShapeSweep(tuple(REFRESH_SHAPES[:1]), repeats=1),
    "smoke": ShapeSweep(tuple(SMOKE_SHAPES), repeats=1),
}


COLUMNS = ("shape", "rank", "exact ms", "randomized ms", "speed-up", "energy captured (randomized / exact)")


class Row(NamedTuple):
    m: int
    n: int
    rank: int
    exact_ms: float
    randomized_ms: float
    energy_ratio: float  # captured energy, randomized / exact


def _refresh(gradient: torch.Tensor, rank: int, method: str) -> Callable[[], torch.Tensor]:
    side = resolve_side("std", tuple(gradient.shape))
    return partial(compute_projector, gradient, rank, side, method=method, seed=1, sketch=native.gaussian_sketch)


def cases(m: int, n: int, rank: int) -> list[Case]:
    """The rows of one shape: the exact refresh, then the randomized one; each call returns the projector.

    >>> [(case.group, case.name) for case in cases(96, 160, 16)]
    [('refresh 96x160 r=16', 'exact'), ('refresh 96x160 r=16', 'randomized')]
    """
    group = f"refresh {m}x{n} r={rank}"
    return [Case(group, method, partial(_refresh, rank=rank, method=method)) for method in ("exact", "randomized")]


def captured_energy(projector: torch.Tensor, g_side: torch.Tensor) -> float:
    """‖B·G'‖², in fp64: the part of the oriented gradient's energy that the projector B keeps.

    >>> captured_energy(torch.eye(2, 3), torch.arange(9.0).reshape(3, 3))
    55.0
    """
    return (projector.double() @ g_side.double()).square().sum().item()


def measure(settings: ShapeSweep = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """One row per shape, yielded as it is measured."""
    for m, n, rank in settings.shapes:
        g = power_law_gradient(m, n, device=device)
        g_side = oriented(g, resolve_side("std", (m, n)))
        ms, energy = {}, {}
        for case in cases(m, n, rank):
            call = case.prepare(g)
            ms[case.name] = 1e3 * seconds_per_call(call, settings.timing)
            energy[case.name] = captured_energy(call(), g_side)
        yield Row(m, n, rank, ms["exact"], ms["randomized"], energy["randomized"] / energy["exact"])


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
    settings: ShapeSweep = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line and the table, each row printed as soon as ``rows`` yields it."""
    stream_table(COLUMNS, map(format_row, rows), device, file)
