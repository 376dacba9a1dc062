"""GPU benchmark: the GaLore step and the projector refresh against the alternatives. Prints one table.

Run on a CUDA machine: python bench/bench_gpu.py [--quick]
``--smoke`` runs every row once on tiny shapes (CPU allowed, Triton under TRITON_INTERPRET=1): a check
that the script works, with times that mean nothing.

Step rows (one weight, steady state, no refresh): ours fused (Triton, 8-bit and fp32 moments, the
kernels alone and through optimizer.step), our reference on the GPU, a cuBLAS + elementwise hybrid
(torch.matmul, fp32 Adam in torch, torch.addmm_ doing the weight update in cuBLAS's epilogue),
galore-torch GaLoreAdamW and GaLoreAdamW8bit, bitsandbytes AdamW8bit and torch AdamW(fused=True) on the
full matrix. Columns: µs per call (median of 5 CUDA-event-timed batches of back-to-back calls), GB/s
and TFLOP/s from the bytes and FLOPs counted below, and the time as a multiple of the roofline floor
max(FLOPs/peak, bytes/bandwidth) of the fused 8-bit step (fp32-moment rows against the fp32-moment floor).
A comparator that is not installed (galore-torch, bitsandbytes) gets a row saying so. Rows print as they
are measured, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from cases import environment, power_law_gradient
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit, functional
from galore_kernels.projector import compute_projector, oriented, resolve_side
from galore_kernels.reference import AdamHyper, GaLoreConfig
from galore_kernels.state import init_state

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (2048, 5461)]
RANKS = [128, 256, 512, 1024]
# Dense peaks (tensor cores) and HBM bandwidth of the cards this targets, from NVIDIA's data sheets.
PEAKS = {  # name fragment: (bf16 FLOP/s, tf32 FLOP/s, bytes/s)
    "H200": (989e12, 494e12, 4.8e12),
    "H100": (989e12, 494e12, 3.35e12),
    "A100": (312e12, 156e12, 2.0e12),
}


def _timer(device: str, warmup: int, repeats: int) -> Callable[[Callable[[], object]], float]:
    def cuda_median_us(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        # Calls are queued back to back between two events, so the host's launch overhead overlaps GPU
        # work as it does in training; the median over batches drops outliers.
        batches = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            batches.append(start.elapsed_time(end) * 1e3 / repeats)
        return statistics.median(batches)

    def cpu_median_us(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    return cuda_median_us if device == "cuda" else cpu_median_us


def _peaks() -> tuple[float, float, float] | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def galore_traffic(m: int, n: int, r: int, weight_bytes: int, eight_bit: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of one fused GaLore step: two GEMMs of 2·r·m·n; G read, W read and written, B read
    twice, moments read and written (1 or 4 bytes each, two of them), N written and read once."""
    side = resolve_side("std", (m, n))
    d, k = (m, n) if side == "left" else (n, m)
    flops = 4.0 * r * m * n
    moment_bytes = 1 if eight_bit else 4
    traffic = 3 * m * n * weight_bytes + 2 * r * d * weight_bytes + 4 * r * k * moment_bytes + 2 * r * k * weight_bytes
    return flops, float(traffic)


