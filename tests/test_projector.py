"""Projectors: the side each proj_type picks, randomized SVD against exact SVD and its energy bound,
orthonormal rows on degenerate gradients, and argument checks."""

import pytest
import torch

from galore_kernels.projector import (
    align_projector,
    compute_full_projectors,
    compute_projector,
    effective_rank,
    is_refresh_step,
    oriented,
    resolve_side,
)
from case_ids import case_id, named_by_inputs
from kernel_cases import power_law_matrix
from tolerances import ORTHONORMALITY, RANDOMIZED_ENERGY, SAME_SUBSPACE


def _orthonormality_error(b: torch.Tensor) -> float:
    b = b.double()
    return (b @ b.T - torch.eye(b.shape[0], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize(
    "proj_type, shape, side",
    [
        ("std", (8, 4), "right"),
        ("std", (4, 8), "left"),
        ("std", (6, 6), "right"),
        ("reverse_std", (8, 4), "left"),
        ("reverse_std", (4, 8), "right"),
        ("reverse_std", (6, 6), "left"),
        ("left", (8, 4), "left"),
        ("right", (4, 8), "right"),
        ("full", (4, 8), "full"),
    ],
    ids=case_id,
)
def test_side_selection(proj_type, shape, side):
    assert resolve_side(proj_type, shape) == side


def test_bad_choices_raise():
    with pytest.raises(ValueError, match="proj_type"):
        resolve_side("diagonal", (3, 3))
    with pytest.raises(ValueError, match="method"):
        compute_projector(torch.randn(4, 4), 2, "left", method="lanczos")
    with pytest.raises(ValueError, match="side"):
        compute_projector(torch.randn(4, 4), 2, "top")


def test_rank_clamp_and_schedule():
    assert effective_rank(128, (64, 300)) == 64
    assert effective_rank(8, (64, 300)) == 8
    assert [t for t in range(10) if is_refresh_step(t, 4)] == [0, 4, 8]


def test_oriented_is_a_view():
    g = torch.randn(5, 7)
    assert oriented(g, "left") is g
    assert oriented(g, "right").data_ptr() == g.data_ptr() and oriented(g, "right").shape == (7, 5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_exact_follows_galore_torch_convention(side):
    gp = pytest.importorskip("galore_torch.galore_projector")

    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    ours = compute_projector(g, 6, side, method="exact")
    theirs = gp.GaLoreProjector(6).get_orthogonal_matrix(g, 6, type=side)
    # galore-torch keeps U[:, :r] (m × r) for left and Vh[:r] (r × n) for right.
    assert torch.equal(ours, theirs.T if side == "left" else theirs)


def test_randomized_energy_on_slow_spectrum():
    """The default randomized SVD (oversample 8, 2 power iterations) keeps ≥ 0.99 of the exact top-r energy
    on a slowly decaying spectrum: 1024 × 2816, σ_i ∝ i^-0.5, r = 128."""
    g, sigma = power_law_matrix(1024, 2816, -0.5, seed=0)
    rank = 128
    exact_energy = sigma[:rank].double().square().sum().item()
    for seed in range(3):
        b = compute_projector(g, rank, resolve_side("std", g.shape), seed=seed)
        assert b.shape == (rank, 1024)
        captured = (b.double() @ g.double()).square().sum().item()
        assert captured / exact_energy >= RANDOMIZED_ENERGY, (seed, captured / exact_energy)
        assert _orthonormality_error(b) <= ORTHONORMALITY


def test_randomized_is_deterministic_per_seed():
    g = torch.randn(96, 200, generator=torch.Generator().manual_seed(4))
    a = compute_projector(g, 16, "left", seed=9)
    assert torch.equal(a, compute_projector(g, 16, "left", seed=9))
    assert not torch.equal(a, compute_projector(g, 16, "left", seed=10))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "shape, rank", [((67, 300), 5), ((300, 67), 67), ((1, 513), 1), ((40, 40), 40)],
    ids=lambda value: case_id(value) or f"rank{value}",
)
def test_randomized_matches_exact_subspace_on_low_rank_input(side, shape, rank):
    # A matrix of rank ≤ r has an exactly recoverable top-r subspace: both methods must find it.
    g, _ = power_law_matrix(*shape, -1.0, seed=3)
    d = shape[0] if side == "left" else shape[1]
    r = min(rank, *shape)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    low = (u[:, :r] * s[:r]) @ vh[:r]
    b_rand = compute_projector(low, rank, side, seed=1)
    b_exact = compute_projector(low, rank, side, method="exact")
    assert b_rand.shape == (r, d) and b_exact.shape == (r, d)
    assert _orthonormality_error(b_rand) <= ORTHONORMALITY
    # Same subspace: the projections onto the two row spaces coincide.
    p_rand, p_exact = b_rand.double().T @ b_rand.double(), b_exact.double().T @ b_exact.double()
    assert (p_rand - p_exact).norm() / max(p_exact.norm(), 1) <= SAME_SUBSPACE


@pytest.mark.parametrize("method", ["randomized", "exact"])
@pytest.mark.parametrize("kind", ["zero", "rank_one", "constant", "huge", "tiny"])
def test_degenerate_gradients_give_orthonormal_projectors(method, kind):
    # huge and tiny: the fp64 Gram of the randomized refresh's final step squares 1e±30 without overflow.
    g = {
        "zero": torch.zeros(30, 50),
        "rank_one": torch.outer(torch.randn(30), torch.randn(50)),
        "constant": torch.full((30, 50), 3.0),
        "huge": torch.randn(30, 50) * 1e30,
        "tiny": torch.randn(30, 50) * 1e-30,
    }[kind]
    for side in ("left", "right"):
        b = compute_projector(g, 8, side, method=method)
        assert torch.isfinite(b).all()
        assert _orthonormality_error(b) <= ORTHONORMALITY


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=case_id)
def test_half_precision_input_accumulates_in_fp32(dtype):
    g, _ = power_law_matrix(64, 96, -1.0, seed=2)
    b16 = compute_projector(g.to(dtype), 8, "left", seed=0)
    b32 = compute_projector(g.to(dtype).float(), 8, "left", seed=0)
    assert b16.dtype == torch.float32
    assert torch.equal(b16, b32)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_full_projectors_are_consistent(method):
    g, _ = power_law_matrix(48, 80, -1.0, seed=6)
    left, right = compute_full_projectors(g, 10, method=method, seed=2)
    assert left.shape == (10, 48) and right.shape == (10, 80)
    assert _orthonormality_error(left) <= ORTHONORMALITY and _orthonormality_error(right) <= ORTHONORMALITY
    # B_left·G·B_rightᵀ carries the top-10 energy of G.
    core = left.double() @ g.double() @ right.double().T
    sigma = torch.linalg.svdvals(g.double())
    assert core.square().sum() >= RANDOMIZED_ENERGY * sigma[:10].square().sum()


@pytest.mark.parametrize(
    "kwargs, message",
    named_by_inputs([
        ({"rank": 0}, "rank must be an int >= 1"), ({"rank": -1}, "rank must be an int >= 1"),
        ({"oversample": -6}, "oversample must be an int >= 0"),
        ({"power_iters": -1}, "power_iters must be an int >= 0"),
    ]),
)
def test_compute_projector_rejects_bad_arguments(kwargs, message):
    args = {"rank": 8, **kwargs}
    rank = args.pop("rank")
    with pytest.raises(ValueError, match=message):
        compute_projector(torch.randn(20, 30), rank, "left", **args)
    with pytest.raises(ValueError, match=message):
        compute_full_projectors(torch.randn(20, 30), rank, **args)


def _basis(rows: int = 6, d: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, rows, generator=torch.Generator().manual_seed(seed))).Q.T


