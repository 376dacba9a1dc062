"""Benchmark inputs and the environment line every result row records."""

from __future__ import annotations

import datetime
import platform

import torch

# (m, n, rank): a Llama-7B-like attention slice, a 1B-like MLP slice, and a wide 8B-like shape, scaled
# to what a 2-core CPU measures in seconds.
REFRESH_SHAPES = [(1024, 2816, 128), (2048, 2048, 256), (2048, 5632, 256)]
STEP_SHAPES = [(1024, 1024, 128), (1024, 2816, 128), (2816, 1024, 128), (2048, 5632, 256)]


def power_law_gradient(
    m: int, n: int, seed: int = 0, exponent: float = -0.5, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A gradient-like fp32 matrix with singular values σ_i ∝ i^exponent (slow decay: a hard case).

    The random factors are drawn on the CPU (the same numbers on every machine) and orthonormalized on
    ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen).to(device)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen).to(device)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32, device=device) ** exponent
    return (u * sigma) @ v.T


def environment() -> str:
    """Date, device and versions, for the header of every table."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or platform.machine()}"
    return (
        f"{datetime.date.today().isoformat()} | {device}, {torch.get_num_threads()} threads | "
        f"torch {torch.__version__}, galore-torch {version('galore-torch')}, python {platform.python_version()}"
    )