def _one_param_optimizer(kind: str, w: torch.nn.Parameter, rank: int) -> torch.optim.Optimizer:
    group = {"params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    if kind == "ours-8bit":
        return GaLoreAdamW8bit([group], lr=1e-3, backend="triton")
    if kind == "ours-fp32":
        return GaLoreAdamW([group], lr=1e-3, backend="triton")
    if kind == "reference-8bit":
        return GaLoreAdamW8bit([group], lr=1e-3, backend="torch")
    if kind.startswith("galore-torch"):
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cls = galore_torch.GaLoreAdamW8bit if kind.endswith("8bit") else galore_torch.GaLoreAdamW
            return cls([group], lr=1e-3)
    if kind == "bnb-adamw8bit-full":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit([w], lr=1e-3)
    if kind == "torch-adamw-fused-full":
        return torch.optim.AdamW([w], lr=1e-3, fused=True)
    raise ValueError(kind)


def _hybrid_step(w: torch.Tensor, g: torch.Tensor, rank: int) -> Callable[[], None]:
    """cuBLAS for both GEMMs (the update inside addmm_'s epilogue), torch elementwise Adam in between."""
    m, n = w.shape
    side = resolve_side("std", (m, n))
    b = compute_projector(g, rank, side).to(w.dtype)
    k = n if side == "left" else m
    exp_avg = torch.zeros(rank, k, device=w.device)
    exp_avg_sq = torch.zeros(rank, k, device=w.device)
    hyper = AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0)

    def step() -> None:
        s = (b @ oriented(g, side)).float()
        exp_avg.lerp_(s, 1 - hyper.beta1)
        exp_avg_sq.mul_(hyper.beta2).addcmul_(s, s, value=1 - hyper.beta2)
        direction = (exp_avg / (exp_avg_sq.sqrt() + hyper.eps)).mul_(0.25).to(w.dtype)
        step_size = hyper.step_size(10)
        if side == "left":
            w.addmm_(b.T, direction, alpha=-step_size)
        else:
            w.addmm_(direction.T, b, alpha=-step_size)

    return step


def step_rows(device: str, shapes, ranks, dtypes, time_us) -> Iterator[str]:
    peaks = _peaks()
    for m, n in shapes:
        g32 = power_law_gradient(m, n, device=device)
        for rank in ranks:
            for dtype in dtypes:
                wb = torch.finfo(dtype).bits // 8
                g = g32.to(dtype)
                peak_flops = None if peaks is None else (peaks[0] if dtype != torch.float32 else peaks[1])
                prefix = f"| {m}×{n} | {rank} | {str(dtype)[6:]} |"

                def row(name: str, fn: Callable[[], object], flops: float, traffic: float) -> str:
                    us = time_us(fn)
                    gbs = traffic / us / 1e3
                    tflops = f"{flops / us / 1e6:.1f}" if flops else "n/a"
                    floor = "n/a"
                    if peaks is not None and flops:
                        floor_us = max(flops / peak_flops, traffic / peaks[2]) * 1e6
                        floor = f"{us / floor_us:.2f}× of {floor_us:,.0f} µs"
                    return f"{prefix} {name} | {us:,.0f} | {gbs:,.0f} | {tflops} | {floor} |"

                # The fused kernels alone: state as GaLoreAdamW8bit keeps it, after one warm step.
                for eight_bit in (True, False):
                    w = torch.randn(m, n, device=device, dtype=dtype)
                    state = init_state(w, {"rank": rank, "proj_type": "std"}, param_seed=0,
                                       min_8bit_size=4096 if eight_bit else None)
                    cfg = GaLoreConfig(rank, 10**9, 0.25, "std", "randomized", 8, 2)
                    hyper = AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0)
                    functional.galore_adamw_step(w, g, state, hyper, cfg, backend="triton")
                    flops, traffic = galore_traffic(m, n, rank, wb, eight_bit)
                    yield row(f"ours fused kernels ({'8-bit' if eight_bit else 'fp32'} moments)",
                              lambda: functional.galore_adamw_step(w, g, state, hyper, cfg, backend="triton"),
                              flops, traffic)
                flops8, traffic8 = galore_traffic(m, n, rank, wb, True)
                flops32, traffic32 = galore_traffic(m, n, rank, wb, False)
                for kind, flops, traffic in (
                    ("ours-8bit", flops8, traffic8), ("ours-fp32", flops32, traffic32),
                    ("reference-8bit", flops8, traffic8), ("galore-torch", flops32, traffic32),
                    ("galore-torch-8bit", flops8, traffic8),
                    ("bnb-adamw8bit-full", 0.0, float(m * n * (3 * wb + 4))),
                    ("torch-adamw-fused-full", 0.0, float(m * n * (3 * wb + 16))),
                ):
                    if device != "cuda" and kind in ("galore-torch-8bit", "bnb-adamw8bit-full", "torch-adamw-fused-full"):
                        continue  # CUDA-only implementations
                    label = {"ours-8bit": "ours GaLoreAdamW8bit.step()", "ours-fp32": "ours GaLoreAdamW.step()",
                             "reference-8bit": "our reference (torch) 8-bit"}.get(kind, kind)
                    w = torch.nn.Parameter(torch.randn(m, n, device=device, dtype=dtype))
                    w.grad = g
                    try:
                        opt = _one_param_optimizer(kind, w, rank)
                    except ImportError as missing:
                        yield f"{prefix} {label} | n/a ({missing.name} not installed) | | | |"
                        continue
                    opt.step()
                    yield row(label, opt.step, flops, traffic)
                w = torch.randn(m, n, device=device, dtype=dtype)
                yield row("hybrid cuBLAS + elementwise (fp32 moments)", _hybrid_step(w, g, rank), flops32, traffic32)


