"""kernels/backproject_update.py against reference.backproject_update, under the interpreter on CPU (and
on CUDA when there is one): W ← W·decay − step_size·ΔW with ΔW = Bᵀ·N (left) or Nᵀ·B (right)."""

import pytest
import torch

from case_ids import case_id
from galore_kernels import reference
from galore_kernels.kernels.backproject_update import backproject_update
from galore_kernels.projector import compute_projector
from kernel_cases import DEVICE, DTYPES, SHAPES, ranks_for, seed_of, tolerance
from tolerances import assert_same_rounding, rel_err

DECAY, STEP_SIZE = 1 - 1e-3, 0.05


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_backproject_update_matches_reference(shape, side, dtype):
    gen = torch.Generator().manual_seed(seed_of(shape, side))
    m, n = shape
    k = n if side == "left" else m
    for rank in ranks_for(shape):
        w = torch.randn(shape, generator=gen).to(dtype)
        # The projector and N are in the weight's dtype for 16-bit weights, as the optimizer keeps them.
        b = compute_projector(torch.randn(shape, generator=gen), rank, side, seed=1).to(dtype)
        direction = torch.randn(rank, k, generator=gen).to(dtype)
        expected = w.clone()
        reference.backproject_update(expected, b, direction, side, decay=DECAY, step_size=STEP_SIZE)
        delta = b.double().T @ direction.double()
        exact = w.double() * DECAY - STEP_SIZE * (delta if side == "left" else delta.T)
        w_dev = w.to(DEVICE)
        backproject_update(w_dev, b.to(DEVICE), direction.to(DEVICE), side, decay=DECAY, step_size=STEP_SIZE)
        assert w_dev.dtype == dtype
        if dtype != torch.float32:
            # A 16-bit weight moves by about an ulp: compare roundings, not norms, with the reference and
            # with the float64 result rounded once to the weight's dtype.
            assert_same_rounding(w_dev, expected)
            assert_same_rounding(w_dev, exact.to(dtype))
            continue
        assert rel_err(w_dev.cpu(), expected) <= tolerance(dtype), rank
        assert rel_err(w_dev.cpu(), exact) <= tolerance(dtype), rank
        # On a zero weight the result is the product alone, free of the weight's own rounding; against
        # float64, so that the reference's own fp32 rounding is not part of the bar.
        zero = torch.zeros(shape, device=DEVICE)
        backproject_update(zero, b.to(DEVICE), direction.to(DEVICE), side, decay=DECAY, step_size=STEP_SIZE)
        assert rel_err(zero.cpu(), -STEP_SIZE * (delta if side == "left" else delta.T)) <= tolerance(dtype)


def test_backproject_update_rejects_shapes_that_do_not_compose():
    w = torch.zeros(5, 7, device=DEVICE)
    with pytest.raises(ValueError, match="do not compose"):
        backproject_update(w, torch.zeros(2, 6, device=DEVICE), torch.zeros(2, 7, device=DEVICE), "left",
                           decay=1.0, step_size=1.0)
