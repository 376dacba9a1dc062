"""The native CPU library against what it replaces, side by side in one run: its 8-bit step against
torch's fp32 AdamW, bitsandbytes' CPU AdamW8bit and the reference 8-bit step (median of ``--repeats``
steps after one warm-up step), and the randomized refresh with its Ω against the reference's Ω and
``torch.linalg.svd`` (σ_i ∝ i^-0.5, energy = captured / exact top-r energy; ``--big`` adds 4096×11008,
r = 512, whose exact SVD takes about 35 s here).

    python bench/bench_native.py [--repeats 5] [--big]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit, native, native_available
from galore_kernels import projector as proj
from galore_kernels.benchmarks.harness import power_law_gradient


def _median_ms(make_optimizer, shape: tuple[int, int], repeats: int) -> float:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(*shape) * 0.02)
    optimizer = make_optimizer([param])
    times = []
    for _ in range(1 + repeats):
        param.grad = torch.randn(*shape)
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big", action="store_true", help="also refresh 4096×11008 at r = 512")
    args = parser.parse_args()
    if not native_available():
        raise SystemExit("the native library is not loaded (see galore_kernels.native)")
    square = (4096, 4096)
    rows = {
        "torch AdamW fp32": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "ours 8-bit AdamW, reference": lambda p: GaLoreAdamW8bit(p, lr=1e-3, backend="torch"),
        "ours 8-bit AdamW, native": lambda p: GaLoreAdamW8bit(p, lr=1e-3, backend="native"),
    }
    try:
        import bitsandbytes as bnb

        rows["bitsandbytes AdamW8bit (CPU)"] = lambda p: bnb.optim.AdamW8bit(p, lr=1e-3)
    except ImportError:
        pass
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} steps, ms")
    print("| step, 4096×4096 fp32 | ms |\n|---|---|")
    for name, make in rows.items():
        print(f"| {name} | {_median_ms(make, square, args.repeats):.0f} |", flush=True)
    galore = {"rank": 256, "update_proj_gap": 10**6}
    rect = (4096, 11008)
    print("| GaLore step, 4096×11008, r = 256, no refresh | ms |\n|---|---|")
    for name, cls, backend in (
        ("GaLoreAdamW (fp32 moments)", GaLoreAdamW, "torch"),
        ("GaLoreAdamW8bit, reference", GaLoreAdamW8bit, "torch"),
        ("GaLoreAdamW8bit, native", GaLoreAdamW8bit, "native"),
    ):
        ms = _median_ms(lambda p: cls([{"params": p, **galore}], lr=1e-3, backend=backend), rect, args.repeats)
        print(f"| {name} | {ms:.0f} |", flush=True)
    print("| refresh | exact SVD ms | randomized, reference Ω: ms, × exact, energy | randomized, native Ω: ms, × exact, energy |")
    print("|---|---|---|---|")
    for m, n, r in [(2048, 5632, 128)] + ([(4096, 11008, 512)] if args.big else []):
        _refresh_row(m, n, r, args.repeats)


def _refresh_row(m: int, n: int, r: int, repeats: int) -> None:
    g = power_law_gradient(m, n)
    side = proj.resolve_side("std", (m, n))
    start = time.perf_counter()
    singular_values = torch.linalg.svdvals(g)
    exact_ms = 1e3 * (time.perf_counter() - start)
    top = float((singular_values[:r] ** 2).sum())
    cells = []
    for sketch in (proj.gaussian_sketch, native.gaussian_sketch):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            b = proj.compute_projector(g, r, side, seed=1, sketch=sketch)
            times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times)
        energy = float(((b @ proj.oriented(g, side)) ** 2).sum()) / top
        cells.append(f"{ms:.0f}, {exact_ms / ms:.1f}×, {energy:.4f}")
    print(f"| {m}×{n}, r = {r} | {exact_ms:.0f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
