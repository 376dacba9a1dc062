"""One function per algorithm step, each picking the backend that runs it (DESIGN §6).

Backends share one signature and one state format, so a run can switch between them mid-training:
"torch" is the reference (:mod:`galore_kernels.reference`), "triton" the fused kernels of
:mod:`galore_kernels.kernels` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), and "auto"
picks Triton for CUDA tensors when it imports and the reference otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict
from typing import Any

import torch

from . import projector as proj
from . import reference
from .reference import AdamHyper, GaLoreConfig
from .state import is_quantized, matrix_shape

__all__ = [
    "BACKENDS",
    "check_backend",
    "resolve_backend",
    "adamw_steps",
    "galore_adamw_step",
    "galore_adamw_step_projected",
    "project_gradient",
]

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    """Reject unknown names, and "triton" where Triton is not installed, before any state exists."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not _triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; use 'auto' or 'torch'")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a step on ``device``: "torch" or "triton"."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    from .kernels.runtime import interpreting

    runnable = device.type == "cuda" or interpreting()
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; "
                f"got a {device.type} tensor"
            )
        return "triton"
    return "triton" if device.type == "cuda" and _triton_available() else "torch"


def adamw_steps(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    hyper: AdamHyper,
    *,
    backend: str,
) -> None:
    """AdamW on parameters without projection (one param group), fp32 or 8-bit moments as each state holds."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        if resolve_backend(backend, p.device) == "torch" or not p.is_contiguous():
            reference.adamw_step(p, g, s, hyper)
        else:
            buckets[(p.device, p.dtype, g.dtype, is_quantized(s))].append(i)
    if not buckets:
        return
    from .kernels.adamw_elementwise import adamw_multi_tensor

    for members in buckets.values():
        member_states = [states[i] for i in members]
        adamw_multi_tensor(
            [params[i] for i in members],
            [grads[i] for i in members],
            member_states,
            [hyper.step_size(s["step"]) for s in member_states],
            beta1=hyper.beta1,
            beta2=hyper.beta2,
            eps=hyper.eps,
            decay=hyper.decay,
        )
        for s in member_states:
            s["step"] += 1


def galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    cfg: GaLoreConfig,
    *,
    backend: str,
) -> None:
    """GaLore-AdamW on a ≥2-D parameter, with fp32 or 8-bit moments as its state holds.

    The Triton path runs the randomized refresh with the in-kernel sketch, then kernel A (project + Adam)
    and kernel B (back-project + update). ``proj_type="full"`` and non-contiguous weights take the
    reference on every backend.
    """
    g = grad.reshape(matrix_shape(param))
    side = proj.resolve_side(cfg.proj_type, tuple(g.shape))
    if resolve_backend(backend, param.device) == "torch" or side == "full" or not param.is_contiguous():
        reference.galore_adamw_step(param, grad, state, hyper, cfg)
        return
    from .kernels.project_adam import project_adam
    from .kernels.sketch import gaussian_sketch

    if proj.is_refresh_step(state["step"], cfg.update_proj_gap, state["refresh_offset"]):
        reference.refresh_projector_(state, g, side, cfg, sketch=gaussian_sketch)
    direction = project_adam(
        state["projector"],
        proj.oriented(g, side),
        state,
        beta1=hyper.beta1,
        beta2=hyper.beta2,
        eps=hyper.eps,
        scale=cfg.scale,
    )
    _backproject_update(param, direction, state, hyper, side)


def project_gradient(state: dict[str, Any], g: torch.Tensor, side: str, *, backend: str) -> torch.Tensor:
    """S = B·G' in fp32 (moment-shaped), for layer-wise accumulation of projected gradients.

    Every backend runs the reference's GEMM (cuBLAS on CUDA): there is no projection-only kernel, and the
    sum is consumed by kernel A's epilogue later. On CUDA it follows torch's fp32 matmul precision setting
    (TF32 when enabled), where kernel A uses tf32x3.
    """
    check_backend(backend)
    return reference.project(state, g, side)


def galore_adamw_step_projected(
    param: torch.Tensor,
    s: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    cfg: GaLoreConfig,
    *,
    backend: str,
) -> None:
    """GaLore-AdamW from an already projected fp32 gradient ``s`` (moment-shaped): Adam, back-project, update.

    Layer-wise accumulation steps through here with the sum of a window's projected gradients. The
    Triton path runs kernel A's epilogue alone (``PROJECTED``) and kernel B.
    """
    side = proj.resolve_side(cfg.proj_type, matrix_shape(param))
    if resolve_backend(backend, param.device) == "torch" or side == "full" or not param.is_contiguous():
        reference.galore_adamw_step_projected(param, s, state, hyper, cfg)
        return
    from .kernels.project_adam import projected_adam

    direction = projected_adam(
        s.contiguous(),
        state,
        state["projector"].dtype,
        beta1=hyper.beta1,
        beta2=hyper.beta2,
        eps=hyper.eps,
        scale=cfg.scale,
    )
    _backproject_update(param, direction, state, hyper, side)


def _backproject_update(
    param: torch.Tensor, direction: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, side: str
) -> None:
    from .kernels.backproject_update import backproject_update

    t = state["step"]
    backproject_update(
        param.view(matrix_shape(param)),
        state["projector"],
        direction,
        side,
        decay=hyper.decay,
        step_size=hyper.step_size(t),
    )
    state["step"] = t + 1
