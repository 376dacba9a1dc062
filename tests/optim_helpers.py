"""Shared inputs of the optimizer tests: the two optimizer classes, a parameter zoo covering the edge cases,
its gradients, a step loop and a checkpoint round trip through bytes."""

import io

import pytest
import torch

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit

# (class, extra constructor arguments): min_8bit_size=64 quantizes the zoo's moments of ≥ 64 elements.
OPTIMIZERS = [
    pytest.param(GaLoreAdamW, {}, id="GaLoreAdamW"),
    pytest.param(GaLoreAdamW8bit, {"min_8bit_size": 64}, id="GaLoreAdamW8bit"),
]


def parameter_zoo(dtype=torch.float32, seed=0, device="cpu"):
    """(parameters by name, param groups): the edge cases, in the param groups galore-torch users write."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=gen).to(device=device, dtype=dtype))

    params = {
        "wide": param(24, 40),  # std → left
        "tall": param(40, 24),  # std → right
        "conv": param(6, 4, 10),  # 3-D in a GaLore group: treated as 6 × 40
        "bias": param(40),  # 1-D in a GaLore group: plain AdamW
        "empty": param(0, 8),  # zero-size
        "tiny": param(3, 5),  # rank 50 > min(m, n)
        "full": param(12, 20),
        "plain": param(16, 16),  # group without rank
        "long": param(12, 600),  # left side, moments (8 × 600): rows of three 256-blocks, the last short
    }
    groups = [
        {"params": [params["plain"]]},
        {
            "params": [params[k] for k in ("wide", "tall", "conv", "bias", "empty", "long")],
            "rank": 8,
            "update_proj_gap": 3,
            "scale": 0.5,
            "proj_type": "std",
        },
        {"params": [params["tiny"]], "rank": 50, "update_proj_gap": 4, "proj_type": "reverse_std"},
        {"params": [params["full"]], "rank": 4, "update_proj_gap": 5, "proj_type": "full", "svd": "exact"},
    ]
    return params, groups


def zoo_gradients(params, step, seed=100):
    """Gradients of the zoo for ``step``, seeded by it; "tall"'s is non-contiguous and "plain" has none
    every third step."""
    gen = torch.Generator().manual_seed(seed + step)
    grads = {}
    for name, p in params.items():
        if name == "tall":
            grads[name] = torch.randn(p.shape[::-1], generator=gen).T.to(p.device, p.dtype)  # non-contiguous
        else:
            grads[name] = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
    if step % 3 == 2:
        grads["plain"] = None
    return grads


def run_steps(opt, params, steps, start=0):
    """``steps`` optimizer steps on the zoo's gradients of steps ``start``, ``start + 1``, …"""
    for step in range(start, start + steps):
        for name, g in zoo_gradients(params, step).items():
            params[name].grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)


def save_and_load(obj):
    """``obj`` after torch.save and torch.load(weights_only=True), as a checkpoint on disk would come back."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
