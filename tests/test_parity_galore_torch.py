"""GaLoreAdamW is a drop-in for galore-torch's GaLoreAdamW: with svd="exact" and weight_decay=0, the same
param groups give the same parameters and moments over 20 steps with two refreshes, for every proj_type."""

import pytest
import torch

galore_torch = pytest.importorskip("galore_torch")  # installed by the test extra; absent from bare GPU images

from galore_kernels import GaLoreAdamW
from galore_kernels.projector import resolve_side
from tolerances import GALORE_TORCH_PARITY, GALORE_TORCH_PARITY_FULL, rel_err

STEPS = 20
GAP = 8  # refreshes at steps 0, 8 and 16: two inside the run


def _run(cls, proj_type, shape, **extra):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen))
    b = torch.nn.Parameter(torch.randn(shape[1], generator=gen))
    group = {"params": [w], "rank": 6, "update_proj_gap": GAP, "scale": 0.5, "proj_type": proj_type, **extra}
    opt = cls([{"params": [b]}, group], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    for _ in range(STEPS):
        # Gradients with a decaying spectrum, like real weight gradients, so the top-6 subspace is stable.
        u = torch.randn(shape[0], 6, generator=gen)
        w.grad = u @ torch.randn(6, shape[1], generator=gen) + 0.1 * torch.randn(shape, generator=gen)
        b.grad = torch.randn(shape[1], generator=gen)
        opt.step()
    return w.detach(), b.detach(), opt.state[w]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)], ids=["m>n", "m<n", "square"])
def test_matches_galore_torch(proj_type, shape):
    w_ref, b_ref, state_ref = _run(galore_torch.GaLoreAdamW, proj_type, shape)
    w, b, state = _run(GaLoreAdamW, proj_type, shape, svd="exact")
    bar = GALORE_TORCH_PARITY_FULL if proj_type == "full" else GALORE_TORCH_PARITY
    assert rel_err(w, w_ref) <= bar
    assert rel_err(b, b_ref) <= GALORE_TORCH_PARITY
    # galore-torch keeps right-side moments as (m × r); ours are canonical (r × k).
    exp_avg_ref = state_ref["exp_avg"]
    if resolve_side(proj_type, shape) == "right":
        exp_avg_ref = exp_avg_ref.T
    assert rel_err(state["exp_avg"], exp_avg_ref) <= bar
    assert state["step"] == state_ref["step"] == STEPS
