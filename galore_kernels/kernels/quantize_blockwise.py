"""Blockwise 8-bit quantize / dequantize of (rows, k) tensors in the row-block format.

Reference: :func:`galore_kernels.quant.quantize_blockwise` and :func:`~galore_kernels.quant.dequantize_blockwise`.

No optimizer path calls these: the fused kernels (project_adam, adamw) quantize in their epilogues with
the device codebook of ``common/codebook.py``. They ship because they are that codebook alone: their test
(tests/test_kernels_quantize_blockwise.py) pins the codes to the reference (which tests/test_quant.py pins
to bitsandbytes) with no GEMM or Adam arithmetic in front, so a code mismatch in a fused kernel is traced
to the codebook or to the arithmetic before it.

One program handles ROWS rows × one 256-element block; the last block of a row may be short (masked
elements load as zero, which leaves the absmax unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import BLOCK_SIZE
from .common.codebook import code_tables, dequantize_rows, quantize_rows
from .common.runtime import on_device

ROWS_PER_PROGRAM = 4


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, absmax_ptr, mids_ptr,
    rows, k, stride_xr, stride_xk, n_blocks,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    block = tl.program_id(1).to(tl.int64)
    r = row0 + tl.arange(0, ROWS)
    c = block * BLOCK + tl.arange(0, BLOCK)
    mask = (r[:, None] < rows) & (c[None, :] < k)
    x = tl.load(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    codes, absmax = quantize_rows(x, mids_ptr, BLOCK, ROWS, BLOCK)
    tl.store(codes_ptr + r[:, None] * k + c[None, :], codes, mask=mask)
    tl.store(absmax_ptr + r * n_blocks + block, tl.reshape(absmax, (ROWS,)), mask=r < rows)


@triton.jit
def _dequantize_kernel(
    codes_ptr, absmax_ptr, out_ptr, map_ptr,
    rows, k, n_blocks,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    block = tl.program_id(1).to(tl.int64)
    r = row0 + tl.arange(0, ROWS)
    c = block * BLOCK + tl.arange(0, BLOCK)
    mask = (r[:, None] < rows) & (c[None, :] < k)
    codes = tl.load(codes_ptr + r[:, None] * k + c[None, :], mask=mask, other=0)
    absmax = tl.load(absmax_ptr + r * n_blocks + block, mask=r < rows, other=0.0)
    values = dequantize_rows(codes, tl.reshape(absmax, (ROWS, 1)), map_ptr, BLOCK, ROWS, BLOCK)
    tl.store(out_ptr + r[:, None] * k + c[None, :], values, mask=mask)


def quantize_blockwise(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`galore_kernels.quant.quantize_blockwise` (any strides, fp32/bf16/fp16 input)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, k) tensor, got shape {tuple(x.shape)}")
    rows, k = x.shape
    n_blocks = triton.cdiv(k, BLOCK_SIZE)
    codes = torch.empty((rows, k), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((rows, n_blocks), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes, absmax.zero_()
    _, mids = code_tables(signed, x.device)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), n_blocks)
    with on_device(x):
        _quantize_kernel[grid](
            x, codes, absmax, mids, rows, k, x.stride(0), x.stride(1), n_blocks,
            BLOCK=BLOCK_SIZE, ROWS=ROWS_PER_PROGRAM,
        )
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Triton twin of :func:`galore_kernels.quant.dequantize_blockwise`: fp32 (rows, k)."""
    rows, k = codes.shape
    n_blocks = triton.cdiv(k, BLOCK_SIZE)
    if tuple(absmax.shape) != (rows, n_blocks) or codes.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 codes (rows, k) and absmax (rows, ceil(k/{BLOCK_SIZE})), got "
            f"{codes.dtype} {tuple(codes.shape)} and {tuple(absmax.shape)}"
        )
    out = torch.empty((rows, k), dtype=torch.float32, device=codes.device)
    if codes.numel() == 0:
        return out
    code_map, _ = code_tables(signed, codes.device)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), n_blocks)
    with on_device(codes):
        _dequantize_kernel[grid](
            codes.contiguous(), absmax.contiguous(), out, code_map, rows, k, n_blocks,
            BLOCK=BLOCK_SIZE, ROWS=ROWS_PER_PROGRAM,
        )
    return out
