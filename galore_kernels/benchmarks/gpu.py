"""GPU benchmark: the GaLore step and the projector refresh against the alternatives. Two tables.

``galore-kernels bench --device cuda [--quick]`` (``--quick``: rank 512 only, the issue's target rows).
``--smoke`` runs every row once on tiny shapes (a CPU too, Triton under TRITON_INTERPRET=1): a check that
the benchmark works, with times that mean nothing.

Step rows (one weight, steady state, no refresh): ours fused (Triton, 8-bit and fp32 moments, the
kernels alone and through optimizer.step), our reference on the GPU, a cuBLAS + elementwise hybrid
(torch.matmul, fp32 Adam in torch, torch.addmm_ doing the weight update in cuBLAS's epilogue),
galore-torch GaLoreAdamW and GaLoreAdamW8bit, bitsandbytes AdamW8bit and torch AdamW(fused=True) on the
full matrix. Columns: µs per call (median of ``repeats`` = 5 CUDA-event-timed batches of back-to-back
calls), GB/s and TFLOP/s from the bytes and FLOPs counted below, and the time as a multiple of the
roofline floor max(FLOPs/peak, bytes/bandwidth) of the fused 8-bit step (fp32-moment rows against the
fp32-moment floor). A comparator that is not installed (galore-torch, bitsandbytes) gets a row saying so.

Refresh rows: each refresh timed (after one warm-up call) and scored by its captured top-r energy ÷ the
exact top-r energy, which comes from the first full SVD's singular values.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TextIO

import torch

from .. import functional
from ..optim import GaLoreAdamW, GaLoreAdamW8bit
from ..projector import compute_projector, oriented, resolve_side
from ..reference import AdamHyper, GaLoreConfig
from ..state import init_state
from .cases import SMOKE_SHAPES, environment, power_law_gradient

TITLE = "GPU: fused step and refresh vs the alternatives"
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (2048, 5461))
RANKS = (128, 256, 512, 1024)
# Dense peaks (tensor cores) and HBM bandwidth of the cards this targets, from NVIDIA's data sheets.
PEAKS = {  # name fragment: (bf16 FLOP/s, tf32 FLOP/s, bytes/s)
    "H200": (989e12, 494e12, 4.8e12),
    "H100": (989e12, 494e12, 3.35e12),
    "A100": (312e12, 156e12, 2.0e12),
}
CUDA_ONLY = ("galore-torch-8bit", "bnb-adamw8bit-full", "torch-adamw-fused-full")


@dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    refresh_shapes: tuple[tuple[int, int], ...]
    refresh_rank: int
    repeats: int = 5  # CUDA-event-timed batches per row, the median reported
    step_calls: tuple[int, int] = (5, 20)  # step rows: (warm-up calls, calls per batch)
    refresh_calls: tuple[int, int] = (1, 1)  # refresh rows: the same


_SMOKE = tuple((m, n) for m, n, _ in SMOKE_SHAPES)
_FULL = Settings(SHAPES, RANKS, (torch.bfloat16, torch.float32), ((4096, 11008), (2048, 5461)), 512)
SIZES = {
    "full": _FULL,
    "quick": Settings(SHAPES, (512,), _FULL.dtypes, _FULL.refresh_shapes, 512),
    "smoke": Settings(_SMOKE, (16,), (torch.bfloat16,), _SMOKE, 16),
}


class StepRow(NamedTuple):
    m: int
    n: int
    rank: int
    dtype: torch.dtype
    name: str
    us: float | None  # None: the comparator is not installed
    flops: float  # 0: not counted (full-matrix optimizers)
    traffic: float  # bytes
    floor_us: float | None  # roofline floor; None where the card's peaks are unknown or FLOPs not counted
    missing: str | None = None  # the module that is not installed


class RefreshRow(NamedTuple):
    m: int
    n: int
    rank: int
    name: str
    ms: float
    energy: float  # captured top-r energy ÷ the exact top-r energy


def _timer(device: str, warmup: int, calls: int, batches: int) -> Callable[[Callable[[], object]], float]:
    def cuda_median_us(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        # Calls are queued back to back between two events, so the host's launch overhead overlaps GPU
        # work as it does in training; the median over batches drops outliers.
        times = []
        for _ in range(batches):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(times)

    def cpu_once_us(fn: Callable[[], object]) -> float:  # --smoke on a CPU: one warm call, one timed
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    return cuda_median_us if torch.device(device).type == "cuda" else cpu_once_us


def _peaks(device: str) -> tuple[float, float, float] | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def galore_traffic(m: int, n: int, r: int, weight_bytes: int, eight_bit: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of one fused GaLore step: two GEMMs of 2·r·m·n; G read, W read and written, B read
    twice, moments read and written (1 or 4 bytes each, two of them), N written and read once.

    >>> galore_traffic(4096, 11008, 512, 2, True)[0] / 1e9
    92.341796864
    """
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import galore_torch

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


