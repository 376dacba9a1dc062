"""The randomized refresh's sketch Y = G'·Ω, with Ω generated in registers, never stored.

Reference: :func:`galore_kernels.projector.gaussian_sketch`.

Ω[i, j] = tl.randn(seed, i·width + j), the numbers :func:`galore_kernels.rng.randn` gives the reference,
so both backends sketch with the same Ω. Each program owns a (BLOCK_M × BLOCK_N) tile of Y and draws the
Ω tiles it needs as it walks k; the rest of the refresh (QR, power iterations, the small SVD) stays in
torch, where cuSOLVER and cuBLAS do it (see galore_kernels.projector).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common.runtime import dot_precision, on_device


# The seed changes with every refresh: keep it a plain runtime argument, never specialized.
@triton.jit(do_not_specialize=["seed"])
def _sketch_kernel(
    g_ptr, y_ptr,
    d, k, width, seed,
    stride_gd, stride_gk,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + ks
        g = tl.load(
            g_ptr + rows[:, None] * stride_gd + kk[None, :].to(tl.int64) * stride_gk,
            mask=(rows[:, None] < d) & (kk[None, :] < k), other=0.0,
        ).to(tl.float32)
        # Rows of Ω past k meet zero columns of g, so they need no mask; columns past width are cut at the store.
        # int32 counters (the launcher checks k·width < 2^31): Triton versions differ in how tl.randn
        # splits int64 offsets, but all agree with the reference's (offset, 0) counter for int32 ones.
        omega = tl.randn(seed, kk[:, None] * width + cols[None, :].to(tl.int32))
        acc = tl.dot(g, omega, acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + rows[:, None] * width + cols[None, :], acc, mask=(rows[:, None] < d) & (cols[None, :] < width))


def tile_sizes(d: int, k: int, width: int) -> dict[str, int]:
    """64-row tiles; columns up to 64 wide (a refresh sketch is r + p ≤ ~1032 wide).

    With k not a multiple of 16 the gradient's rows may start unaligned and its loads are not vectorized:
    on 4 warps sm_80 then spilled 12 bytes (168 registers, 2048 × 5461 fp32); 8 warps spill nothing.
    """
    warps = 4 if k % 16 == 0 else 8
    return {"BLOCK_M": 64, "BLOCK_N": 64 if width > 32 else 32, "BLOCK_K": 32, "num_warps": warps}


def gaussian_sketch(g: torch.Tensor, seed: int, width: int) -> torch.Tensor:
    """Y = g·Ω (d × width, fp32) for g (d × k, any strides and float dtype); equals the reference's."""
    d, k = g.shape
    if k * width >= 2**31:
        raise ValueError(f"sketch of {k} × {width} needs 64-bit counters; the kernel supports k·width < 2^31")
    y = torch.empty((d, width), dtype=torch.float32, device=g.device)
    if y.numel() == 0:
        return y
    tiles = tile_sizes(d, k, width)
    grid = (triton.cdiv(d, tiles["BLOCK_M"]), triton.cdiv(width, tiles["BLOCK_N"]))
    with on_device(g):
        _sketch_kernel[grid](
            g, y, d, k, width, seed, g.stride(0), g.stride(1), DOT_PRECISION=dot_precision(torch.float32), **tiles
        )
    return y
