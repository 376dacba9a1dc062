"""One optimizer step on CPU: our reference GaLoreAdamW vs galore-torch's, side by side. Prints one table.

Steady-state steps (no refresh) and refresh steps are timed separately: galore-torch runs a full
``torch.linalg.svd`` on every refresh, ours the randomized one.

Run: python bench/bench_step.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from cases import STEP_SHAPES, environment, power_law_gradient
from galore_kernels import GaLoreAdamW


def _optimizer(kind: str, weight: torch.nn.Parameter, rank: int, gap: int) -> torch.optim.Optimizer:
    group = {"params": [weight], "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    if kind == "galore-torch":
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return galore_torch.GaLoreAdamW([group], lr=1e-3)
    return GaLoreAdamW([group], lr=1e-3)


def _median_step_ms(kind: str, m: int, n: int, rank: int, refresh: bool, repeats: int) -> float:
    weight = torch.nn.Parameter(torch.randn(m, n))
    weight.grad = power_law_gradient(m, n)
    # gap=1 refreshes on every step; a large gap never refreshes after the first step.
    opt = _optimizer(kind, weight, rank, gap=1 if refresh else 10**9)
    opt.step()  # first step: state creation and the initial refresh
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(environment())
    print("| shape | rank | step kind | galore-torch ms | ours (reference) ms | galore-torch / ours |")
    print("|---|---|---|---|---|---|")
    for m, n, rank in STEP_SHAPES:
        for refresh in (False, True):
            theirs = _median_step_ms("galore-torch", m, n, rank, refresh, args.repeats)
            ours = _median_step_ms("ours", m, n, rank, refresh, args.repeats)
            kind = "refresh" if refresh else "steady"
            print(f"| {m}×{n} | {rank} | {kind} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}× |")


if __name__ == "__main__":
    main()
