"""GPU benchmark: the GaLore step and the projector refresh against the alternatives. Two tables.

``galore-kernels bench --device cuda [--quick]`` (``--quick``: rank 512 only, the rank of the headline
rows). ``--smoke`` runs every row once on tiny shapes (a CPU too, Triton under TRITON_INTERPRET=1): a check
that the benchmark works, with times that mean nothing.

Step rows (one weight, steady state, no refresh): ours fused (Triton, 8-bit and fp32 moments, the
kernels alone and through optimizer.step), our reference on the GPU, a cuBLAS + elementwise hybrid
(torch.matmul, fp32 Adam in torch, torch.addmm_ doing the weight update in cuBLAS's epilogue),
galore-torch GaLoreAdamW and GaLoreAdamW8bit, bitsandbytes AdamW8bit and torch AdamW(fused=True) on the
full matrix. Columns: µs per call (the harness's :func:`~.harness.seconds_per_call`: median of
``repeats`` = 5 batches of 20 back-to-back calls, after 5 warm-up calls), GB/s and TFLOP/s from the bytes
and FLOPs counted below, and the time as a multiple of the roofline floor max(FLOPs/peak,
bytes/bandwidth) of the fused 8-bit step (fp32-moment rows against the fp32-moment floor). A comparator
that is not installed (galore-torch, bitsandbytes) gets a row saying so.

Refresh rows: each refresh timed (single calls after one warm-up call) and scored by its captured top-r
energy ÷ the exact top-r energy, from the gradient's singular values.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, TextIO

import torch

from .. import functional
from ..config import AdamHyper, GaLoreConfig
from ..optim import GaLoreAdamW, GaLoreAdamW8bit
from ..projector import compute_projector, oriented, resolve_side
from ..state import init_state
from .harness import SMOKE_SHAPES, Case, Timing, environment, power_law_gradient, seconds_per_call
from .refresh import captured_energy

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
HYPER = AdamHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@dataclass(frozen=True)
class GpuSweep:
    """What the GPU table measures: step rows for every shape × rank × dtype, refresh rows of
    ``refresh_shapes`` at ``refresh_rank``, and how each row is timed."""

    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    refresh_shapes: tuple[tuple[int, int], ...]
    refresh_rank: int
    repeats: int = 5  # timed batches per row, the median reported
    # Step rows: (warm-up calls, calls per batch). A step is a few kernel launches; a batch of 20 spreads
    # the one synchronization and the first launch's latency over 20 steps.
    step_calls: tuple[int, int] = (5, 20)
    refresh_calls: tuple[int, int] = (1, 1)  # refresh rows: milliseconds a call, timed one by one

    @property
    def step_timing(self) -> Timing:
        """How each step row is timed."""
        return Timing(*self.step_calls, self.repeats)

    @property
    def refresh_timing(self) -> Timing:
        """How each refresh row is timed."""
        return Timing(*self.refresh_calls, self.repeats)


_SMOKE = tuple((m, n) for m, n, _ in SMOKE_SHAPES)
_FULL = GpuSweep(SHAPES, RANKS, (torch.bfloat16, torch.float32), ((4096, 11008), (2048, 5461)), 512)
SIZES = {
    "full": _FULL,
    "quick": GpuSweep(SHAPES, (512,), _FULL.dtypes, _FULL.refresh_shapes, 512),
    "smoke": GpuSweep(_SMOKE, (16,), (torch.bfloat16,), _SMOKE, 16, repeats=1, step_calls=(1, 1)),
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


def _fused_kernels(g: torch.Tensor, rank: int, eight_bit: bool) -> Callable[[], None]:
    """The fused kernels alone, on state as GaLoreAdamW8bit keeps it (8-bit moments) or fp32 moments."""
    w = torch.randn(g.shape, device=g.device, dtype=g.dtype)
    state = init_state(w, {"rank": rank, "proj_type": "std"}, param_seed=0, min_8bit_size=4096 if eight_bit else None)
    config = GaLoreConfig(rank=rank, update_proj_gap=10**9)
    return partial(functional.galore_adamw_step, w, g, state, HYPER, config, backend="triton")


def _one_param_optimizer(name: str, w: torch.nn.Parameter, rank: int) -> torch.optim.Optimizer:
    group = {
        "params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": GaLoreConfig.scale, "proj_type": "std"
    }
    if name == "ours GaLoreAdamW8bit.step()":
        return GaLoreAdamW8bit([group], lr=1e-3, backend="triton")
    if name == "ours GaLoreAdamW.step()":
        return GaLoreAdamW([group], lr=1e-3, backend="triton")
    if name == "our reference (torch) 8-bit":
        return GaLoreAdamW8bit([group], lr=1e-3, backend="torch")
    if name.startswith("galore-torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import galore_torch

            cls = galore_torch.GaLoreAdamW8bit if name.endswith("8bit") else galore_torch.GaLoreAdamW
            return cls([group], lr=1e-3)
    if name == "bnb-adamw8bit-full":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit([w], lr=1e-3)
    if name == "torch-adamw-fused-full":
        return torch.optim.AdamW([w], lr=1e-3, fused=True)
    raise ValueError(name)


def _optimizer_step(g: torch.Tensor, rank: int, name: str) -> Callable[[], object]:
    """``step()`` of the optimizer ``name`` on one weight whose gradient is ``g``."""
    w = torch.nn.Parameter(torch.randn(g.shape, device=g.device, dtype=g.dtype))
    w.grad = g
    return _one_param_optimizer(name, w, rank).step


def _hybrid_step(g: torch.Tensor, rank: int) -> Callable[[], None]:
    """cuBLAS for both GEMMs (the update inside addmm_'s epilogue), torch elementwise Adam in between."""
    w = torch.randn(g.shape, device=g.device, dtype=g.dtype)
    m, n = w.shape
    side = resolve_side("std", (m, n))
    b = compute_projector(g, rank, side).to(w.dtype)
    k = n if side == "left" else m
    exp_avg = torch.zeros(rank, k, device=w.device)
    exp_avg_sq = torch.zeros(rank, k, device=w.device)

    def step() -> None:
        s = (b @ oriented(g, side)).float()
        exp_avg.lerp_(s, 1 - HYPER.beta1)
        exp_avg_sq.mul_(HYPER.beta2).addcmul_(s, s, value=1 - HYPER.beta2)
        direction = (exp_avg / (exp_avg_sq.sqrt() + HYPER.eps)).mul_(GaLoreConfig.scale).to(w.dtype)
        step_size = HYPER.step_size(10)
        if side == "left":
            w.addmm_(b.T, direction, alpha=-step_size)
        else:
            w.addmm_(direction.T, b, alpha=-step_size)

    return step


def step_cases(m: int, n: int, rank: int, dtype: torch.dtype, device: str | torch.device) -> list[Case]:
    """The step rows of one shape, rank and weight dtype, in table order, with their counted FLOPs and
    bytes; on a CPU without the CUDA-only comparators. Each call is one steady-state step.

    >>> [case.name for case in step_cases(96, 160, 16, torch.bfloat16, "cpu")][:2]
    ['ours fused kernels (8-bit moments)', 'ours fused kernels (fp32 moments)']
    """
    group = f"step {m}x{n} r={rank} {str(dtype)[6:]}"
    weight_bytes = torch.finfo(dtype).bits // 8
    work8 = galore_traffic(m, n, rank, weight_bytes, True)
    work32 = galore_traffic(m, n, rank, weight_bytes, False)
    cases = [
        Case(group, "ours fused kernels (8-bit moments)", partial(_fused_kernels, rank=rank, eight_bit=True), *work8),
        Case(group, "ours fused kernels (fp32 moments)", partial(_fused_kernels, rank=rank, eight_bit=False), *work32),
    ]
    for name, work in (
        ("ours GaLoreAdamW8bit.step()", work8),
        ("ours GaLoreAdamW.step()", work32),
        ("our reference (torch) 8-bit", work8),
        ("galore-torch", work32),
        ("galore-torch-8bit", work8),
        ("bnb-adamw8bit-full", (0.0, float(m * n * (3 * weight_bytes + 4)))),
        ("torch-adamw-fused-full", (0.0, float(m * n * (3 * weight_bytes + 16)))),
    ):
        cases.append(Case(group, name, partial(_optimizer_step, rank=rank, name=name), *work))
    cases.append(Case(group, "hybrid cuBLAS + elementwise (fp32 moments)", partial(_hybrid_step, rank=rank), *work32))
    on_cuda = torch.device(device).type == "cuda"
    return [case for case in cases if on_cuda or case.name not in CUDA_ONLY]


def measure_steps(settings: GpuSweep = SIZES["full"], device: str = "cuda") -> Iterator[StepRow]:
    """The step rows, yielded as they are measured."""
    peaks = _peaks(device)
    for m, n in settings.shapes:
        g32 = power_law_gradient(m, n, device=device)
        for rank in settings.ranks:
            for dtype in settings.dtypes:
                g = g32.to(dtype)
                for case in step_cases(m, n, rank, dtype, device):
                    row = StepRow(m, n, rank, dtype, case.name, None, case.flops, case.traffic, None)
                    try:
                        call = case.prepare(g)
                    except ImportError as missing:
                        yield row._replace(missing=missing.name or case.name)
                        continue
                    us = 1e6 * seconds_per_call(call, settings.step_timing)
                    if peaks is not None and case.flops:
                        peak_flops = peaks[1] if dtype == torch.float32 else peaks[0]
                        row = row._replace(floor_us=max(case.flops / peak_flops, case.traffic / peaks[2]) * 1e6)
                    yield row._replace(us=us)


def _randomized_refresh(g: torch.Tensor, rank: int, triton_sketch: bool) -> Callable[[], torch.Tensor]:
    side = resolve_side("std", tuple(g.shape))
    if not triton_sketch:
        return partial(compute_projector, g, rank, side, seed=1)
    from ..kernels.gaussian_sketch import gaussian_sketch

    return partial(compute_projector, g, rank, side, seed=1, sketch=gaussian_sketch)


def _svd_refresh(g: torch.Tensor, rank: int, driver: str | None) -> Callable[[], torch.Tensor]:
    side = resolve_side("std", tuple(g.shape))

    def svd() -> torch.Tensor:
        u, _, vh = torch.linalg.svd(g, full_matrices=False, driver=driver)
        return u[:, :rank].T if side == "left" else vh[:rank]

    return svd


def _lowrank_refresh(g: torch.Tensor, rank: int) -> Callable[[], torch.Tensor]:
    side = resolve_side("std", tuple(g.shape))

    def lowrank() -> torch.Tensor:
        u, _, v = torch.svd_lowrank(g, q=rank + 8, niter=2)
        return u[:, :rank].T if side == "left" else v[:, :rank].T

    return lowrank


def refresh_cases(m: int, n: int, rank: int, device: str | torch.device) -> list[Case]:
    """The refresh rows of one shape, in table order; each call returns the projector (r × d). The SVD
    drivers are CUDA's (gesvd, gesvdj, gesvda); a CPU has one, named None.

    >>> [case.name for case in refresh_cases(96, 160, 16, "cpu")][2:]
    ['torch.linalg.svd driver=None', 'torch.svd_lowrank(q=r+8, niter=2)']
    """
    group = f"refresh {m}x{n} r={rank}"
    drivers = ("gesvd", "gesvdj", "gesvda") if torch.device(device).type == "cuda" else (None,)
    return [
        Case(group, "ours randomized (Triton sketch)", partial(_randomized_refresh, rank=rank, triton_sketch=True)),
        Case(group, "ours randomized (reference sketch)", partial(_randomized_refresh, rank=rank, triton_sketch=False)),
        *(Case(group, f"torch.linalg.svd driver={driver}", partial(_svd_refresh, rank=rank, driver=driver))
          for driver in drivers),
        Case(group, "torch.svd_lowrank(q=r+8, niter=2)", partial(_lowrank_refresh, rank=rank)),
    ]


def measure_refresh(settings: GpuSweep = SIZES["full"], device: str = "cuda") -> Iterator[RefreshRow]:
    """The refresh rows, yielded as they are measured."""
    rank = settings.refresh_rank
    for m, n in settings.refresh_shapes:
        g = power_law_gradient(m, n, device=device)
        g_side = oriented(g, resolve_side("std", (m, n)))
        exact = torch.linalg.svdvals(g)[:rank].double().square().sum().item()
        for case in refresh_cases(m, n, rank, device):
            call = case.prepare(g)
            ms = 1e3 * seconds_per_call(call, settings.refresh_timing)
            yield RefreshRow(m, n, rank, case.name, ms, captured_energy(call(), g_side) / exact)


def measure(settings: GpuSweep = SIZES["full"], device: str = "cuda") -> Iterator[StepRow | RefreshRow]:
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
    rows: Iterable[StepRow | RefreshRow], settings: GpuSweep = SIZES["full"], device: str = "cuda",
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
