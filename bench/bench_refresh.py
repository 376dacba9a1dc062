"""Projector refresh: exact SVD vs randomized, time and captured top-r energy. Prints one table.

Run: python bench/bench_refresh.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from cases import REFRESH_SHAPES, environment, power_law_gradient
from galore_kernels.projector import compute_projector, resolve_side


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator and LAPACK workspace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(environment())
    print("| shape | rank | exact ms | randomized ms | speed-up | energy captured (randomized / exact) |")
    print("|---|---|---|---|---|---|")
    for m, n, rank in REFRESH_SHAPES:
        g = power_law_gradient(m, n)
        side = resolve_side("std", (m, n))
        exact_ms = 1e3 * _median_seconds(lambda: compute_projector(g, rank, side, method="exact"), args.repeats)
        rand_ms = 1e3 * _median_seconds(lambda: compute_projector(g, rank, side, seed=1), args.repeats)
        oriented = g if side == "left" else g.T
        energy = {
            method: (compute_projector(g, rank, side, method=method, seed=1) @ oriented).double().square().sum().item()
            for method in ("exact", "randomized")
        }
        print(
            f"| {m}×{n} | {rank} | {exact_ms:.0f} | {rand_ms:.0f} | {exact_ms / rand_ms:.1f}× | "
            f"{energy['randomized'] / energy['exact']:.4f} |"
        )


if __name__ == "__main__":
    main()