def refresh_rows(device: str, shapes, rank: int, time_us) -> Iterator[str]:
    """Each refresh timed (after one warm-up call) and scored by its captured top-r energy ÷ the exact
    top-r energy, which comes from the first full SVD's singular values."""
    from galore_kernels.kernels.sketch import gaussian_sketch

    for m, n in shapes:
        g = power_law_gradient(m, n, device=device)
        side = resolve_side("std", (m, n))
        g_side = oriented(g, side)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        exact = s[:rank].double().square().sum().item()
        del u, vh

        def row(name: str, fn: Callable[[], torch.Tensor]) -> str:
            us = time_us(fn)
            captured = (fn().double() @ g_side.double()).square().sum().item()
            return f"| {m}×{n} | {rank} | {name} | {us / 1e3:,.1f} | {captured / exact:.4f} |"

        yield row("ours randomized (Triton sketch)", lambda: compute_projector(g, rank, side, seed=1, sketch=gaussian_sketch))
        yield row("ours randomized (reference sketch)", lambda: compute_projector(g, rank, side, seed=1))
        for driver in ("gesvd", "gesvdj", "gesvda") if device == "cuda" else (None,):
            def svd(driver=driver) -> torch.Tensor:
                u, _, vh = torch.linalg.svd(g, full_matrices=False, driver=driver)
                return u[:, :rank].T if side == "left" else vh[:rank]
            yield row(f"torch.linalg.svd driver={driver}", svd)

        def lowrank() -> torch.Tensor:
            u, _, v = torch.svd_lowrank(g, q=rank + 8, niter=2)
            return u[:, :rank].T if side == "left" else v[:, :rank].T
        yield row("torch.svd_lowrank(q=r+8, niter=2)", lowrank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ranks 512 only (the issue's target rows)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script only")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        shapes, ranks, dtypes, refresh_shapes, refresh_rank = [(96, 160)], [16], [torch.bfloat16], [(96, 160)], 16
    else:
        if device != "cuda":
            raise SystemExit("bench_gpu.py needs a CUDA device (use --smoke to check the script on a CPU)")
        shapes, ranks, dtypes = SHAPES, ([512] if args.quick else RANKS), [torch.bfloat16, torch.float32]
        refresh_shapes, refresh_rank = [(4096, 11008), (2048, 5461)], 512
    print(environment())
    print("| shape | rank | weights | row | µs | GB/s | TFLOP/s | × roofline floor |")
    print("|---|---|---|---|---|---|---|---|")
    for line in step_rows(device, shapes, ranks, dtypes, _timer(device, warmup=5, repeats=20)):
        print(line, flush=True)
    print()
    print("| shape | rank | refresh | ms | energy (÷ exact top-r) |")
    print("|---|---|---|---|---|")
    for line in refresh_rows(device, refresh_shapes, refresh_rank, _timer(device, warmup=1, repeats=1)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
