"""One GaLore parameter stepped by backend="triton" against backend="torch" on the same device: a small
case everywhere (the interpreter on CPU) and the issue's real sizes on CUDA (marker ``cuda``)."""

import pytest
import torch

from galore_kernels import functional, reference
from galore_kernels.config import AdamHyper, GaLoreConfig
from galore_kernels.state import dequantized_moments, init_state
from kernel_cases import DEVICE
from tolerances import rel_err

HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STEPS, GAP = 7, 3  # refreshes at steps 0, 3 and 6
MOMENT_TOL = 1e-2  # measured on the small case: fp32 moments 1e-5, 8-bit 1.6e-3


def _low_rank_gradient(shape, gen, device, dtype):
    m, n = shape
    u = torch.randn(m, 32, generator=gen)
    g = u @ torch.randn(32, n, generator=gen) / 32 + 0.01 * torch.randn(m, n, generator=gen)
    return g.to(device=device, dtype=dtype)


def _compare_backends(shape, rank, dtype, quantize, device):
    gen = torch.Generator().manual_seed(0)
    # LLM-like weight scale: a 16-bit weight's ulp stays well below one step's update.
    w_torch = (0.02 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    w_triton = w_torch.clone()
    w0 = w_torch.clone()
    cfg = GaLoreConfig(rank=rank, update_proj_gap=GAP)
    group = {"rank": rank, "proj_type": "std"}
    s_torch = init_state(w_torch, group, param_seed=1, min_8bit_size=quantize)
    s_triton = init_state(w_triton, group, param_seed=1, min_8bit_size=quantize)
    for _ in range(STEPS):
        g = _low_rank_gradient(shape, gen, device, dtype)
        functional.galore_adamw_step(w_torch, g, s_torch, HYPER, cfg, backend="torch")
        functional.galore_adamw_step(w_triton, g, s_triton, HYPER, cfg, backend="triton")
    # Distance travelled, so that a lost or mis-scaled update cannot hide inside the weight's norm.
    moved_triton, moved_torch = (w_triton.double() - w0.double()), (w_torch.double() - w0.double())
    # Measured on the small case: fp32 1.1e-5, 8-bit moments 9.6e-4, bf16 9.4e-3. The refreshes differ
    # in rounding (sketch products, then QR and SVD: projectors ~1e-5 apart); an 8-bit code that lands
    # on the other side of a midpoint moves its element by one map step; with bf16 weights the projector
    # and the kernel's N buffer are bf16 (2^-9 each) while the reference keeps N in fp32.
    tol = 2e-2 if dtype != torch.float32 else (1e-2 if quantize else 1e-4)
    assert rel_err(moved_triton, moved_torch) <= tol
    m_triton, v_triton = dequantized_moments(s_triton)
    m_torch, v_torch = dequantized_moments(s_torch)
    assert rel_err(m_triton, m_torch) <= MOMENT_TOL and rel_err(v_triton, v_torch) <= MOMENT_TOL
    b_triton, b_torch = s_triton["projector"].double(), s_torch["projector"].double()
    assert rel_err(b_triton.T @ b_triton, b_torch.T @ b_torch) <= 1e-3
    assert s_triton["step"] == s_torch["step"] == STEPS


@pytest.mark.parametrize("quantize", [None, 4096], ids=["fp32-moments", "8bit-moments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small(dtype, quantize):
    _compare_backends((96, 160), 16, dtype, quantize and 256, DEVICE)


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [None, 4096], ids=["fp32-moments", "8bit-moments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank", [((4096, 11008), 512), ((11008, 4096), 256), ((2048, 5461), 1024)])
def test_real_sizes(shape, rank, dtype, quantize):
    _compare_backends(shape, rank, dtype, quantize, "cuda")
