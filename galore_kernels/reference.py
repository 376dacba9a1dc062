"""The pure-PyTorch GaLore-AdamW step: the executable spec of the numerics contract (docs/DESIGN.md §3).

It is also the CPU backend. There is one public function per fused kernel, with the kernel's name and
signature, so each kernel is tested against the function of its own name (docs/DESIGN.md §5):

==========================================  ==================================================
``project_adam``, ``adam_direction``        ``kernels/project_adam.py``
``backproject_update``                      ``kernels/backproject_update.py``
``adamw``                                   ``kernels/adamw.py``
==========================================  ==================================================

The 8-bit format's reference is :mod:`galore_kernels.quant` and the sketch's is
:func:`galore_kernels.projector.gaussian_sketch`. These functions are never edited to fit a kernel.
Every step computes in fp32 (float64 for float64 parameters) and writes the weight once in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import projector as proj
from .config import AdamHyper, GaLoreConfig
from .quant import quantize_blockwise
from .rng import sketch_seed
from .state import compute_dtype, dequantized_moments, is_quantized, matrix_shape

__all__ = [
    "adam_direction",
    "project_adam",
    "backproject_update",
    "adamw",
    "project",
    "refresh_projector_",
    "aligned_projector",
    "needs_refresh",
    "galore_adamw_step_from_projection",
    "galore_adamw_step",
]


def _store_moments_(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
    if not is_quantized(state):
        return  # fp32 moments were updated in place
    for name, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        codes, absmax = quantize_blockwise(value.reshape(state[name].shape), signed=signed)
        state[name].copy_(codes)
        state[f"{name}_absmax"].copy_(absmax)


def adam_direction(s: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, scale: float = 1.0) -> torch.Tensor:
    """Update the state's moments with the fp32 gradient ``s`` (moment-shaped); return N = α·m / (√v + ε).

    fp32 moments are updated in place; 8-bit ones are dequantized, updated and quantized back.

    >>> from galore_kernels.state import init_state
    >>> st = init_state(torch.zeros(4, 4), {}, param_seed=0, min_8bit_size=None)
    >>> round(adam_direction(torch.ones(4, 4), st, AdamHyper(1e-3, 0.9, 0.999, 0.0, 0.0))[0, 0].item(), 4)
    3.1623
    """
    m, v = (moment.view(s.shape) for moment in dequantized_moments(state))  # 8-bit stacks are stored as rows
    m.mul_(hyper.beta1).add_(s, alpha=1.0 - hyper.beta1)
    v.mul_(hyper.beta2).addcmul_(s, s, value=1.0 - hyper.beta2)
    direction = m / (v.sqrt() + hyper.eps)
    _store_moments_(state, m, v)
    return direction.mul_(scale) if scale != 1.0 else direction


def project_adam(
    projector: torch.Tensor, g_oriented: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, scale: float
) -> torch.Tensor:
    """S = B·G' in fp32, then :func:`adam_direction` on it: returns N (r × k, fp32)."""
    dtype = compute_dtype(g_oriented.dtype)
    return adam_direction(projector.to(dtype) @ g_oriented.to(dtype), state, hyper, scale)


def _apply_update_(param: torch.Tensor, delta: torch.Tensor, decay: float, step_size: float) -> None:
    """W ← W·decay − step_size·Δ in fp32 (float64 for float64 W), written once in W's dtype."""
    weight = param.to(compute_dtype(param.dtype))  # the parameter itself when fp32/fp64, else a working copy
    if decay != 1.0:
        weight.mul_(decay)
    weight.add_(delta.reshape(param.shape), alpha=-step_size)
    if weight is not param:
        param.copy_(weight)


def backproject_update(
    weight: torch.Tensor, projector: torch.Tensor, direction: torch.Tensor, side: str, *, decay: float, step_size: float
) -> None:
    """W ← W·decay − step_size·ΔW in place, ΔW = Bᵀ·N (left) or Nᵀ·B (right).

    ``weight`` is m × n, or a ≥3-D tensor treated as (shape[0], rest) (the kernel takes 2-D views only).
    """
    dtype = compute_dtype(weight.dtype)
    b, direction = projector.to(dtype), direction.to(dtype)
    # ΔW = (Bᵀ·N)ᵀ = Nᵀ·B on the right side: computing it in W's orientation keeps the weight update a
    # contiguous pass (adding a transposed 1024² delta measured 2 ms vs 0.3 ms on the CPU).
    delta = b.mT @ direction if side == "left" else direction.mT @ b
    _apply_update_(weight, delta, decay, step_size)


