"""The comparison's outputs: one table (text), the loss curves (PNG) and every number (JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .compare import OPTIMIZERS, AllReduced, RunConfig, RunResult

__all__ = ["format_bytes", "table", "write_json", "plot_losses", "finite_or_none"]

NOT_AVAILABLE = "n/a"  # the table's cell for a number that does not exist (tokens/s of a 1-step run)


def format_bytes(n: int) -> str:
    """Bytes in binary units, e.g. ``format_bytes(837488)`` → ``'817.86 KiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _cell(value: float, spec: str) -> str:
    """``value`` in format ``spec``, or "n/a" when it is NaN or infinite (tokens/s of a 1-step run: step 1
    is not timed)."""
    return format(value, spec) if math.isfinite(value) else NOT_AVAILABLE


def _all_reduced_cells(r: RunResult) -> str:
    """The mean elements and bytes all-reduced per optimizer step, each right-aligned in its column."""
    if r.all_reduced is None:
        return f"{NOT_AVAILABLE:>18}{NOT_AVAILABLE:>12}"
    mean_bytes = r.all_reduced.mean_bytes
    size = format_bytes(round(mean_bytes)) if math.isfinite(mean_bytes) else NOT_AVAILABLE
    return f"{_cell(r.all_reduced.mean_elements, ',.0f'):>18}{size:>12}"


def table(results: list[RunResult], skipped: dict[str, str], device: str) -> str:
    """One row per optimizer; validation loss also relative to AdamW's when AdamW ran. A data-parallel run
    (any result with ``all_reduced``) adds the mean elements and bytes all-reduced per optimizer step after
    tokens/s. A number that does not exist (NaN, infinite) prints as "n/a"."""
    reference = next((r.final_validation_loss for r in results if r.name == "adamw"), None)
    peak = "peak memory" if device != "cpu" else "peak w+g+state"
    parallel = any(r.all_reduced is not None for r in results)
    reduced_header = f"{'all-reduced/step':>18}{'bytes/step':>12}" if parallel else ""
    lines = [
        f"{'optimizer':<28}{'lr':>8}{'train loss':>12}{'val loss':>10}{'vs AdamW':>10}{'tokens/s':>10}"
        f"{reduced_header}{'opt. state':>13}{peak:>16}"
    ]
    for r in results:
        versus = "—"
        if reference:
            versus = _cell(100 * (r.final_validation_loss / reference - 1), "+.1f")
            versus += "%" * (versus != NOT_AVAILABLE)
        # .4g keeps a diverging (huge but finite) loss inside its column
        lines.append(
            f"{OPTIMIZERS[r.name][0]:<28}{r.lr:>8.0e}{_cell(r.final_train_loss, '.4g'):>12}"
            f"{_cell(r.final_validation_loss, '.4g'):>10}{versus:>10}{_cell(r.tokens_per_second, ',.0f'):>10}"
            f"{_all_reduced_cells(r) if parallel else ''}"
            f"{format_bytes(r.state_bytes):>13}{format_bytes(r.peak_bytes):>16}"
        )
    for name, reason in skipped.items():
        lines.append(f"{OPTIMIZERS[name][0]:<28}  not run: {reason}")
    return "\n".join(lines)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in lists, tuples and dicts too) replaced by None, so that
    it is strict JSON (``null``); ``json.dumps`` would otherwise write ``NaN``, which JSON parsers refuse.

    >>> finite_or_none({"tokens_per_second": float("nan"), "validation": [(0, 3.9), (1, float("inf"))]})
    {'tokens_per_second': None, 'validation': [[0, 3.9], [1, None]]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(
    path: Path,
    settings: RunConfig,
    results: list[RunResult],
    skipped: dict[str, str],
    header: str,
    *,
    interrupted: bool = False,
    processes: int = 1,
) -> None:
    """Every number of the comparison as strict JSON: a NaN or infinite number (tokens/s of a 1-step run)
    is ``null``. ``interrupted``: Ctrl-C stopped the comparison, so some optimizers did not run. A
    data-parallel run (``processes`` > 1) adds ``"processes"`` and, per result, ``"all_reduced"``: how,
    the elements of every optimizer step, bytes per element and the means per step."""
    payload = {
        "environment": header,
        "interrupted": interrupted,
        **({"processes": processes} if processes > 1 else {}),
        "config": dataclasses.asdict(settings),
        "results": [
            {
                "name": r.name,
                "lr": r.lr,
                "final_train_loss": r.final_train_loss,
                "final_validation_loss": r.final_validation_loss,
                "initial_validation_loss": r.initial_validation_loss,
                "tokens_per_second": r.tokens_per_second,
                "optimizer_state_bytes": r.state_bytes,
                "peak_bytes": r.peak_bytes,
                "train_seconds": r.seconds,
                "train_losses": r.train_losses,
                "validation": r.validation,
                **({"all_reduced": _all_reduced_json(r.all_reduced)} if r.all_reduced is not None else {}),
            }
            for r in results
        ],
        "skipped": skipped,
    }
    path.write_text(json.dumps(finite_or_none(payload), indent=1, allow_nan=False))


def _all_reduced_json(reduced: AllReduced) -> dict[str, Any]:
    return {
        "via": reduced.via,
        "elements_per_step": reduced.elements,
        "bytes_per_element": reduced.element_bytes,
        "mean_elements_per_step": reduced.mean_elements,
        "mean_bytes_per_step": reduced.mean_bytes,
    }


def plot_losses(path: Path, results: list[RunResult], title: str) -> None:
    """Training loss (a moving average: single batches are noisy) and validation loss, per optimizer."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for r in results:
        window = max(1, len(r.train_losses) // 20)
        smooth = [
            sum(r.train_losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(r.train_losses))
        ]
        label = OPTIMIZERS[r.name][0]
        train_ax.plot(range(1, len(smooth) + 1), smooth, label=label)
        val_ax.plot([s for s, _ in r.validation], [v for _, v in r.validation], marker="o", label=label)
    train_ax.set(title=f"training loss (moving average of {window})", xlabel="step", ylabel="loss", yscale="log")
    val_ax.set(title="validation loss (held-out text)", xlabel="step", ylabel="loss", yscale="log")
    for ax in (train_ax, val_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
