"""ΔW = Pᵀ·Q over the rank dimension, with the weight update W ← W·decay − step_size·ΔW.

Reference: :func:`galore_kernels.reference.backproject_update`.

Left side: P = B (r × m), Q = N (r × n). Right side: P = N (r × m), Q = B (r × n), so ΔW = Nᵀ·B is
produced in W's orientation through strides, never transposed in memory. The update is computed in fp32
and W is stored once in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common.rounding import round_to
from .common.runtime import dot_precision, interpreting, on_device, upcast_dot


@triton.jit
def _backproject_update_kernel(
    p_ptr, q_ptr, w_ptr,
    r, m, n,
    stride_pr, stride_pm, stride_qr, stride_qn, stride_wm, stride_wn,
    decay, step_size,
    UPCAST: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    row_ok = rows < m
    col_ok = cols < n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        rr = r0 + rs
        r_ok = rr < r
        # Pᵀ tile loaded directly as (BLOCK_M × BLOCK_R) by swapping the strides.
        p_t = tl.load(
            p_ptr + rows[:, None] * stride_pm + rr[None, :] * stride_pr,
            mask=row_ok[:, None] & r_ok[None, :], other=0.0,
        )
        q = tl.load(
            q_ptr + rr[:, None] * stride_qr + cols[None, :] * stride_qn,
            mask=r_ok[:, None] & col_ok[None, :], other=0.0,
        )
        if UPCAST:
            p_t = p_t.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p_t, q, acc, input_precision=DOT_PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay - step_size * acc
    tl.store(w_ptrs, round_to(w, w_ptr.dtype.element_ty, SOFTWARE_BF16_ROUNDING), mask=mask)


def tile_sizes(m: int, n: int) -> dict[str, int]:
    """128 × 128 output tiles for large weights, 64 × 64 (4 warps) for small ones."""
    big = m >= 128 and n >= 128
    return {
        "BLOCK_M": 128 if big else 64,
        "BLOCK_N": 128 if big else 64,
        "BLOCK_R": 32,
        "num_warps": 8 if big else 4,
    }


def backproject_update(
    weight: torch.Tensor,
    projector: torch.Tensor,
    direction: torch.Tensor,
    side: str,
    *,
    decay: float,
    step_size: float,
) -> None:
    """W ← W·decay − step_size·ΔW in place, ΔW = Bᵀ·N (left) or Nᵀ·B (right); ``weight`` is 2-D (m × n)."""
    m, n = weight.shape
    p, q = (projector, direction) if side == "left" else (direction, projector)
    r = p.shape[0]
    if p.shape != (r, m) or q.shape != (r, n):
        raise ValueError(f"shapes do not compose: P {tuple(p.shape)}, Q {tuple(q.shape)}, W {(m, n)}")
    tiles = tile_sizes(m, n)
    upcast = upcast_dot(p.dtype, q.dtype)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
    with on_device(weight):
        _backproject_update_kernel[grid](
            p, q, weight,
            r, m, n,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), weight.stride(0), weight.stride(1),
            decay, step_size,
            UPCAST=upcast,
            SOFTWARE_BF16_ROUNDING=interpreting(),
            DOT_PRECISION=dot_precision(torch.float32 if upcast else p.dtype),
            **tiles,
        )
