"""The optimizer-state layout: which parameters are projected, and the tensors each one keeps.

Per-parameter state holds tensors and plain numbers only, so ``torch.load(weights_only=True)`` reloads it:

==================  ===========================================================================
``step``            int, completed steps t (drives the refresh schedule and bias correction)
``nonfinite_skips`` int, steps skipped: the gradient held NaN or Inf, or its norm reached 2^63
``seed``            int, the parameter's sketch seed (GaLore parameters)
``refresh_offset``  int in [0, T), the step of the parameter's refresh schedule (GaLore parameters)
``pending_refresh`` int bitmask of the matrices still without a projector (bit e: expert e of a stack)
``projector``       B (r × d): parameter dtype for 16-bit parameters, fp32 otherwise
``projector_right`` the right projector (r × n) of ``proj_type="full"``
``exp_avg``         first moment: fp32, or uint8 codes when ``exp_avg_absmax`` is present
``exp_avg_sq``      second moment: fp32, or uint8 codes when ``exp_avg_sq_absmax`` is present
==================  ===========================================================================

GaLore moments have shape (r, k); plain AdamW moments have the parameter's shape in fp32 and the flat
row (1, numel) when quantized, which is bitsandbytes' blockwise layout. An expert stack (E × m × n, in a
group with ``experts=True``) keeps a projector stack (E, r, d) and moments (E, r, k), quantized as the
(E·r, k) rows they are. 8-bit codes use the row-block
format of :mod:`galore_kernels.quant`.
"""

from __future__ import annotations

from typing import Any

import torch

from .projector import effective_rank, resolve_side
from .quant import BLOCK_SIZE, dequantize_blockwise

__all__ = [
    "is_projected",
    "is_expert_stack",
    "matrix_shape",
    "compute_dtype",
    "init_state",
    "is_quantized",
    "dequantized_moments",
]

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def is_projected(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` is projected: its group has a ``rank`` and it is a non-empty tensor of ≥ 2 dims."""
    return "rank" in group and param.dim() >= 2 and param.numel() > 0


def is_expert_stack(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` is projected as a stack of expert matrices: a 3-D parameter of an ``experts`` group."""
    return bool(group.get("experts")) and param.dim() == 3 and is_projected(param, group)


def matrix_shape(param: torch.Tensor, experts: bool = False) -> tuple[int, ...]:
    """The shape a GaLore parameter is treated as: (shape[0], product of the rest), or (E, m, n) for a 3-D
    parameter of an ``experts`` group.

    >>> matrix_shape(torch.empty(4, 3, 2)), matrix_shape(torch.empty(4, 3, 2), experts=True)
    ((4, 6), (4, 3, 2))
    """
    if experts and param.dim() == 3:
        return tuple(param.shape)
    return param.shape[0], param.numel() // param.shape[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a step of a ``dtype`` parameter computes in and keeps fp moments in: float64 for
    float64 parameters (as torch.optim.AdamW keeps them), fp32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def projector_dtype(param: torch.Tensor) -> torch.dtype:
    """The projector's dtype: the parameter's for 16-bit parameters, fp32 otherwise."""
    return param.dtype if param.dtype in _SIXTEEN_BIT else torch.float32


def is_quantized(state: dict[str, Any]) -> bool:
    """Whether the state's moments are 8-bit codes (with absmax) rather than fp32."""
    return "exp_avg_absmax" in state


def dequantized_moments(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) as fp32 tensors: the state's own tensors when fp32, fresh dequantized copies when 8-bit."""
    if not is_quantized(state):
        return state["exp_avg"], state["exp_avg_sq"]
    m = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True)
    v = dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False)
    return m, v


def _moments(
    shape: tuple[int, ...], device: torch.device, quantize: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    if not quantize:
        return {
            "exp_avg": torch.zeros(shape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device),
        }
    rows, k = shape
    absmax_shape = (rows, -(-k // BLOCK_SIZE))
    # A block with absmax 0 dequantizes to zero whatever its codes, so zero-filled codes are zero moments.
    return {
        "exp_avg": torch.zeros(shape, dtype=torch.uint8, device=device),
        "exp_avg_absmax": torch.zeros(absmax_shape, dtype=torch.float32, device=device),
        "exp_avg_sq": torch.zeros(shape, dtype=torch.uint8, device=device),
        "exp_avg_sq_absmax": torch.zeros(absmax_shape, dtype=torch.float32, device=device),
    }


def init_state(
    param: torch.Tensor,
    group: dict[str, Any],
    *,
    param_seed: int,
    min_8bit_size: int | None,
    refresh_offset: int = 0,
) -> dict[str, Any]:
    """Fresh state for ``param`` in ``group``; ``min_8bit_size=None`` keeps every moment in fp32.

    ``refresh_offset`` staggers the parameter's refresh steps (:func:`projector.is_refresh_step`).

    Moments are quantized when they have at least ``min_8bit_size`` elements (and at least one).
    """
    device = param.device
    state: dict[str, Any] = {"step": 0, "nonfinite_skips": 0}

    def quantize(numel: int) -> bool:
        return min_8bit_size is not None and numel >= max(min_8bit_size, 1)

    if not is_projected(param, group):
        numel = param.numel()
        shape = (1, numel) if quantize(numel) else tuple(param.shape)
        state.update(_moments(shape, device, quantize(numel), compute_dtype(param.dtype)))
        return state

    *stack, m, n = matrix_shape(param, experts=is_expert_stack(param, group))
    side = resolve_side(group["proj_type"], (m, n))
    r = effective_rank(group["rank"], (m, n))
    dtype = projector_dtype(param)
    state["seed"] = int(param_seed)
    state["refresh_offset"] = int(refresh_offset)
    state["pending_refresh"] = 0
    if stack:
        d, k = (m, n) if side == "left" else (n, m)
        state["projector"] = torch.zeros((*stack, r, d), dtype=dtype, device=device)
        quantized = quantize(r * k)  # per expert, as separate parameters would be
        moments = _moments((stack[0] * r, k), device, quantized, compute_dtype(param.dtype))
        if not quantized:  # fp32 moments keep the stack's shape; 8-bit ones are rows of blocks
            moments = {key: value.view(*stack, r, k) for key, value in moments.items()}
        state.update(moments)
        return state
    if side == "full":
        state["projector"] = torch.zeros((r, m), dtype=dtype, device=device)
        state["projector_right"] = torch.zeros((r, n), dtype=dtype, device=device)
        moment_shape = (r, r)
    else:
        d, k = (m, n) if side == "left" else (n, m)
        state["projector"] = torch.zeros((r, d), dtype=dtype, device=device)
        moment_shape = (r, k)
    quantized = quantize(moment_shape[0] * moment_shape[1])
    state.update(_moments(moment_shape, device, quantized, compute_dtype(param.dtype)))
    return state