@pytest.mark.parametrize("mode", ["procrustes", "signs"])
def test_alignment_undoes_sign_flips(mode):
    previous = _basis()
    flipped = previous * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0]).unsqueeze(1)
    assert torch.allclose(align_projector(flipped, previous, mode), previous, atol=1e-6)


def test_procrustes_undoes_permutations_and_rotations_inside_the_subspace():
    previous = _basis()
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1))).Q
    for moved in (previous.flip(0), rotation @ previous):
        aligned = align_projector(moved, previous, "procrustes")
        assert torch.allclose(aligned, previous, atol=1e-5)
        assert _orthonormality_error(aligned) <= ORTHONORMALITY


def test_alignment_keeps_a_new_subspace_and_leaves_never_refreshed_matrices_alone():
    previous, new = _basis(seed=0), _basis(seed=2)
    aligned = align_projector(new, previous, "procrustes")
    # Same span as the new basis: projecting onto it changes nothing.
    assert torch.allclose(aligned.T @ (aligned @ new.T), new.T, atol=1e-5)
    stack = align_projector(torch.stack([new, new]), torch.stack([previous, torch.zeros_like(previous)]), "procrustes")
    assert torch.allclose(stack[0], aligned, atol=1e-6) and torch.equal(stack[1], new)
    assert torch.equal(align_projector(new, previous, "none"), new)
