"""One function per algorithm step, each picking the backend that runs it (docs/DESIGN.md §6).

Backends share one signature and one state format, so a run can switch between them mid-training:
"torch" is the reference (:mod:`galore_kernels.reference`), "triton" the fused kernels of
:mod:`galore_kernels.kernels` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), and "auto"
picks Triton for CUDA tensors when it imports and the reference otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import native, reference, rng
from . import projector as proj
from .config import AdamHyper, GaLoreConfig
from .state import is_quantized, matrix_shape

__all__ = [
    "BACKENDS",
    "check_backend",
    "resolve_backend",
    "adamw",
    "galore_adamw_step",
    "galore_adamw_step_from_projection",
    "project_gradient",
    "gaussian_source",
]

BACKENDS = ("auto", "torch", "triton", "native")


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    """Reject unknown names, and "triton" where Triton is not installed, before any state exists."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not _triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; use 'auto' or 'torch'")
    if backend == "native" and not native.native_available():
        raise RuntimeError(
            f"backend='native' needs the native CPU library, which {native.unavailable_reason()}; use 'auto' or 'torch'"
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a step on ``device``: "torch" or "triton"."""
    check_backend(backend)
    if backend == "native" and device.type != "cpu":
        raise RuntimeError(f"backend='native' runs on CPU tensors; got a {device.type} tensor (use 'auto' there)")
    if backend in ("torch", "native"):
        return "torch"  # the reference's path; "native" swaps its 8-bit Adam for the library's (_cpu_step)
    from .kernels.common.runtime import interpreting

    runnable = device.type == "cuda" or interpreting()
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; "
                f"got a {device.type} tensor"
            )
        return "triton"
    return "triton" if device.type == "cuda" and _triton_available() else "torch"


def adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    hyper: AdamHyper,
    *,
    backend: str,
) -> None:
    """AdamW on parameters without projection (one param group), fp32 or 8-bit moments as each state holds.

    The Triton path launches one multi-tensor kernel per (device, dtypes, moment format) bucket;
    non-contiguous and float64 parameters take the reference.
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        if resolve_backend(backend, p.device) == "torch" or not p.is_contiguous() or p.dtype == torch.float64:
            _cpu_step(backend).adamw([p], [g], [s], hyper)
        else:
            buckets[(p.device, p.dtype, g.dtype, is_quantized(s))].append(i)
    if not buckets:
        return
    from .kernels import adamw as adamw_kernel

    for members in buckets.values():
        adamw_kernel.adamw(
            [params[i] for i in members], [grads[i] for i in members], [states[i] for i in members], hyper
        )


class _CpuSteps(NamedTuple):
    """The functions a step runs where it does not run the Triton kernels."""

    adamw: Callable[..., None]
    adam_direction: reference.AdamDirection
    source: rng.GaussianSource  # the sketch's Ω, whole (one process) or by rows (sharded refreshes)

    @property
    def sketch(self) -> proj.Sketch:
        return proj.sketch_drawing_from(self.source)


_REFERENCE = _CpuSteps(reference.adamw, reference.adam_direction, rng.randn_range)
# The native CPU library's equals; each runs the reference where it cannot run (galore_kernels.native).
_NATIVE = _CpuSteps(native.adamw, native.adam_direction, native.randn_range)


def _cpu_step(backend: str) -> _CpuSteps:
    """The functions of a step off the Triton kernels: "auto" and "native" the library's, "torch" and
    "triton" the reference's (the Triton backend's off-kernel paths, expert stacks and sharded refreshes,
    draw the reference's Ω, as its kernel does)."""
    return _NATIVE if backend in ("auto", "native") else _REFERENCE


def gaussian_source(backend: str) -> rng.GaussianSource:
    """Where ``backend`` draws the sketch's Ω on CPU paths that draw rows of it (sharded refreshes)."""
    return _cpu_step(backend).source


def _runs_kernels(param: torch.Tensor, side: str, backend: str, *, stacked: bool) -> bool:
    """Whether a projected step runs the fused kernels: ``proj_type="full"``, non-contiguous and float64
    weights take the reference on every backend (the kernels compute in fp32), and so do expert stacks:
    their batched reference step is one bmm-based pass over all experts, no Python loop per expert, but
    the fused kernels do one matrix at a time."""
    return (
        resolve_backend(backend, param.device) == "triton"
        and side != "full"
        and param.is_contiguous()
        and param.dtype != torch.float64
        and not stacked
    )


def galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    config: GaLoreConfig,
    *,
    backend: str,
) -> None:
    """GaLore-AdamW on a ≥2-D parameter, with fp32 or 8-bit moments as its state holds.

    The Triton path runs the randomized refresh with the in-kernel sketch, then ``project_adam`` and
    ``backproject_update``.
    """
    g = grad.reshape(matrix_shape(param, config.experts))
    side = proj.resolve_side(config.proj_type, tuple(g.shape[-2:]))
    if not _runs_kernels(param, side, backend, stacked=g.dim() == 3):
        steps = _cpu_step(backend)
        reference.galore_adamw_step(param, grad, state, hyper, config, adam=steps.adam_direction, sketch=steps.sketch)
        return
    from .kernels.gaussian_sketch import gaussian_sketch
    from .kernels.project_adam import project_adam

    if reference.needs_refresh(state, config.update_proj_gap):
        reference.refresh_projector_(state, g, side, config, sketch=gaussian_sketch)
    direction = project_adam(state["projector"], proj.oriented(g, side), state, hyper, config.scale)
    _backproject_update(param, direction, state, hyper, side)


def project_gradient(state: dict[str, Any], g: torch.Tensor, side: str, *, backend: str) -> torch.Tensor:
    """S = B·G' in fp32 (moment-shaped), for layer-wise accumulation of projected gradients.

    Every backend runs the reference's GEMM (cuBLAS on CUDA): there is no projection-only kernel, and the
    sum is consumed by the ``adam_direction`` kernel later. On CUDA it follows torch's fp32 matmul
    precision setting (TF32 when enabled), where ``project_adam`` uses tf32x3.
    """
    check_backend(backend)
    return reference.project(state, g, side)


def galore_adamw_step_from_projection(
    param: torch.Tensor,
    s: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    config: GaLoreConfig,
    *,
    backend: str,
) -> None:
    """GaLore-AdamW from an already projected fp32 gradient ``s`` (moment-shaped): Adam, back-project, update.

    Layer-wise accumulation steps through here with the sum of a window's projected gradients. The
    Triton path runs the ``adam_direction`` kernel (``project_adam``'s epilogue alone) and
    ``backproject_update``.
    """
    shape = matrix_shape(param, config.experts)
    side = proj.resolve_side(config.proj_type, shape[-2:])
    if not _runs_kernels(param, side, backend, stacked=len(shape) == 3):
        adam = _cpu_step(backend).adam_direction
        reference.galore_adamw_step_from_projection(param, s, state, hyper, config, adam=adam)
        return
    from .kernels.project_adam import adam_direction

    direction = adam_direction(s.contiguous(), state, hyper, config.scale, out_dtype=state["projector"].dtype)
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
