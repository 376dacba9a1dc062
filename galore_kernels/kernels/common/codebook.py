"""@triton.jit helpers of the 8-bit format shared by the kernels: code lookup and nearest-code search.

The map and its midpoints live in global memory (1 KiB each) and stay in L1 after the first touch; the
search is the same count-the-midpoints-below rule as ``galore_kernels.quant`` (ties to the lower code).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...quant import code_midpoints, dynamic_map


@functools.lru_cache(maxsize=None)
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return dynamic_map(signed, device), code_midpoints(signed, device)


def code_tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(map[256], midpoints[255]) on ``device``, cached: the launchers pass them to every kernel."""
    return _tables(bool(signed), torch.device(device))


@triton.jit
def nearest_code(x, mids_ptr):
    """Number of midpoints strictly below x: the index of the nearest map entry, ties to the lower."""
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i
        mid = tl.load(mids_ptr + code + (step - 1))
        code = tl.where(mid < x, code + step, code)
    return code


@triton.jit
def quantize_rows(values, mids_ptr, BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Quantize a (ROWS, COLS) fp32 tile whose columns hold COLS // BLOCK whole blocks of each row.

    Returns the uint8 codes (ROWS, COLS) and the absmax (ROWS, COLS // BLOCK). Out-of-range elements must
    be zero on entry so they do not raise a block's absmax.
    """
    blocks = tl.reshape(values, (ROWS, COLS // BLOCK, BLOCK))
    absmax = tl.max(tl.abs(blocks), axis=2)
    # IEEE division, as bitsandbytes' CUDA kernel and the reference do: Triton's "/" is div.full.f32,
    # ~2 ulp off, enough to move a value across a midpoint and change its code.
    # Blocks below 2^-100 are scaled by 2^64 first (exact), where 1/absmax would overflow: quant.py.
    pre = tl.where(absmax < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)
    safe = tl.where(absmax > 0, absmax * pre, 1.0)
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    normalized = tl.reshape((blocks * pre[:, :, None]) * inv[:, :, None], (ROWS, COLS))
    return nearest_code(normalized, mids_ptr).to(tl.uint8), absmax


@triton.jit
def dequantize_rows(codes, absmax, map_ptr, BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """map[codes] · absmax for a (ROWS, COLS) tile of codes and its (ROWS, COLS // BLOCK) absmax."""
    values = tl.load(map_ptr + codes.to(tl.int32))
    blocks = tl.reshape(values, (ROWS, COLS // BLOCK, BLOCK)) * absmax[:, :, None]
    return tl.reshape(blocks, (ROWS, COLS))
