"""Shared inputs of the kernel tests: shapes that are multiples of no block size, ranks, dtypes, devices,
seeds, and the check that two sets of 8-bit codes agree."""

import zlib

import torch

from galore_kernels.quant import code_midpoints
from tolerances import BF16_OPERANDS, CODE_TIE_ATOL, CODE_TIE_RTOL, FP32_INTERPRETER, FP32_TF32_GPU

# (m, n): multiples of no tile size, a row length that is no multiple of 256, and a single row.
SHAPES = [(67, 300), (300, 67), (1, 513)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ranks_for(shape):
    """1, a middle rank and min(m, n)."""
    low = min(shape)
    return sorted({1, max(1, low // 3), low})


def tolerance(dtype, device=DEVICE):
    if dtype != torch.float32:
        return BF16_OPERANDS
    return FP32_TF32_GPU if device == "cuda" else FP32_INTERPRETER


def codes_agree(ours, ref, values, absmax, signed, block=256):
    """8-bit codes equal, or ±1 apart where the value sits within fp32 rounding of a midpoint."""
    diff = (ours.int() - ref.int()).abs()
    if diff.max() > 1:
        return False
    if diff.max() == 0:
        return True
    mids = code_midpoints(signed, values.device)
    scale = absmax.repeat_interleave(block, dim=1)[:, : values.shape[1]]
    normalized = values / torch.where(scale > 0, scale, torch.ones_like(scale))
    lower = torch.minimum(ours, ref).long().clamp(max=254)
    near_tie = (normalized - mids[lower]).abs() <= CODE_TIE_RTOL * normalized.abs().clamp(min=1e-30) + CODE_TIE_ATOL
    return bool(near_tie[diff == 1].all())


def seed_of(*key) -> int:
    """A stable seed for a test case (Python's str hash changes between runs)."""
    return zlib.crc32(repr(key).encode())


def power_law_matrix(m: int, n: int, exponent: float, seed: int):
    """(G, σ): an m × n fp32 matrix with singular values σ_i = i^exponent and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** exponent
    return (u * sigma) @ v.T, sigma