def measure_steps(settings: Settings = SIZES["full"], device: str = "cuda") -> Iterator[StepRow]:
    """The step rows, yielded as they are measured."""
    peaks = _peaks(device)
    time_us = _timer(device, *settings.step_calls, settings.repeats)
    for m, n in settings.shapes:
        g32 = power_law_gradient(m, n, device=device)
        for rank in settings.ranks:
            for dtype in settings.dtypes:
                wb = torch.finfo(dtype).bits // 8
                g = g32.to(dtype)
                peak_flops = None if peaks is None else (peaks[0] if dtype != torch.float32 else peaks[1])

                def row(name: str, fn: Callable[[], object], flops: float, traffic: float) -> StepRow:
                    us = time_us(fn)
                    floor_us = None
                    if peaks is not None and flops:
                        floor_us = max(flops / peak_flops, traffic / peaks[2]) * 1e6
                    return StepRow(m, n, rank, dtype, name, us, flops, traffic, floor_us)

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
                    if torch.device(device).type != "cuda" and kind in CUDA_ONLY:
                        continue
                    label = {"ours-8bit": "ours GaLoreAdamW8bit.step()", "ours-fp32": "ours GaLoreAdamW.step()",
                             "reference-8bit": "our reference (torch) 8-bit"}.get(kind, kind)
                    w = torch.nn.Parameter(torch.randn(m, n, device=device, dtype=dtype))
                    w.grad = g
                    try:
                        opt = _one_param_optimizer(kind, w, rank)
                    except ImportError as missing:
                        yield StepRow(m, n, rank, dtype, label, None, flops, traffic, None, missing.name or kind)
                        continue
                    opt.step()
                    yield row(label, opt.step, flops, traffic)
                w = torch.randn(m, n, device=device, dtype=dtype)
                yield row("hybrid cuBLAS + elementwise (fp32 moments)", _hybrid_step(w, g, rank), flops32, traffic32)


def measure_refresh(settings: Settings = SIZES["full"], device: str = "cuda") -> Iterator[RefreshRow]:
    """The refresh rows, yielded as they are measured."""
    from ..kernels.sketch import gaussian_sketch

    time_us = _timer(device, *settings.refresh_calls, settings.repeats)
    rank = settings.refresh_rank
    for m, n in settings.refresh_shapes:
        g = power_law_gradient(m, n, device=device)
        side = resolve_side("std", (m, n))
        g_side = oriented(g, side)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        exact = s[:rank].double().square().sum().item()
        del u, vh

        def row(name: str, fn: Callable[[], torch.Tensor]) -> RefreshRow:
            us = time_us(fn)
            captured = (fn().double() @ g_side.double()).square().sum().item()
            return RefreshRow(m, n, rank, name, us / 1e3, captured / exact)

        yield row("ours randomized (Triton sketch)",
                  lambda: compute_projector(g, rank, side, seed=1, sketch=gaussian_sketch))
        yield row("ours randomized (reference sketch)", lambda: compute_projector(g, rank, side, seed=1))
        for driver in ("gesvd", "gesvdj", "gesvda") if torch.device(device).type == "cuda" else (None,):
            def svd(driver=driver) -> torch.Tensor:
                u, _, vh = torch.linalg.svd(g, full_matrices=False, driver=driver)
                return u[:, :rank].T if side == "left" else vh[:rank]
            yield row(f"torch.linalg.svd driver={driver}", svd)

        def lowrank() -> torch.Tensor:
            u, _, v = torch.svd_lowrank(g, q=rank + 8, niter=2)
            return u[:, :rank].T if side == "left" else v[:, :rank].T
        yield row("torch.svd_lowrank(q=r+8, niter=2)", lowrank)


def measure(settings: Settings = SIZES["full"], device: str = "cuda") -> Iterator[StepRow | RefreshRow]:
    """The step rows, then the refresh rows, yielded as they are measured."""
    yield from measure_steps(settings, device)
    yield from measure_refresh(settings, device)


def format_row(row: StepRow | RefreshRow) -> str:
    """
    >>> format_row(StepRow(4096, 11008, 512, torch.bfloat16, "ours", 120.0, 92.3e9, 200e6, 93.4))
    '| 4096×11008 | 512 | bfloat16 | ours | 120 | 1,667 | 769.2 | 1.28× of 93 µs |'
    >>> format_row(StepRow(96, 160, 16, torch.bfloat16, "galore-torch", None, 0.0, 0.0, None, "galore_torch"))
    '| 96×160 | 16 | bfloat16 | galore-torch | n/a (galore_torch not installed) | | | |'
    >>> format_row(RefreshRow(96, 160, 16, "torch.svd_lowrank(q=r+8, niter=2)", 0.84, 0.99731))
    '| 96×160 | 16 | torch.svd_lowrank(q=r+8, niter=2) | 0.8 | 0.9973 |'
    """
    if isinstance(row, RefreshRow):
        return f"| {row.m}×{row.n} | {row.rank} | {row.name} | {row.ms:,.1f} | {row.energy:.4f} |"
    prefix = f"| {row.m}×{row.n} | {row.rank} | {str(row.dtype)[6:]} |"
    if row.us is None:
        return f"{prefix} {row.name} | n/a ({row.missing} not installed) | | | |"
    tflops = f"{row.flops / row.us / 1e6:.1f}" if row.flops else "n/a"
    floor = "n/a" if row.floor_us is None else f"{row.us / row.floor_us:.2f}× of {row.floor_us:,.0f} µs"
    return f"{prefix} {row.name} | {row.us:,.0f} | {row.traffic / row.us / 1e3:,.0f} | {tflops} | {floor} |"


STEP_HEADER = ("| shape | rank | weights | row | µs | GB/s | TFLOP/s | × roofline floor |", "|---" * 8 + "|")
REFRESH_HEADER = ("| shape | rank | refresh | ms | energy (÷ exact top-r) |", "|---" * 5 + "|")


def print_table(
    rows: Iterable[StepRow | RefreshRow], settings: Settings = SIZES["full"], device: str = "cuda",
    file: TextIO | None = None,
) -> None:
    """The environment line, the step table and the refresh table, each row printed as soon as ``rows``
    yields it (a run cut short keeps what it measured)."""
    file = file or sys.stdout
    print(environment(device), file=file)
    print(*STEP_HEADER, sep="\n", file=file)
    refresh_started = False
    for row in rows:
        if isinstance(row, RefreshRow) and not refresh_started:
            refresh_started = True
            print(file=file)
            print(*REFRESH_HEADER, sep="\n", file=file)
        print(format_row(row), file=file, flush=True)
