"""The native CPU library's 8-bit step against torch's fp32 AdamW, bitsandbytes' CPU AdamW8bit and the
reference 8-bit step, side by side in one run (median of ``--repeats`` steps after one warm-up step).

    python bench/bench_native.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit, native_available


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


if __name__ == "__main__":
    main()
