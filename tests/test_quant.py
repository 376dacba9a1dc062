"""The 8-bit format's reference (galore_kernels.quant) against bitsandbytes, which defines the format:
the dynamic map, codes and absmax, and the round-trip error."""

import pytest
import torch

# bitsandbytes defines the format; CI installs it (test extra), a bare GPU image may not have it.
bnbf = pytest.importorskip("bitsandbytes.functional")

from case_ids import case_id
from galore_kernels.quant import dequantize_blockwise, dynamic_map, quantize_blockwise
from tolerances import ABSMAX_8BIT, BITSANDBYTES_TIE_RTOL, ROUND_TRIP_SLACK

SIGNED_AND_UNSIGNED = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])

# bitsandbytes' PyTorch implementation of blockwise quantization, documented to follow its CUDA kernel.
# Its native CPU library takes a faster approximate search (codes seen up to 7 apart from the nearest),
# so the comparison goes to the implementation that defines the format.
_BNB_QUANTIZE = torch.ops.bitsandbytes.quantize_blockwise.default
_BNB_REFERENCE_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def bnb_quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _BNB_QUANTIZE.redispatch(_BNB_REFERENCE_KEYS, x.flatten(), bnbf.create_dynamic_map(signed), 256)


@SIGNED_AND_UNSIGNED
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, bnbf.create_dynamic_map(signed))


def _moment_like(shape, signed, generator):
    x = torch.randn(shape, generator=generator) * torch.logspace(-6, 1, shape[-1])
    return x if signed else x.square()


@SIGNED_AND_UNSIGNED
@pytest.mark.parametrize("shape", [(8, 1024), (3, 256), (1, 4096)], ids=case_id)
def test_codes_and_absmax_equal_bitsandbytes_on_256_multiples(signed, shape):
    x = _moment_like(shape, signed, torch.Generator().manual_seed(11))
    codes, absmax = quantize_blockwise(x, signed=signed)
    ref_codes, ref_absmax = bnb_quantize(x, signed)
    differ = codes.flatten().int() - ref_codes.int()
    assert differ.abs().max() <= 1
    # Any ±1 disagreement must sit on a tie: equally near both entries in fp32.
    code = dynamic_map(signed)
    scaled = (x.reshape(-1, 256) * (1.0 / absmax.reshape(-1, 1))).flatten()
    for i in differ.nonzero().flatten().tolist():
        a, b = code[codes.flatten()[i].long()], code[ref_codes[i].long()]
        assert torch.isclose((scaled[i] - a).abs(), (scaled[i] - b).abs(), rtol=BITSANDBYTES_TIE_RTOL, atol=0)
    assert torch.equal(absmax.flatten(), ref_absmax)


@SIGNED_AND_UNSIGNED
@pytest.mark.parametrize("shape", [(5, 300), (2, 67), (1, 513), (4, 256)], ids=case_id)
def test_round_trip_error_bounded_by_map_spacing(signed, shape):
    x = _moment_like(shape, signed, torch.Generator().manual_seed(5))
    codes, absmax = quantize_blockwise(x, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == shape
    assert absmax.shape == (shape[0], -(-shape[1] // 256))
    y = dequantize_blockwise(codes, absmax, signed=signed)
    # Nearest-entry rounding: the error is at most half the gap to the neighbouring map entry.
    code = dynamic_map(signed)
    gaps = torch.diff(code)
    left = torch.cat([gaps[:1], gaps])
    right = torch.cat([gaps, gaps[-1:]])
    half_gap = torch.maximum(left, right)[codes.long()] / 2
    scale = absmax.repeat_interleave(256, dim=1)[:, : shape[1]]
    assert ((x - y).abs() <= half_gap * scale * (1 + ROUND_TRIP_SLACK) + 1e-30).all()


def test_short_last_block_is_its_own_block():
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(2))
    x[:, 256:] *= 1e-3
    codes, absmax = quantize_blockwise(x, signed=True)
    for row in range(3):
        assert absmax[row, 0] == x[row, :256].abs().max()
        assert absmax[row, 1] == x[row, 256:].abs().max()
        tail_codes, tail_absmax = quantize_blockwise(x[row : row + 1, 256:], signed=True)
        assert torch.equal(codes[row, 256:], tail_codes[0])
        assert abs(tail_absmax.item() - absmax[row, 1].item()) <= ABSMAX_8BIT * absmax[row, 1].item()


@SIGNED_AND_UNSIGNED
def test_zero_block_dequantizes_to_zero(signed):
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(3)).abs()
    x[1, :256] = 0
    codes, absmax = quantize_blockwise(x, signed=signed)
    assert absmax[1, 0] == 0
    y = dequantize_blockwise(codes, absmax, signed=signed)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1, :256], torch.zeros(256))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.randn(10), signed=True)
    codes, absmax = quantize_blockwise(torch.randn(2, 300), signed=True)
    with pytest.raises(ValueError, match="absmax shape"):
        dequantize_blockwise(codes, absmax[:, :1], signed=True)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_blockwise(codes.int(), absmax, signed=True)
