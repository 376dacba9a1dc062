"""S = B·G' (fp32 accumulate) with the Adam epilogue, writing the direction N = α·m/(√v + ε).

Reference: :func:`galore_kernels.reference.project_adam` and, for the epilogue alone,
:func:`galore_kernels.reference.adam_direction`. With ``GIVEN_S`` the kernel reads a given fp32 S instead
of computing it (:func:`adam_direction`): layer-wise accumulation sums projected gradients over several
backward passes and then needs only the epilogue.

One program owns a (BLOCK_R × BLOCK_K) tile of S and loops over d, accumulating it k-major. The epilogue
loads that tile's moments (fp32, or 8-bit codes + absmax dequantized in registers), updates them, writes them back
(requantized with a fresh absmax per 256-column block: an 8-bit tile spans whole blocks) and writes N.
G' = G or Gᵀ is read through strides, never copied. Hyper-parameters are runtime arguments, so nothing
recompiles during training.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..config import AdamHyper
from ..quant import BLOCK_SIZE
from .common.codebook import code_tables, dequantize_rows, quantize_rows
from .common.rounding import round_to
from .common.runtime import dot_precision, interpreting, on_device, upcast_dot


@triton.jit
def _project_adam_kernel(
    b_ptr, g_ptr, s_ptr, direction_ptr,
    m_ptr, v_ptr, m_absmax_ptr, v_absmax_ptr,
    signed_map_ptr, signed_mids_ptr, unsigned_map_ptr, unsigned_mids_ptr,
    r, d, k, n_blocks,
    stride_br, stride_bd, stride_gd, stride_gk,
    beta1, beta2, eps, scale,
    QUANTIZED: tl.constexpr, GIVEN_S: tl.constexpr, QBLOCK: tl.constexpr,
    UPCAST: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    row_ok = rows < r
    col_ok = cols < k

    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * k + cols[None, :]
    if GIVEN_S:
        acc = tl.load(s_ptr + offs, mask=mask, other=0.0)
    else:
        # Sᵀ = G'ᵀ·Bᵀ, k-major: the k dimension (256 wide in the 8-bit tile) is the MMA's M, which Hopper's
        # wgmma needs to be ≥ 64 per warpgroup, while the tile keeps few rows of S (the 8-bit epilogue's
        # register budget). One transpose in registers hands the epilogue S's row-major tile.
        acc_t = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + ds
            g_t = tl.load(
                g_ptr + cols[:, None] * stride_gk + dd[None, :] * stride_gd,
                mask=col_ok[:, None] & (dd[None, :] < d), other=0.0,
            )
            b_t = tl.load(
                b_ptr + dd[:, None] * stride_bd + rows[None, :] * stride_br,
                mask=(dd[:, None] < d) & row_ok[None, :], other=0.0,
            )
            if UPCAST:
                g_t = g_t.to(tl.float32)
                b_t = b_t.to(tl.float32)
            acc_t = tl.dot(g_t, b_t, acc_t, input_precision=DOT_PRECISION)
        acc = tl.trans(acc_t)

    if QUANTIZED:
        blocks = pid_k * (BLOCK_K // QBLOCK) + tl.arange(0, BLOCK_K // QBLOCK)
        absmax_offs = rows[:, None] * n_blocks + blocks[None, :]
        absmax_mask = row_ok[:, None] & (blocks[None, :] < n_blocks)
        m_codes = tl.load(m_ptr + offs, mask=mask, other=0)
        v_codes = tl.load(v_ptr + offs, mask=mask, other=0)
        m_absmax = tl.load(m_absmax_ptr + absmax_offs, mask=absmax_mask, other=0.0)
        v_absmax = tl.load(v_absmax_ptr + absmax_offs, mask=absmax_mask, other=0.0)
        # Masked codes read as code 0 (-0.99 on the signed map): zero them so that the short last block
        # of a row neither gains phantom values nor a larger absmax.
        m = tl.where(mask, dequantize_rows(m_codes, m_absmax, signed_map_ptr, QBLOCK, BLOCK_R, BLOCK_K), 0.0)
        v = tl.where(mask, dequantize_rows(v_codes, v_absmax, unsigned_map_ptr, QBLOCK, BLOCK_R, BLOCK_K), 0.0)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    m = m * beta1 + acc * (1.0 - beta1)
    v = v * beta2 + acc * acc * (1.0 - beta2)
    # Round-to-nearest sqrt and division (Triton defaults to sqrt.approx and div.full): N then matches
    # the reference to fp32 rounding instead of a few ulps.
    direction = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps) * scale
    tl.store(direction_ptr + offs, round_to(direction, direction_ptr.dtype.element_ty, SOFTWARE_BF16_ROUNDING),
             mask=mask)

    if QUANTIZED:
        m_codes, m_absmax = quantize_rows(m, signed_mids_ptr, QBLOCK, BLOCK_R, BLOCK_K)
        v_codes, v_absmax = quantize_rows(v, unsigned_mids_ptr, QBLOCK, BLOCK_R, BLOCK_K)
        tl.store(m_ptr + offs, m_codes, mask=mask)
        tl.store(v_ptr + offs, v_codes, mask=mask)
        tl.store(m_absmax_ptr + absmax_offs, m_absmax, mask=absmax_mask)
        tl.store(v_absmax_ptr + absmax_offs, v_absmax, mask=absmax_mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def tile_sizes(r: int, k: int, quantized: bool) -> dict[str, int]:
    """Tile sizes and warps for an (r × k) moment tensor; an 8-bit tile spans whole 256-column blocks.

    The 8-bit epilogue holds codes, both moments and the accumulator at once: a 64 × 256 tile spilled
    864–2604 bytes per thread at 255 registers (ptxas -v, sm_80 and sm_90, fp32 and bf16), while
    32 × 256 on 8 warps needs 182–228 registers and spills nothing
    (python -m galore_kernels.kernels.compile_report).
    With only 32 rows, the product runs k-major so that sm_90 still issues wgmma.

    When k is not a multiple of 16 (Llama-1B's 5461-wide weights) the moment rows start at unaligned
    addresses: loads and stores are not vectorized and every element keeps its own 64-bit address. The
    tiles above then took 255 registers and spilled 352–1308 bytes (sm_80 and sm_90, every moment and
    weight format); halving the rows to 16 elements per thread on 8 warps spills nothing (at most 236
    registers, 8-bit; 208, fp32).
    """
    aligned = k % 16 == 0
    if quantized:
        block_r = 16 if r <= 16 or not aligned else 32
        return {"BLOCK_R": block_r, "BLOCK_K": BLOCK_SIZE, "BLOCK_D": 32, "num_warps": 8}
    block_r = 16 if r <= 16 else 32 if r <= 32 or not aligned else 64
    warps = 8 if block_r == 64 or not aligned else 4
    return {"BLOCK_R": block_r, "BLOCK_K": 128, "BLOCK_D": 32, "num_warps": warps}


def project_adam(
    projector: torch.Tensor, g_oriented: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, scale: float
) -> torch.Tensor:
    """Update the moments of ``state`` with S = projector · g_oriented and return N (r × k).

    ``g_oriented`` is G' (d × k) as a view of the gradient: strides decide the side, nothing is copied.
    Operands reach tl.dot in their own dtype when they share it (bf16/fp16 tensor cores, tf32x3 for fp32).
    N is written in the projector's dtype, so the back-projection GEMM also runs on 16-bit tensor cores
    for 16-bit weights: its rounding (2^-9 relative for bf16) is far below that of storing the weight.
    """
    upcast = upcast_dot(projector.dtype, g_oriented.dtype)
    (r, d), k = projector.shape, g_oriented.shape[1]
    return _launch(
        (r, d, k), projector, g_oriented, None, state, projector.dtype, hyper, scale,
        upcast=upcast, dot_dtype=torch.float32 if upcast else projector.dtype,
    )


def adam_direction(
    s: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    scale: float = 1.0,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The epilogue alone: update the moments with a given contiguous fp32 S (r × k), return N in ``out_dtype``."""
    if s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"s must be a contiguous fp32 tensor, got {s.dtype} with strides {s.stride()}")
    # No GEMM runs: S stands in for the projector and gradient operands, which are never read.
    (r, k), d = s.shape, 0
    return _launch((r, d, k), s, s, s, state, out_dtype, hyper, scale, upcast=False, dot_dtype=torch.float32)


