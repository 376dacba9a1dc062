"""One function per algorithm step, each picking the backend that runs it (DESIGN §6).

Backends share one signature and one state format, so a run can switch between them. This version
ships the PyTorch reference only; the Triton kernels are the next milestone, and asking for them says so.
"""

from __future__ import annotations

from typing import Any

import torch

from . import reference
from .reference import AdamHyper, GaLoreConfig

__all__ = ["BACKENDS", "resolve_backend", "adamw_step", "galore_adamw_step"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str) -> str:
    """The backend that will run: "torch" for "auto" and "torch"; "triton" is not available yet."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton' is not available in this version of galore_kernels (the fused kernels "
            "are not built yet); use backend='auto' or 'torch'"
        )
    return "torch"


def adamw_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, *, backend: str
) -> None:
    """AdamW on a parameter without projection, with fp32 or 8-bit moments as its state holds."""
    resolve_backend(backend)
    reference.adamw_step(param, grad, state, hyper)


def galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    cfg: GaLoreConfig,
    *,
    backend: str,
) -> None:
    """GaLore-AdamW on a ≥2-D parameter, with fp32 or 8-bit moments as its state holds."""
    resolve_backend(backend)
    reference.galore_adamw_step(param, grad, state, hyper, cfg)
