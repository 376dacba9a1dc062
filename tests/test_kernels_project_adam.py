"""kernels/project_adam.py against reference.project_adam and reference.adam_direction, under the
interpreter on CPU (and on CUDA when there is one): the direction N and the moments it leaves behind."""

import copy

import pytest
import torch

from case_ids import case_id
from galore_kernels import reference
from galore_kernels.config import AdamHyper, GaLoreConfig
from galore_kernels.kernels.project_adam import adam_direction, project_adam
from galore_kernels.projector import oriented, resolve_side
from galore_kernels.state import dequantized_moments, init_state
from kernel_cases import DEVICE, DTYPES, SHAPES, codes_agree, ranks_for, seed_of, tolerance
from tolerances import ABSMAX_8BIT, rel_err

HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
SCALE = 0.7
# min_8bit_size of the state: 16 quantizes the moments of every rank in ranks_for.
MOMENTS = [pytest.param(None, id="fp32_moments"), pytest.param(16, id="8bit_moments")]


def _warm_state(w, g, rank, proj_type, min_8bit_size, gen):
    """State after two reference steps (moments non-zero), ready for the step on ``g``."""
    state = init_state(w, {"rank": rank, "proj_type": proj_type}, param_seed=3, min_8bit_size=min_8bit_size)
    config = GaLoreConfig(rank=rank, update_proj_gap=100, scale=SCALE, proj_type=proj_type)
    w = w.clone()
    for _ in range(2):
        noise = torch.rand(g.shape, generator=gen).to(g.dtype)
        reference.galore_adamw_step(w, g * noise, state, HYPER, config)
    return state


def _updated_moments(state, s):
    """The fp32 moments one Adam update on ``s`` gives before they are quantized again."""
    m, v = dequantized_moments(copy.deepcopy(state))
    return m * HYPER.beta1 + s * (1 - HYPER.beta1), v * HYPER.beta2 + s * s * (1 - HYPER.beta2)


def _check_against_reference(shape, proj_type, dtype, min_8bit_size, launcher):
    """For every rank: the kernel ``launcher`` and the reference function of the same name, each on its
    own copy of a warm state, give the same N and leave the same moments."""
    gen = torch.Generator().manual_seed(seed_of(shape, proj_type))
    side = resolve_side(proj_type, shape)
    for rank in ranks_for(shape):
        w = torch.randn(shape, generator=gen).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        state = _warm_state(w, g, rank, proj_type, min_8bit_size, gen)
        expected_state = copy.deepcopy(state)
        device_state = {k: v.to(DEVICE, copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        projector, g_oriented = state["projector"], oriented(g, side)
        s = projector.float() @ g_oriented.float()
        if launcher == "project_adam":
            expected_n = reference.project_adam(projector, g_oriented, expected_state, HYPER, SCALE)
            n = project_adam(device_state["projector"], oriented(g.to(DEVICE), side), device_state, HYPER, SCALE)
        else:
            expected_n = reference.adam_direction(s, expected_state, HYPER, SCALE)
            n = adam_direction(s.to(DEVICE), device_state, HYPER, SCALE, out_dtype=projector.dtype)
        # N comes in the projector's dtype: fp32 for fp32 weights, the weight's 16-bit dtype otherwise.
        assert n.dtype == dtype
        assert not torch.isnan(n).any()
        assert rel_err(n.cpu().float(), expected_n) <= tolerance(dtype), rank
        if "exp_avg_absmax" not in state:
            assert rel_err(device_state["exp_avg"].cpu(), expected_state["exp_avg"]) <= tolerance(torch.float32)
            assert rel_err(device_state["exp_avg_sq"].cpu(), expected_state["exp_avg_sq"]) <= tolerance(torch.float32)
            continue
        for name in ("exp_avg", "exp_avg_sq"):
            assert rel_err(device_state[f"{name}_absmax"].cpu(), expected_state[f"{name}_absmax"]) <= ABSMAX_8BIT
        # Codes: equal, or ±1 where rounding put the value on the other side of a midpoint.
        m_values, v_values = _updated_moments(state, s)
        assert codes_agree(device_state["exp_avg"].cpu(), expected_state["exp_avg"], m_values,
                           expected_state["exp_avg_absmax"], True)
        assert codes_agree(device_state["exp_avg_sq"].cpu(), expected_state["exp_avg_sq"], v_values,
                           expected_state["exp_avg_sq_absmax"], False)


@pytest.mark.parametrize("min_8bit_size", MOMENTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])  # both sides for every shape
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_project_adam_matches_reference(shape, proj_type, dtype, min_8bit_size, poisoned_empty):
    _check_against_reference(shape, proj_type, dtype, min_8bit_size, "project_adam")


@pytest.mark.parametrize("min_8bit_size", MOMENTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_adam_direction_matches_reference(shape, proj_type, dtype, min_8bit_size, poisoned_empty):
    """The epilogue alone, on a given fp32 S: what layer-wise accumulation runs after summing projections."""
    _check_against_reference(shape, proj_type, dtype, min_8bit_size, "adam_direction")
