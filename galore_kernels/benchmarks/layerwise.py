"""Layer-wise mode: gradient memory and step time, plain vs layer-wise, aligned vs spread refreshes.

``galore-kernels bench --only layerwise``. A stack of L square linear layers trains for a few T-step
windows with accumulation over k backward passes. For each mode the table gives the peak bytes of full
gradients alive (in ``.grad`` or held by an accumulation window, observed from every post-accumulate-grad
hook), and the wall time of an optimizer step (k forward/backward passes plus ``step()``): median, and
the slowest step over the median — the spike that refreshing every projector on one step causes, which
``refresh_schedule="spread"`` flattens. Step 0 (every mode refreshes every projector) is not counted.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TextIO

import torch

from ..optim import GaLoreAdamW8bit
from .harness import stream_table, synchronized_clock

TITLE = "Layer-wise mode: full gradients alive and step time"
MODES = {
    "plain": {},
    "layer-wise, aligned": {"layerwise": True, "refresh_schedule": "aligned"},
    "layer-wise, spread": {"layerwise": True, "refresh_schedule": "spread"},
}


@dataclass(frozen=True)
class LayerwiseRun:
    """The model a layer-wise table trains (``layers`` square linear layers of ``width``, GaLore ``rank``) and
    its schedule (refresh period ``gap``, ``k`` backward passes a step, ``windows`` periods after step 0)."""

    layers: int = 16
    width: int = 1024
    rank: int = 128
    gap: int = 8  # T, the refresh period
    k: int = 2  # backward passes accumulated per step
    windows: int = 2  # T-step windows run after step 0

    @property
    def grad_bytes(self) -> int:
        """Bytes of one layer's full fp32 gradient."""
        return self.width * self.width * 4


SIZES = {
    "full": LayerwiseRun(),
    "quick": LayerwiseRun(windows=1),  # the same model: the same peaks, the median over fewer steps
    "smoke": LayerwiseRun(layers=4, width=64, rank=8, gap=2, windows=1),
}


COLUMNS = ("mode", "peak full grads", "median step s", "slowest / median")


class Row(NamedTuple):
    mode: str
    peak_grads: float  # peak bytes of full gradients alive, in full gradients of one layer
    median_s: float
    slowest_over_median: float


def _measure_mode(mode: dict, s: LayerwiseRun, device: str | torch.device) -> tuple[int, list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(s.width, s.width, bias=False) for _ in range(s.layers)]).to(device)
    holder: dict = {}
    peak = [0]

    def observe(_: torch.Tensor) -> None:  # runs before the optimizer's hook: the new gradient is still in .grad
        live = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        peak[0] = max(peak[0], live + holder["opt"].accumulation_bytes()[0])

    # The hooks close over the model: removed at the end, or every measured model would outlive its run.
    handles = [p.register_post_accumulate_grad_hook(observe) for p in model.parameters()]
    layerwise = mode.get("layerwise", False)
    holder["opt"] = opt = GaLoreAdamW8bit(
        [{"params": list(model.parameters()), "rank": s.rank, "update_proj_gap": s.gap}],
        lr=1e-4,
        accumulation_steps=s.k if layerwise else 1,
        **mode,
    )
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(1 + s.gap * s.windows):
        if step == 1:
            peak[0] = 0  # step 0 refreshes every projector in every mode (there is none yet): not counted
        # Each step timed alone: the table reports the slowest step, which a batch of steps would average away.
        start = synchronized_clock()
        for _ in range(s.k):
            model(torch.randn(64, s.width, generator=gen).to(device)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(synchronized_clock() - start)
    opt.detach_hooks()
    for handle in handles:
        handle.remove()
    return peak[0], times[1:]


def measure(settings: LayerwiseRun = SIZES["full"], device: str | torch.device = "cpu") -> Iterator[Row]:
    """One row per mode (plain, layer-wise aligned, layer-wise spread), yielded as it is measured."""
    for name, mode in MODES.items():
        peak, times = _measure_mode(mode, settings, device)
        median = statistics.median(times)
        yield Row(name, peak / settings.grad_bytes, median, max(times) / median)


def format_row(row: Row) -> str:
    """
    >>> format_row(Row("layer-wise, spread", 3.0, 0.3781, 1.0612))
    '| layer-wise, spread | 3.0 grads | 0.378 | 1.06 |'
    """
    return f"| {row.mode} | {row.peak_grads:.1f} grads | {row.median_s:.3f} | {row.slowest_over_median:.2f} |"


def print_table(
    rows: Iterable[Row],
    settings: LayerwiseRun = SIZES["full"],
    device: str | torch.device = "cpu",
    file: TextIO | None = None,
) -> None:
    """The environment line, the configuration and the table, each row printed as soon as ``rows`` yields it."""
    s = settings
    configuration = (
        f"{s.layers} × Linear({s.width}, {s.width}) fp32, GaLoreAdamW8bit r={s.rank} T={s.gap}, "
        f"accumulation k={s.k}; one full gradient = {s.grad_bytes / 2**20:.1f} MiB; "
        f"step 0 excluded, then {s.windows} × T steps"
    )
    stream_table(COLUMNS, map(format_row, rows), device, file, preamble=(configuration,))
