"""kernels/quantize_blockwise.py against quant.quantize_blockwise and quant.dequantize_blockwise: the
device codebook alone, with no GEMM or Adam arithmetic in front of it."""

import pytest
import torch

from case_ids import case_id
from galore_kernels import quant
from galore_kernels.kernels.quantize_blockwise import dequantize_blockwise, quantize_blockwise
from kernel_cases import DEVICE, DTYPES, codes_agree, seed_of
from tolerances import ABSMAX_8BIT, rel_err


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", [(67, 300), (300, 67), (1, 513), (4, 256), (3, 1)], ids=case_id)
def test_quantize_blockwise_matches_reference(shape, dtype, signed, poisoned_empty):
    gen = torch.Generator().manual_seed(seed_of(shape, signed))
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 1, shape[1])
    x = (x if signed else x.square()).to(dtype)
    codes, absmax = quantize_blockwise(x.to(DEVICE), signed=signed)
    ref_codes, ref_absmax = quant.quantize_blockwise(x, signed=signed)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert not torch.isnan(absmax).any()
    assert rel_err(absmax.cpu(), ref_absmax) <= ABSMAX_8BIT
    assert codes_agree(codes.cpu(), ref_codes, x.float(), ref_absmax, signed)
    values = dequantize_blockwise(codes, absmax, signed=signed)
    assert torch.equal(values.cpu(), quant.dequantize_blockwise(codes.cpu(), absmax.cpu(), signed=signed))


def test_quantize_blockwise_reads_through_strides():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).T.to(DEVICE)  # (40, 300), strided
    codes, absmax = quantize_blockwise(x, signed=True)
    ref_codes, ref_absmax = quant.quantize_blockwise(x.cpu().contiguous(), signed=True)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)


def test_zero_blocks_and_empty_tensors():
    x = torch.zeros(2, 300, device=DEVICE)
    x[1, 5] = 3.0
    codes, absmax = quantize_blockwise(x, signed=True)
    assert absmax[0].abs().sum() == 0 and absmax[1, 1] == 0
    assert torch.equal(dequantize_blockwise(codes, absmax, signed=True), x)
    codes, absmax = quantize_blockwise(torch.zeros(0, 8, device=DEVICE), signed=False)
    assert codes.shape == (0, 8) and absmax.shape == (0, 1)