def adamw(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hyper: AdamHyper
) -> None:
    """One AdamW step of parameters without projection, fp32 or 8-bit moments as each state holds."""
    for param, grad, state in zip(params, grads, states):
        t = state["step"]
        s = grad.to(compute_dtype(param.dtype)).reshape(state["exp_avg"].shape)
        direction = adam_direction(s, state, hyper)
        _apply_update_(param, direction, hyper.decay, hyper.step_size(t))
        state["step"] = t + 1


def refresh_projector_(
    state: dict[str, Any],
    g: torch.Tensor,
    side: str,
    config: GaLoreConfig,
    *,
    sketch: proj.Sketch = proj.gaussian_sketch,
) -> None:
    """Recompute the state's projector(s) from the 2-D gradient ``g`` (or expert stack) when
    :func:`needs_refresh` says so.

    The sketch's seed is (parameter seed, step), so every backend and rerun draws the same Ω; a backend
    passes its own ``sketch`` to compute G'·Ω (the reference materializes Ω). Expert stacks share one Ω,
    so only a sketch that takes a stack may be passed for them (the Triton kernel's is 2-D: stacks take
    the reference path).

    A matrix whose gradient is too small to define a subspace (all zeros, or entries in fp32's subnormal
    range on average, where products flush to zero) would fix arbitrary coordinate axes for T − 1 steps:
    a zero-initialized readout makes every upstream gradient exactly 0 at step 0, and in an expert stack
    an expert routed no tokens has a zero gradient while the others do not. Such a matrix keeps its
    projector and its bit in ``state["pending_refresh"]`` (bit e for expert e, bit 0 for a plain matrix);
    later steps refresh the pending matrices alone until each has had a gradient. The schedule itself
    (``refresh_offset``) never moves, so ``refresh_schedule="spread"`` keeps its phases.
    """
    seed = sketch_seed(state["seed"], state["step"])
    kwargs = dict(method=config.svd, seed=seed, oversample=config.svd_oversample, power_iters=config.svd_power_iters)
    matrices = g if g.dim() == 3 else g.unsqueeze(0)
    scheduled = proj.is_refresh_step(state["step"], config.update_proj_gap, state["refresh_offset"])
    pending = state["pending_refresh"]
    candidates = [i for i in range(matrices.shape[0]) if scheduled or pending >> i & 1]
    usable = _has_direction(matrices).tolist()  # one sync, on refresh steps only
    for i in candidates:
        pending = pending & ~(1 << i) if usable[i] else pending | (1 << i)
    state["pending_refresh"] = pending
    chosen = [i for i in candidates if usable[i]]
    if not chosen:
        return
    if side == "full":
        left, right = proj.compute_full_projectors(g, config.rank, **kwargs)
        state["projector"].copy_(left)
        state["projector_right"].copy_(right)
    elif g.dim() == 2:
        fresh = proj.compute_projector(g, config.rank, side, sketch=sketch, **kwargs)
        state["projector"].copy_(aligned_projector(fresh, state["projector"], config))
    elif len(chosen) == matrices.shape[0]:  # the whole stack, without copying it
        fresh = proj.compute_projector(g, config.rank, side, sketch=sketch, **kwargs)
        state["projector"].copy_(aligned_projector(fresh, state["projector"], config))
    else:
        index = torch.tensor(chosen, device=g.device)
        fresh = proj.compute_projector(g.index_select(0, index), config.rank, side, sketch=sketch, **kwargs)
        fresh = aligned_projector(fresh, state["projector"].index_select(0, index), config)
        state["projector"].index_copy_(0, index, fresh.to(state["projector"].dtype))


