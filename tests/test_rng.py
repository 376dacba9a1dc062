"""The counter-based normals behind the sketch: deterministic, normal, keyed by (parameter, step), and
the same numbers as Triton's tl.randn, so the kernel and the reference draw the same Ω."""

import pytest
import torch

from galore_kernels.rng import randn, sketch_seed
from tolerances import TRITON_RANDN


def test_deterministic_and_normal():
    offsets = torch.arange(200_000)
    a, b = randn(123, offsets), randn(123, offsets)
    assert torch.equal(a, b)
    assert not torch.equal(a, randn(124, offsets))
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1) < 0.01
    # Each number depends on its own offset only: a slice equals the same offsets drawn alone.
    assert torch.equal(a[1000:1010], randn(123, offsets[1000:1010]))


def test_sketch_seed_separates_parameters_and_steps():
    seeds = {sketch_seed(p, t) for p in range(50) for t in range(0, 2000, 200)}
    assert len(seeds) == 50 * 10


def _triton_randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, offsets_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        mask = idx < n
        offs = tl.load(offsets_ptr + idx, mask=mask, other=0)
        tl.store(out_ptr + idx, tl.randn(seed, offs), mask=mask)

    out = torch.full(offsets.shape, float("nan"), device=offsets.device)
    kernel[(1,)](out, offsets, seed, offsets.numel(), BLOCK=triton.next_power_of_2(offsets.numel()))
    return out


def test_matches_triton_randn():
    pytest.importorskip("triton")
    # Offsets above 2^32 exercise the counter's high word; the seed's high word is the step.
    offsets = torch.arange(777, dtype=torch.int64) + (3 << 32) + 11
    seed = sketch_seed(param_seed=0xABCDEF, step=400)
    ours = randn(seed, offsets)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = _triton_randn(seed, offsets.to(device)).cpu()
    assert not torch.isnan(theirs).any()
    # Same Philox words; log/cos may differ in the last bits between libraries.
    assert (ours - theirs).abs().max() <= TRITON_RANDN