def _launch(
    shape: tuple[int, int, int],
    projector: torch.Tensor,
    g_oriented: torch.Tensor,
    s: torch.Tensor | None,
    state: dict[str, Any],
    out_dtype: torch.dtype,
    hyper: AdamHyper,
    scale: float,
    *,
    upcast: bool,
    dot_dtype: torch.dtype,
) -> torch.Tensor:
    r, d, k = shape
    quantized = "exp_avg_absmax" in state
    out = torch.empty((r, k), dtype=out_dtype, device=projector.device)
    n_blocks = triton.cdiv(k, BLOCK_SIZE)
    signed_map, signed_mids = code_tables(True, projector.device)
    unsigned_map, unsigned_mids = code_tables(False, projector.device)
    m_absmax = state.get("exp_avg_absmax", out)  # any tensor: unused when not quantized
    v_absmax = state.get("exp_avg_sq_absmax", out)
    tiles = tile_sizes(r, k, quantized)
    grid = (triton.cdiv(r, tiles["BLOCK_R"]), triton.cdiv(k, tiles["BLOCK_K"]))
    with on_device(projector):
        _project_adam_kernel[grid](
            projector, g_oriented, out if s is None else s, out,
            state["exp_avg"], state["exp_avg_sq"], m_absmax, v_absmax,
            signed_map, signed_mids, unsigned_map, unsigned_mids,
            r, d, k, n_blocks,
            projector.stride(0), projector.stride(1), g_oriented.stride(0), g_oriented.stride(1),
            hyper.beta1, hyper.beta2, hyper.eps, scale,
            QUANTIZED=quantized, GIVEN_S=s is not None, QBLOCK=BLOCK_SIZE, UPCAST=upcast,
            SOFTWARE_BF16_ROUNDING=interpreting(), DOT_PRECISION=dot_precision(dot_dtype),
            **tiles,
        )
    return out