def aligned_projector(fresh: torch.Tensor, previous: torch.Tensor, config: GaLoreConfig) -> torch.Tensor:
    """A refresh's new projector matched to the one it replaces (``config.projector_alignment``); the exact
    SVD's is returned as it is, keeping galore-torch's signs."""
    if config.svd != "randomized":
        return fresh
    return proj.align_projector(fresh, previous, config.projector_alignment)


def _has_direction(g: torch.Tensor) -> torch.Tensor:
    """Whether each matrix (the last two dimensions) is large enough to define a subspace: a norm above fp32's
    smallest normal number times √(its size), i.e. entries above the subnormal range on average."""
    norms = torch.linalg.vector_norm(g, dim=(-2, -1), dtype=compute_dtype(g.dtype))
    return norms > torch.finfo(torch.float32).tiny * math.sqrt(g.shape[-2] * g.shape[-1])


def needs_refresh(state: dict[str, Any], update_proj_gap: int) -> bool:
    """Whether this step's gradient goes through :func:`refresh_projector_`: on the schedule, or while a
    matrix (an expert of a stack) is still without a projector from a usable gradient."""
    scheduled = proj.is_refresh_step(state["step"], update_proj_gap, state["refresh_offset"])
    return scheduled or state["pending_refresh"] != 0


def project(state: dict[str, Any], g: torch.Tensor, side: str) -> torch.Tensor:
    """S = B·G' in fp32 (B·G·B_rightᵀ for ``full``): the gradient in the state's subspace, moment-shaped."""
    dtype = compute_dtype(g.dtype)
    b = state["projector"].to(dtype)
    if side == "full":
        return b @ g.to(dtype) @ state["projector_right"].to(dtype).T
    return b @ proj.oriented(g, side).to(dtype)


AdamDirection = Callable[[torch.Tensor, dict[str, Any], AdamHyper, float], torch.Tensor]


def galore_adamw_step_from_projection(
    param: torch.Tensor,
    s: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    config: GaLoreConfig,
    *,
    adam: AdamDirection = adam_direction,
) -> None:
    """The step after projection: Adam on the fp32 projected gradient ``s`` (r × k), back-project, update W.

    Layer-wise accumulation sums projected gradients and steps through here; :func:`galore_adamw_step`
    is a refresh, :func:`project` and this. ``adam`` computes the direction: :func:`adam_direction`, or
    the native CPU library's equal (:mod:`galore_kernels.native`).
    """
    t = state["step"]
    side = proj.resolve_side(config.proj_type, matrix_shape(param, config.experts)[-2:])
    direction = adam(s, state, hyper, config.scale)
    step_size = hyper.step_size(t)
    if side == "full":
        dtype = direction.dtype
        delta = state["projector"].to(dtype).T @ direction @ state["projector_right"].to(dtype)
        _apply_update_(param, delta, hyper.decay, step_size)
    else:
        backproject_update(param, state["projector"], direction, side, decay=hyper.decay, step_size=step_size)
    state["step"] = t + 1


def galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    config: GaLoreConfig,
    *,
    adam: AdamDirection = adam_direction,
    sketch: proj.Sketch = proj.gaussian_sketch,
) -> None:
    """One GaLore-AdamW step of a ≥2-D parameter: refresh B on schedule, S = B·G', Adam on S, W update.

    >>> from galore_kernels.state import init_state
    >>> w = torch.randn(16, 8); group = {"rank": 2, "proj_type": "std"}
    >>> st = init_state(w, group, param_seed=0, min_8bit_size=None)
    >>> config = GaLoreConfig(rank=2, svd="exact")
    >>> galore_adamw_step(w, torch.randn(16, 8), st, AdamHyper(1e-3, 0.9, 0.999, 1e-6, 0.0), config)
    >>> st["step"], tuple(st["exp_avg"].shape)
    (1, (2, 16))
    """
    g = grad.reshape(matrix_shape(param, config.experts))
    side = proj.resolve_side(config.proj_type, tuple(g.shape[-2:]))
    if needs_refresh(state, config.update_proj_gap):
        refresh_projector_(state, g, side, config, sketch=sketch)
    galore_adamw_step_from_projection(param, project(state, g, side), state, hyper, config, adam=adam)
