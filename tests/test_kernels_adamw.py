"""kernels/adamw.py (many tensors' AdamW step in one launch) against reference.adamw: weights, moments
and steps after three steps, for fp32 and 8-bit moments."""

import copy

import pytest
import torch

from case_ids import case_id
from galore_kernels import reference
from galore_kernels.config import AdamHyper
from galore_kernels.kernels.adamw import adamw
from galore_kernels.state import dequantized_moments, init_state
from kernel_cases import DEVICE, DTYPES, codes_agree, tolerance
from tolerances import ABSMAX_8BIT, FP32_INTERPRETER, assert_same_rounding, rel_err

HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
# Lengths around the block sizes (256 for 8-bit moments, 1024 for fp32), a single element, an empty
# tensor and a 3-D one: all in the same launch.
SHAPES = [(300,), (7, 40), (1,), (513,), (0, 4), (3, 2, 100)]
# min_8bit_size of the states: 64 quantizes the moments of the tensors of at least 64 elements.
MOMENTS = [pytest.param(None, id="fp32_moments"), pytest.param(64, id="8bit_moments")]


@pytest.mark.parametrize("min_8bit_size", MOMENTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_adamw_matches_reference(dtype, min_8bit_size, poisoned_empty):
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    states = [init_state(p, {}, param_seed=0, min_8bit_size=min_8bit_size) for p in params]
    ref_params, ref_states = [p.clone() for p in params], copy.deepcopy(states)
    dev_params = [p.to(DEVICE, copy=True) for p in params]
    dev_states = [
        {k: v.to(DEVICE, copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in states
    ]
    # The launcher takes one moment format per launch; 8-bit states of tensors below min_8bit_size keep
    # fp32 moments and go in a launch of their own, as the optimizer buckets them.
    launches = {}
    for i, state in enumerate(states):
        launches.setdefault("exp_avg_absmax" in state, []).append(i)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        reference.adamw(ref_params, grads, ref_states, HYPER)
        for members in launches.values():
            adamw([dev_params[i] for i in members], [grads[i].to(DEVICE) for i in members],
                  [dev_states[i] for i in members], HYPER)
    for p, rp, s, rs in zip(dev_params, ref_params, dev_states, ref_states):
        assert s["step"] == rs["step"] == 3
        if p.numel() == 0:
            continue
        assert p.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(p.cpu(), rp) <= tolerance(dtype)
        else:
            assert_same_rounding(p, rp)
        if "exp_avg_absmax" in s:
            m_values, v_values = dequantized_moments(copy.deepcopy(rs))
            for name, values, signed in (("exp_avg", m_values, True), ("exp_avg_sq", v_values, False)):
                assert rel_err(s[f"{name}_absmax"].cpu(), rs[f"{name}_absmax"]) <= ABSMAX_8BIT
                assert codes_agree(s[name].cpu(), rs[name], values, rs[f"{name}_absmax"], signed)
        else:
            assert rel_err(s["exp_avg"].cpu(), rs["exp_avg"]) <= FP32_INTERPRETER
            assert rel_err(s["exp_avg_sq"].cpu(), rs["exp_avg_sq"]) <= FP32_INTERPRETER
