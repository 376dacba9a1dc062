"""The reference step against an independent float64 transcription of the numerics contract
(docs/DESIGN.md §3)."""

import dataclasses
import math

import pytest
import torch

from case_ids import case_id
from galore_kernels.config import AdamHyper, GaLoreConfig
from galore_kernels.quant import dequantize_blockwise
from galore_kernels.reference import adamw, galore_adamw_step
from galore_kernels.state import init_state
from tolerances import BF16_OPERANDS, FP32_INTERPRETER, MAP_RESOLUTION_8BIT, assert_same_rounding, rel_err

HYPER = AdamHyper(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)


class Float64Adam:
    """docs/DESIGN.md §3 steps 4–6 in float64, on whatever S the projection gives."""

    def __init__(self, shape):
        self.m = torch.zeros(shape, dtype=torch.float64)
        self.v = torch.zeros(shape, dtype=torch.float64)
        self.t = 0

    def direction(self, s, hyper):
        self.m = hyper.beta1 * self.m + (1 - hyper.beta1) * s
        self.v = hyper.beta2 * self.v + (1 - hyper.beta2) * s * s
        return self.m / (self.v.sqrt() + hyper.eps)

    def apply(self, w, delta, hyper):
        t = self.t + 1
        step_size = hyper.lr * math.sqrt(1 - hyper.beta2**t) / (1 - hyper.beta1**t)
        self.t = t
        return w * (1 - hyper.lr * hyper.weight_decay) - step_size * delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=case_id)
@pytest.mark.parametrize(
    "shape, proj_type", [((24, 40), "std"), ((40, 24), "std"), ((24, 40), "reverse_std"), ((20, 30), "full")],
    ids=case_id,
)
@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_galore_step_matches_float64(dtype, shape, proj_type, svd):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(dtype)
    # "full" projects onto singular vectors on both sides, so on a refresh step S is diagonal and its
    # off-diagonal entries are rounding noise that Adam's m/√v normalizes to ±1: a larger ε keeps that
    # step well conditioned enough to compare against float64.
    hyper = dataclasses.replace(HYPER, eps=1e-2) if proj_type == "full" else HYPER
    config = GaLoreConfig(
        rank=6, update_proj_gap=3, scale=0.7, proj_type=proj_type, svd=svd, svd_oversample=4, svd_power_iters=1
    )
    group = {"rank": config.rank, "proj_type": proj_type}
    state = init_state(w, group, param_seed=5, min_8bit_size=None)
    w64 = w.double()
    oracle = Float64Adam(state["exp_avg"].shape)
    for _ in range(7):
        g = torch.randn(shape, generator=gen).to(dtype)
        galore_adamw_step(w, g, state, hyper, config)
        # The projector is the one the step stored (tested on its own in test_projector.py).
        b = state["projector"].double()
        g64 = g.double()
        if proj_type == "full":
            b_right = state["projector_right"].double()
            delta = b.T @ oracle.direction(b @ g64 @ b_right.T, hyper) @ b_right
        elif state["projector"].shape[1] == shape[0]:  # left
            delta = b.T @ oracle.direction(b @ g64, hyper)
        else:  # right
            delta = (b.T @ oracle.direction(b @ g64.T, hyper)).T
        w64 = oracle.apply(w64, config.scale * delta, hyper)
        if dtype != torch.float32:
            w64 = w64.to(dtype).double()  # the weight is stored in its dtype after every step
    tol = FP32_INTERPRETER if dtype == torch.float32 else BF16_OPERANDS
    assert w.dtype == dtype
    assert rel_err(state["exp_avg"], oracle.m) <= tol
    assert rel_err(state["exp_avg_sq"], oracle.v) <= tol
    if dtype == torch.float32:
        assert rel_err(w, w64) <= tol
    else:
        # A 16-bit weight moves by a few ulps per step: compare ulps, not the norm of the whole weight.
        assert_same_rounding(w, w64.to(dtype))
    assert state["step"] == 7


@pytest.mark.parametrize("shape", [(50,), (7, 9), (3, 4, 5)], ids=case_id)
def test_adamw_step_matches_float64(shape):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen)
    state = init_state(w, {}, param_seed=0, min_8bit_size=None)
    w64, oracle = w.double(), Float64Adam(shape)
    for _ in range(7):
        g = torch.randn(shape, generator=gen)
        adamw([w], [g], [state], HYPER)
        w64 = oracle.apply(w64, oracle.direction(g.double(), HYPER), HYPER)
    assert rel_err(w, w64) <= FP32_INTERPRETER
    assert rel_err(state["exp_avg"], oracle.m) <= FP32_INTERPRETER


def test_plain_adamw_equals_torch_adamw_without_eps():
    # torch's AdamW adds ε to √v̂ and ours to √v (galore-torch's form); with ε = 0 both are the same step.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 10, generator=gen)
    p = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.1)
    hyper = AdamHyper(1e-2, 0.9, 0.99, 0.0, 0.1)
    state = init_state(w, {}, param_seed=0, min_8bit_size=None)
    for _ in range(7):
        g = torch.randn(6, 10, generator=gen)
        p.grad = g.clone()
        torch_opt.step()
        adamw([w], [g], [state], hyper)
    assert rel_err(w, p.detach()) <= FP32_INTERPRETER


def test_8bit_moments_follow_fp32_within_quantization_error():
    gen = torch.Generator().manual_seed(3)
    w8 = torch.randn(64, 96, generator=gen)
    w32 = w8.clone()
    config = GaLoreConfig(rank=16)
    group = {"rank": 16, "proj_type": "std"}
    s8 = init_state(w8, group, param_seed=1, min_8bit_size=256)
    s32 = init_state(w32, group, param_seed=1, min_8bit_size=None)
    assert s8["exp_avg"].dtype == torch.uint8 and s8["exp_avg_absmax"].shape == (16, 1)
    g = torch.randn(64, 96, generator=gen)
    galore_adamw_step(w8, g, s8, HYPER, config)
    galore_adamw_step(w32, g, s32, HYPER, config)
    m8 = dequantize_blockwise(s8["exp_avg"], s8["exp_avg_absmax"], signed=True)
    v8 = dequantize_blockwise(s8["exp_avg_sq"], s8["exp_avg_sq_absmax"], signed=False)
    # One step from zero: the moments are exact before requantization, so the weights agree to fp32
    # rounding and the stored moments to the map's resolution.
    assert rel_err(w8, w32) <= FP32_INTERPRETER
    assert ((m8 - s32["exp_avg"]).abs() <= MAP_RESOLUTION_8BIT * s8["exp_avg_absmax"]).all()
    assert ((v8 - s32["exp_avg_sq"]).abs() <= MAP_RESOLUTION_8BIT * s8["exp_avg_sq_absmax"]).all()
