"""Layer-wise mode: gradient memory and step time, plain vs layer-wise, aligned vs spread refreshes.

A stack of L square linear layers trains for a few T-step windows with accumulation over k backward
passes. For each mode the table gives the peak bytes of full gradients alive (in ``.grad`` or held by an
accumulation window, observed from every post-accumulate-grad hook), and the wall time of an optimizer
step (k forward/backward passes plus ``step()``): median, and the slowest step over the median — the
spike that refreshing every projector on one step causes, which ``refresh_schedule="spread"`` flattens.

Run: python bench/bench_layerwise.py [--layers 16] [--width 1024] [--rank 128] [--gap 8] [--k 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cases import environment
from galore_kernels import GaLoreAdamW8bit

MODES = {
    "plain": {},
    "layer-wise, aligned": {"layerwise": True, "refresh_schedule": "aligned"},
    "layer-wise, spread": {"layerwise": True, "refresh_schedule": "spread"},
}


def _measure(mode: dict, layers: int, width: int, rank: int, gap: int, k: int, steps: int) -> tuple[int, list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    holder: dict = {}
    peak = [0]

    def observe(_: torch.Tensor) -> None:  # runs before the optimizer's hook: the new gradient is still in .grad
        live = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        peak[0] = max(peak[0], live + holder["opt"].accumulation_bytes()[0])

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(observe)
    layerwise = mode.get("layerwise", False)
    holder["opt"] = opt = GaLoreAdamW8bit(
        [{"params": list(model.parameters()), "rank": rank, "update_proj_gap": gap}],
        lr=1e-4,
        accumulation_steps=k if layerwise else 1,
        **mode,
    )
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        if step == 1:
            peak[0] = 0  # step 0 refreshes every projector in every mode (there is none yet): not counted
        start = time.perf_counter()
        for _ in range(k):
            model(torch.randn(64, width, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return peak[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2, help="T-step windows to run after step 0")
    args = parser.parse_args()
    one = args.width * args.width * 4
    print(environment())
    print(
        f"{args.layers} × Linear({args.width}, {args.width}) fp32, GaLoreAdamW8bit r={args.rank} T={args.gap}, "
        f"accumulation k={args.k}; one full gradient = {one / 2**20:.1f} MiB; step 0 excluded"
    )
    print(f"{'mode':<22}{'peak full grads':>18}{'median step s':>15}{'slowest / median':>18}")
    for name, mode in MODES.items():
        peak, times = _measure(mode, args.layers, args.width, args.rank, args.gap, args.k, 1 + args.gap * args.windows)
        median = statistics.median(times)
        print(f"{name:<22}{peak / one:>12.1f} grads{median:>15.3f}{max(times) / median:>18.2f}")


if __name__ == "__main__":
    main()
