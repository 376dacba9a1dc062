"""Kernels A (project + Adam) and B (back-project + update) against the reference, under the interpreter
on CPU (and on CUDA when there is one)."""

import copy

import pytest
import torch

from galore_kernels import reference
from galore_kernels.kernels.backproject_update import backproject_update
from galore_kernels.kernels.project_adam import adam_direction, project_adam
from galore_kernels.projector import compute_projector, oriented, resolve_side
from galore_kernels.config import AdamHyper, GaLoreConfig
from galore_kernels.state import dequantized_moments, init_state
from kernel_cases import DEVICE, DTYPES, SHAPES, codes_agree, ranks_for, seed_of, tolerance
from tolerances import ABSMAX_8BIT, assert_same_rounding, rel_err

HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
SCALE = 0.7


def _warm_state(w, g, rank, proj_type, quantize, gen):
    """State after two reference steps (moments non-zero), and the gradient of the next step."""
    state = init_state(w, {"rank": rank, "proj_type": proj_type}, param_seed=3, min_8bit_size=quantize)
    cfg = GaLoreConfig(rank=rank, update_proj_gap=100, scale=SCALE, proj_type=proj_type)
    w = w.clone()
    for _ in range(2):
        noise = torch.rand(g.shape, generator=gen).to(g.dtype)
        reference.galore_adamw_step(w, g * noise, state, HYPER, cfg)
    return state


@pytest.mark.parametrize("given_s", [False, True], ids=["project", "projected"])  # PROJECTED: S is an input
@pytest.mark.parametrize("quantize", [None, 16], ids=["fp32-moments", "8bit-moments"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])  # both sides for every shape
@pytest.mark.parametrize("shape", SHAPES)
def test_project_adam_matches_reference(shape, proj_type, dtype, quantize, given_s, poisoned_empty):
    gen = torch.Generator().manual_seed(seed_of(shape, proj_type))
    for rank in ranks_for(shape):
        w = torch.randn(shape, generator=gen).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        state = _warm_state(w, g, rank, proj_type, quantize, gen)
        side = resolve_side(proj_type, shape)
        expected_state = copy.deepcopy(state)
        s = expected_state["projector"].float() @ oriented(g, side).float()
        expected_n = reference.adam_direction(s, expected_state, HYPER, SCALE)

        device_state = {k: v.to(DEVICE, copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        if given_s:
            n = adam_direction(s.to(DEVICE), device_state, HYPER, SCALE, out_dtype=device_state["projector"].dtype)
        else:
            n = project_adam(device_state["projector"], oriented(g.to(DEVICE), side), device_state, HYPER, SCALE)
        assert n.dtype == (dtype if dtype != torch.float32 else torch.float32)
        assert not torch.isnan(n).any()
        tol = tolerance(dtype)
        assert rel_err(n.cpu().float(), expected_n) <= tol, rank
        if quantize is None or "exp_avg_absmax" not in state:
            assert rel_err(device_state["exp_avg"].cpu(), expected_state["exp_avg"]) <= tolerance(torch.float32)
            assert rel_err(device_state["exp_avg_sq"].cpu(), expected_state["exp_avg_sq"]) <= tolerance(torch.float32)
            continue
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            assert rel_err(device_state[f"{name}_absmax"].cpu(), expected_state[f"{name}_absmax"]) <= ABSMAX_8BIT
        # Codes: equal, or ±1 where rounding put the value on the other side of a midpoint.
        m_values, v_values = _updated_moments(state, s)
        assert codes_agree(device_state["exp_avg"].cpu(), expected_state["exp_avg"], m_values,
                           expected_state["exp_avg_absmax"], True)
        assert codes_agree(device_state["exp_avg_sq"].cpu(), expected_state["exp_avg_sq"], v_values,
                           expected_state["exp_avg_sq_absmax"], False)


def _updated_moments(state, s):
    m, v = dequantized_moments(copy.deepcopy(state))
    return m * HYPER.beta1 + s * (1 - HYPER.beta1), v * HYPER.beta2 + s * s * (1 - HYPER.beta2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backproject_update_matches_float64(shape, side, dtype):
    gen = torch.Generator().manual_seed(seed_of(shape, side))
    m, n = shape
    d, k = (m, n) if side == "left" else (n, m)
    for rank in ranks_for(shape):
        w = torch.randn(shape, generator=gen).to(dtype)
        b = compute_projector(torch.randn(shape, generator=gen), rank, side, seed=1).to(
            dtype if dtype != torch.float32 else torch.float32
        )
        direction = torch.randn(rank, k, generator=gen).to(b.dtype)
        decay, step_size = 1 - 1e-3, 0.05
        delta = b.double().T @ direction.double()
        expected = w.double() * decay - step_size * (delta if side == "left" else delta.T)
        w_dev = w.to(DEVICE)
        backproject_update(w_dev, b.to(DEVICE), direction.to(DEVICE), side, decay=decay, step_size=step_size)
        assert w_dev.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(w_dev.cpu(), expected) <= tolerance(dtype), rank
            # On a zero weight the result is the product alone, free of the weight's own rounding.
            zero = torch.zeros(shape, device=DEVICE)
            backproject_update(zero, b.to(DEVICE), direction.to(DEVICE), side, decay=decay, step_size=step_size)
            assert rel_err(zero.cpu(), -step_size * (delta if side == "left" else delta.T)) <= tolerance(dtype)
        else:
            assert_same_rounding(w_dev, expected.to(dtype))


def test_backproject_update_rejects_shapes_that_do_not_compose():
    w = torch.zeros(5, 7, device=DEVICE)
    with pytest.raises(ValueError, match="do not compose"):
        backproject_update(w, torch.zeros(2, 6, device=DEVICE), torch.zeros(2, 7, device=DEVICE), "left",
                           decay=1.0, step_size=1.0)
