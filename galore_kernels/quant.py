"""The 8-bit optimizer-state format (docs/DESIGN.md §4): dynamic maps and row-blockwise quantization.

Codes index a 256-entry map that is dense near zero and sparse near ±1 (bitsandbytes' "dynamic" data
type); each block of ``block_size`` consecutive elements *within a row* is scaled by its absolute
maximum before the lookup. For a row length that is a multiple of ``block_size`` the codes and absmax
are byte-identical to bitsandbytes' flat blockwise layout; otherwise the last block of each row is short.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["dynamic_map", "code_midpoints", "quantize_blockwise", "dequantize_blockwise", "BLOCK_SIZE"]

BLOCK_SIZE = 256
# Blocks whose absmax is below SUBNORMAL_ABSMAX are scaled by PRESCALE before the reciprocal (see
# quantize_blockwise); the native library and the Triton codebook use the same two numbers.
SUBNORMAL_ABSMAX = 2.0**-100
PRESCALE = 2.0**64
_MAX_EXPONENT_BITS = 7
_NON_SIGN_BITS = 7


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Exponent i (0..6) spans the decade 10^(i-6)..10^(i-5); its fraction bits shrink as the exponent
    # grows, so the map has most resolution near zero. Each decade contributes the midpoints of an even
    # split of [0.1, 1]; signed maps mirror them. With 7 exponent bits there are no extra linear items.
    values: list[float] = []
    for i in range(_MAX_EXPONENT_BITS):
        fraction_bits = i + _NON_SIGN_BITS - _MAX_EXPONENT_BITS + (0 if signed else 1)
        bounds = torch.linspace(0.1, 1, 2**fraction_bits + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (-(_MAX_EXPONENT_BITS - 1) + i)
        values += (decade * means).tolist()
        if signed:
            values += (-decade * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:
        raise AssertionError(f"dynamic map has {len(values)} entries, expected 256")
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry fp32 dynamic map, ascending: signed for first moments, unsigned for second.

    Equal to ``bitsandbytes.functional.create_dynamic_map(signed)``.

    >>> dynamic_map(True)[[0, 255]]
    tensor([-0.9930,  1.0000])
    """
    return _dynamic_map_cpu(bool(signed)).to(device=device, copy=True)


@functools.lru_cache(maxsize=None)
def _midpoints_cpu(signed: bool) -> torch.Tensor:
    code = _dynamic_map_cpu(signed)
    return (code[:-1] + code[1:]) / 2.0


def code_midpoints(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 255 midpoints between neighbouring map entries: a value's code is how many lie below it."""
    return _midpoints_cpu(bool(signed)).to(device=device, copy=True)


def _check_2d(x: torch.Tensor, block_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, k) tensor, got shape {tuple(x.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows, k) → (rows, nblocks, block_size), zero-padding the last block of each row."""
    rows, k = x.shape
    nblocks = -(-k // block_size)
    pad = nblocks * block_size - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, nblocks, block_size)


def quantize_blockwise(
    x: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (rows, k) tensor to uint8 codes (rows, k) and fp32 absmax (rows, ceil(k/block_size)).

    Each element takes the code of the nearest map entry to ``x · (1/absmax)`` (ties to the lower code).
    Scaling by the reciprocal, as bitsandbytes' CUDA kernel and its PyTorch reference do, keeps the codes
    byte-identical to theirs. A block of zeros gets absmax 0 and the code of the map's zero.

    >>> codes, absmax = quantize_blockwise(torch.randn(4, 300), signed=True)
    >>> codes.shape, absmax.shape
    (torch.Size([4, 300]), torch.Size([4, 2]))
    """
    _check_2d(x, block_size)
    rows, k = x.shape
    blocks = _blocked(x.float(), block_size)
    absmax = blocks.abs().amax(dim=-1)
    # A block with absmax < 2^-100 is first scaled by 2^64 (exact: a power of two): 1/absmax would
    # overflow below about 2.9e-39, which a first moment reaches after ~740 steps of β1 decay without
    # gradient, and 0·inf is NaN (coded 255, +1.0). An all-zero block scales by 1 instead of 1/0: its
    # values are zero either way. Other blocks are untouched: bitsandbytes' codes stay byte-identical.
    pre = torch.where(absmax < SUBNORMAL_ABSMAX, PRESCALE, 1.0).unsqueeze(-1)
    scaled_absmax = absmax.unsqueeze(-1) * pre
    inv_scale = torch.where(scaled_absmax > 0, 1.0 / scaled_absmax, torch.ones_like(scaled_absmax))
    normalized = ((blocks * pre) * inv_scale).reshape(rows, -1)
    if normalized.shape[1] != k:
        normalized = normalized[:, :k].contiguous()
    # bucketize(right=False) counts midpoints strictly below the value: the nearest entry, ties low.
    codes = torch.bucketize(normalized, _midpoints_cpu(bool(signed)).to(x.device), right=False)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``map[code] * absmax`` as a (rows, k) fp32 tensor.

    >>> x = torch.randn(2, 512)
    >>> y = dequantize_blockwise(*quantize_blockwise(x, signed=True), signed=True)
    >>> bool(((x - y).abs() <= 0.02 * x.abs().amax()).all())
    True
    """
    _check_2d(codes, block_size)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    rows, k = codes.shape
    nblocks = -(-k // block_size)
    if tuple(absmax.shape) != (rows, nblocks):
        raise ValueError(
            f"absmax shape {tuple(absmax.shape)} does not match codes {tuple(codes.shape)} "
            f"with block_size {block_size}: expected {(rows, nblocks)}"
        )
    values = _dynamic_map_cpu(bool(signed)).to(codes.device)[codes.long()]
    blocks = _blocked(values, block_size) * absmax.float().unsqueeze(-1)
    return blocks.reshape(rows, -1)[:, :k]
