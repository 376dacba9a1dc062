"""The native CPU library against what it replaces, side by side in one run:

- its 8-bit step against torch's fp32 AdamW, bitsandbytes' CPU AdamW8bit and the reference 8-bit step
  (median of ``--repeats`` steps after one warm-up step, the optimizers stepping in turn);
- its Gaussians (the sketch's Ω) against the reference's;
- the randomized refresh with its Ω against the reference's Ω and ``torch.linalg.svd`` (σ_i ∝ i^-0.5,
  energy = captured / exact top-r energy; ``--big`` adds 4096×11008, r = 512, whose exact SVD takes
  about 35 s here).

    python bench/bench_native.py [--repeats 5] [--big]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit, native, native_available, rng
from galore_kernels import projector as proj
from galore_kernels.benchmarks.harness import power_law_gradient


def _interleaved_ms(makers: dict, shape: tuple[int, int], repeats: int) -> dict[str, float]:
    """Median step time of each optimizer, each on its own parameter, stepping in turn (order reversed
    every round) so that slow phases of the machine hit every row alike."""
    torch.manual_seed(0)
    grads = [torch.randn(*shape) for _ in range(2)]
    runs = {}
    for name, make in makers.items():
        param = torch.nn.Parameter(torch.randn(*shape) * 0.02)
        runs[name] = (param, make([param]))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(1 + repeats):  # round 0 warms up (state allocation, refresh)
        order = list(runs.items()) if round_ % 2 == 0 else list(reversed(runs.items()))
        for name, (param, optimizer) in order:
            param.grad = grads[round_ % 2]
            start = time.perf_counter()
            optimizer.step()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


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
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; median of {args.repeats} interleaved steps, ms")
    print("| step, 4096×4096 fp32 | ms |\n|---|---|")
    for name, ms in _interleaved_ms(rows, square, args.repeats).items():
        print(f"| {name} | {ms:.0f} |", flush=True)
    galore = {"rank": 256, "update_proj_gap": 10**6}
    galore_rows = {
        "GaLoreAdamW (fp32 moments)": lambda p: GaLoreAdamW([{"params": p, **galore}], lr=1e-3),
        "GaLoreAdamW8bit, reference": lambda p: GaLoreAdamW8bit([{"params": p, **galore}], lr=1e-3, backend="torch"),
        "GaLoreAdamW8bit, native": lambda p: GaLoreAdamW8bit([{"params": p, **galore}], lr=1e-3, backend="native"),
    }
    print("| GaLore step, 4096×11008, r = 256, no refresh | ms |\n|---|---|")
    for name, ms in _interleaved_ms(galore_rows, (4096, 11008), args.repeats).items():
        print(f"| {name} | {ms:.0f} |", flush=True)
    count = 5632 * 136  # Ω of 2048×5632 at r = 128 (w = 136)
    print(f"| Ω, {count:,} numbers | reference (int64 tensor arithmetic) ms | native ms |\n|---|---|---|")
    draws = (rng.randn_range, native.randn_range)
    omega = [_call_ms(lambda draw=draw: draw(1, 0, count), args.repeats) for draw in draws]
    print(f"| sketch of 2048×5632, r = 128 | {omega[0]:.1f} | {omega[1]:.1f} |", flush=True)
    print(
        "| refresh | exact SVD ms | randomized, reference Ω: ms, × exact, energy "
        "| randomized, native Ω: ms, × exact, energy |"
    )
    print("|---|---|---|---|")
    for m, n, r in [(2048, 5632, 128)] + ([(4096, 11008, 512)] if args.big else []):
        _refresh_row(m, n, r, args.repeats)


def _call_ms(call, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _refresh_row(m: int, n: int, r: int, repeats: int) -> None:
    g = power_law_gradient(m, n)
    side = proj.resolve_side("std", (m, n))
    start = time.perf_counter()
    singular_values = torch.linalg.svdvals(g)
    exact_ms = 1e3 * (time.perf_counter() - start)
    top = float((singular_values[:r] ** 2).sum())
    cells = []
    for sketch in (proj.gaussian_sketch, native.gaussian_sketch):
        ms = _call_ms(lambda sketch=sketch: proj.compute_projector(g, r, side, seed=1, sketch=sketch), repeats)
        b = proj.compute_projector(g, r, side, seed=1, sketch=sketch)
        energy = float(((b @ proj.oriented(g, side)) ** 2).sum()) / top
        cells.append(f"{ms:.0f}, {exact_ms / ms:.1f}×, {energy:.4f}")
    print(f"| {m}×{n}, r = {r} | {exact_ms:.0f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
