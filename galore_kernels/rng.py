"""Counter-based Gaussian numbers: the sketch matrix of the randomized refresh, as a pure function.

``randn(seed, offsets)`` reproduces Triton's ``tl.randn(seed, offsets)`` (Philox4x32-10, then Box-Muller on
the first two words) with int64 tensor arithmetic, so a kernel can generate the sketch Ω in registers
from (seed, index) while this module materializes the same numbers for the reference. Results depend only
on (seed, offset): the same on every device, rank and rerun.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GaussianSource", "randn", "randn_range", "sketch_seed"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
# tl.randn's uint32 → [0, 1) scale: the largest float below 2^-31 that keeps MAX_INT * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of const · x for a uint32 constant and uint32 values held in int64.

    The full product needs 64 unsigned bits, which int64 cannot hold, so x is split into 16-bit halves.
    """
    x_hi, x_lo = x >> 16, x & 0xFFFF
    prod_lo = const * x_lo
    mid = const * x_hi + (prod_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (prod_lo & 0xFFFF)


def _philox_first_two(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1


def _to_uniform(words: torch.Tensor) -> torch.Tensor:
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normal fp32 numbers, one per int64 offset, equal to ``tl.randn(seed, offsets)``.

    >>> randn(7, torch.arange(3)).shape
    torch.Size([3])
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    words0, words1 = _philox_first_two(int(seed), offsets.to(torch.int64))
    u1 = torch.clamp_min(_to_uniform(words0), 1.0e-7)
    u2 = _to_uniform(words1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(torch.tensor(6.283185307179586, dtype=torch.float32) * u2)


# (seed, first offset, count, device) → the fp32 numbers randn(seed, first … first + count − 1).
GaussianSource = Callable[[int, int, int, torch.device], torch.Tensor]


def randn_range(seed: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`randn` of the consecutive offsets ``first`` … ``first + count − 1``: the reference's
    :data:`GaussianSource` (the native CPU library has its own, galore_kernels.native.randn_range).

    >>> bool(torch.equal(randn_range(7, 2, 3), randn(7, torch.arange(2, 5))))
    True
    """
    return randn(seed, torch.arange(first, first + count, device=device, dtype=torch.int64))


def sketch_seed(param_seed: int, step: int) -> int:
    """The Philox key of one refresh: the parameter's seed in the low word, the step in the high word.

    Distinct (parameter, step) pairs never share a key while both fit in 32 bits.
    """
    return ((int(step) & 0xFFFFFFFF) << 32) | (int(param_seed) & 0xFFFFFFFF)
