"""Whole optimizer steps of one GaLore parameter, backend="triton" against backend="torch" on the same
device: a small case everywhere (the interpreter on CPU) and the GaLore paper's Llama layer sizes (7B and
1B) on CUDA (marker ``cuda``). Each kernel has its own quick test (tests/test_kernels_*.py); these seven
steps through all of them take seconds per case under the interpreter, so they are marked ``slow``."""

import pytest
import torch

from case_ids import case_id
from galore_kernels import functional
from galore_kernels.config import AdamHyper, GaLoreConfig
from galore_kernels.state import dequantized_moments, init_state
from kernel_cases import DEVICE
from tolerances import (
    BACKENDS_STATE,
    BACKENDS_STEP_MOMENTS,
    BACKENDS_STEP_MOVED_8BIT,
    BACKENDS_STEP_MOVED_BF16,
    BACKENDS_STEP_MOVED_FP32,
    rel_err,
)

pytestmark = pytest.mark.slow

HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STEPS, GAP = 7, 3  # refreshes at steps 0, 3 and 6
# min_8bit_size of the state: 4096 quantizes the real sizes' moments; the small case passes 256.
MOMENTS = [pytest.param(None, id="fp32_moments"), pytest.param(4096, id="8bit_moments")]


def _low_rank_gradient(shape, gen, device, dtype):
    m, n = shape
    u = torch.randn(m, 32, generator=gen)
    g = u @ torch.randn(32, n, generator=gen) / 32 + 0.01 * torch.randn(m, n, generator=gen)
    return g.to(device=device, dtype=dtype)


def _compare_backends(shape, rank, dtype, min_8bit_size, device):
    gen = torch.Generator().manual_seed(0)
    # LLM-like weight scale: a 16-bit weight's ulp stays well below one step's update.
    w_torch = (0.02 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    w_triton = w_torch.clone()
    w0 = w_torch.clone()
    config = GaLoreConfig(rank=rank, update_proj_gap=GAP)
    group = {"rank": rank, "proj_type": "std"}
    s_torch = init_state(w_torch, group, param_seed=1, min_8bit_size=min_8bit_size)
    s_triton = init_state(w_triton, group, param_seed=1, min_8bit_size=min_8bit_size)
    for _ in range(STEPS):
        g = _low_rank_gradient(shape, gen, device, dtype)
        functional.galore_adamw_step(w_torch, g, s_torch, HYPER, config, backend="torch")
        functional.galore_adamw_step(w_triton, g, s_triton, HYPER, config, backend="triton")
    # Distance travelled, so that a lost or mis-scaled update cannot hide inside the weight's norm.
    moved_triton, moved_torch = (w_triton.double() - w0.double()), (w_torch.double() - w0.double())
    if dtype != torch.float32:
        moved_tol = BACKENDS_STEP_MOVED_BF16
    else:
        moved_tol = BACKENDS_STEP_MOVED_8BIT if min_8bit_size else BACKENDS_STEP_MOVED_FP32
    assert rel_err(moved_triton, moved_torch) <= moved_tol
    m_triton, v_triton = dequantized_moments(s_triton)
    m_torch, v_torch = dequantized_moments(s_torch)
    assert rel_err(m_triton, m_torch) <= BACKENDS_STEP_MOMENTS
    assert rel_err(v_triton, v_torch) <= BACKENDS_STEP_MOMENTS
    b_triton, b_torch = s_triton["projector"].double(), s_torch["projector"].double()
    assert rel_err(b_triton.T @ b_triton, b_torch.T @ b_torch) <= BACKENDS_STATE
    assert s_triton["step"] == s_torch["step"] == STEPS


@pytest.mark.parametrize("min_8bit_size", MOMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
def test_triton_steps_equal_torch_steps_at_a_small_size(dtype, min_8bit_size):
    _compare_backends((96, 160), 16, dtype, min_8bit_size and 256, DEVICE)


@pytest.mark.cuda
@pytest.mark.parametrize("min_8bit_size", MOMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize(
    "shape, rank", [((4096, 11008), 512), ((11008, 4096), 256), ((2048, 5461), 1024)],
    ids=lambda value: case_id(value) or f"rank{value}",
)
def test_triton_steps_equal_torch_steps_at_llama_sizes(shape, rank, dtype, min_8bit_size):
    _compare_backends(shape, rank, dtype, min_8bit_size, "cuda")
