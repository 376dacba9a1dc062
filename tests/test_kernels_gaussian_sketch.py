"""kernels/gaussian_sketch.py (G'·Ω with Ω drawn in-kernel) against projector.gaussian_sketch, and the
refresh it serves: deterministic, orthonormal and as good as the reference's."""

import pytest
import torch

from case_ids import case_id
from galore_kernels.kernels.gaussian_sketch import gaussian_sketch
from galore_kernels.projector import compute_projector
from galore_kernels.projector import gaussian_sketch as reference_sketch
from galore_kernels.rng import sketch_seed
from kernel_cases import DEVICE, DTYPES, SHAPES, power_law_matrix, tolerance
from tolerances import ORTHONORMALITY, RANDOMIZED_ENERGY, SAME_SUBSPACE, rel_err


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])  # transposed: read through strides
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_gaussian_sketch_matches_reference(shape, layout, dtype, poisoned_empty):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    g = g.T if layout == "transposed" else g
    seed = sketch_seed(12345, 400)
    for width in sorted({1, min(g.shape[1], 13), min(g.shape[1], 70)}):
        ours = gaussian_sketch(g.to(DEVICE), seed, width)
        assert ours.shape == (g.shape[0], width) and not torch.isnan(ours).any()
        # Against float64 products of the same Ω, scaled by Σ|g||Ω| (a 1×1 sketch can cancel to near 0).
        omega = reference_sketch(torch.eye(g.shape[1]), seed, width).double()
        exact = g.double() @ omega
        magnitude = (g.double().abs() @ omega.abs()).norm()
        assert ((ours.cpu().double() - exact).norm() / magnitude).item() <= tolerance(torch.float32)


def test_kernel_refresh_is_deterministic_and_meets_the_energy_bound():
    # The 1024×2816 case of the energy bound runs in tests/test_projector.py and, on a GPU, in the cuda
    # test below; under the interpreter a smaller matrix with the same σ_i ∝ i^-0.5 spectrum keeps CI fast.
    m, n, rank = 128, 320, 16
    g, sigma = power_law_matrix(m, n, -0.5, seed=0)
    g = g.to(DEVICE)
    b = compute_projector(g, rank, "left", seed=7, sketch=gaussian_sketch)
    assert torch.equal(b, compute_projector(g, rank, "left", seed=7, sketch=gaussian_sketch))
    captured = (b.double() @ g.double()).square().sum().item()
    assert captured / sigma[:rank].double().square().sum().item() >= RANDOMIZED_ENERGY
    identity = torch.eye(rank, dtype=torch.float64, device=DEVICE)
    assert (b.double() @ b.double().T - identity).abs().max() <= ORTHONORMALITY
    # Same Ω as the reference: the two projectors span the same subspace.
    b_ref = compute_projector(g.cpu(), rank, "left", seed=7)
    p, p_ref = b.cpu().double().T @ b.cpu().double(), b_ref.double().T @ b_ref.double()
    assert rel_err(p, p_ref) <= SAME_SUBSPACE


@pytest.mark.cuda
def test_kernel_refresh_energy_at_1024x2816():
    g, sigma = power_law_matrix(1024, 2816, -0.5, seed=0)
    g, rank = g.cuda(), 128
    b = compute_projector(g, rank, "left", seed=1, sketch=gaussian_sketch)
    captured = (b.double() @ g.double()).square().sum().item()
    assert captured >= RANDOMIZED_ENERGY * sigma[:rank].double().square().sum().item()
