"""The sketch refresh of a sharded gradient on 2 gloo CPU processes: the single-process randomized
projector (same seed) through small all-reduces, with no process ever holding the whole gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from galore_kernels.config import GaLoreConfig
from galore_kernels.distributed.launch import init_gloo
from galore_kernels.projector import compute_projector
from galore_kernels.sharded import ShardLayout, kept_matrix_dim, sketch_refresh_elements, sketched_projector
from rank_results import run_and_load
from tolerances import ORTHONORMALITY, SHARDED_SKETCH_PROJECTOR, SHARDED_SKETCH_ENERGY

WORLD_SIZE = 2
SEED = 1234
CONFIG = GaLoreConfig(rank=8, svd_oversample=8, svd_power_iters=2)
# (name, shape, side): 96 × 161 sliced along its 161 columns gives slices of 81 and 80 (uneven).
CASES = [("left", (96, 161), "left"), ("right", (150, 64), "right"), ("one_iter", (64, 96), "left")]


def _gradient(shape: tuple[int, int], kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    m, n = shape
    if kind == "zero_rank_deficient":  # rank 3 < r = 8: the Gram of Z is singular, the Householder fallback runs
        return torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    sigma = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.5  # slowly decaying, as gradients do
    scale = 1e-20 if kind == "tiny" else 1.0
    return (u * sigma) @ v.T * scale


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _refresh(rank: int, shape, side, kind, config) -> dict:
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    g = _gradient(shape, kind)
    sharded = distribute_tensor(g, mesh, [Shard(kept_matrix_dim(side))])
    layout = ShardLayout.of(sharded)
    sizes = []

    def reduce(tensor: torch.Tensor) -> None:
        sizes.append((tuple(tensor.shape), tensor.dtype))
        dist.all_reduce(tensor)

    gathers = []
    real_all_gather = dist.all_gather

    def all_gather(parts, tensor, **kwargs):
        gathers.append(tuple(tensor.shape))
        return real_all_gather(parts, tensor, **kwargs)

    dist.all_gather = all_gather
    try:
        with _LargestTensor() as watch:
            b = sketched_projector(sharded.to_local(), layout, side, config, seed=SEED, reduce=reduce)
    finally:
        dist.all_gather = real_all_gather
    single = compute_projector(g, config.rank, side, seed=SEED, oversample=config.svd_oversample,
                               power_iters=config.svd_power_iters)
    oriented = g if side == "left" else g.T
    return {
        "b": b, "single": single, "sizes": [list(s) for s, _ in sizes], "dtypes": [str(d) for _, d in sizes],
        "gathers": [list(s) for s in gathers], "largest": watch.largest, "local": sharded.to_local().numel(),
        "energy": (b @ oriented).square().sum() / (single @ oriented).square().sum(),
    }


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        results = {}
        for name, shape, side in CASES:
            config = CONFIG if name != "one_iter" else GaLoreConfig(rank=8, svd_power_iters=1)
            results[name] = _refresh(rank, shape, side, "decaying", config)
        results["rank_deficient"] = _refresh(rank, (96, 161), "left", "zero_rank_deficient", CONFIG)
        results["tiny"] = _refresh(rank, (96, 161), "left", "tiny", CONFIG)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_refresh")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_sketch_equals_the_single_process_projector(ranks, name):
    for result in ranks:
        r = result[name]
        assert (r["b"] - r["single"]).abs().max() <= SHARDED_SKETCH_PROJECTOR
        assert r["energy"] >= SHARDED_SKETCH_ENERGY
    assert torch.equal(ranks[0][name]["b"], ranks[1][name]["b"])  # the replicated projector is one tensor


@pytest.mark.parametrize("name, shape, side", CASES)
def test_all_reduces_are_the_listed_small_ones(ranks, name, shape, side):
    config = CONFIG if name != "one_iter" else GaLoreConfig(rank=8, svd_power_iters=1)
    d, k = shape if side == "left" else shape[::-1]
    expected = sketch_refresh_elements(d, k, config)[1:]  # [0] is the norm, which the step reduces first
    for result in ranks:
        assert result[name]["sizes"] == [list(s) for s, _ in expected]
        assert result[name]["dtypes"] == [str(dtype) for _, dtype in expected]
        assert sum(math.prod(s) for s in result[name]["sizes"]) < d * k  # less than gathering G itself


@pytest.mark.parametrize("name", [name for name, _, _ in CASES] + ["rank_deficient"])
def test_no_process_holds_the_whole_gradient(ranks, name):
    for result in ranks:
        shape = dict((n, s) for n, s, _ in CASES).get(name, (96, 161))
        assert result[name]["largest"] < math.prod(shape)
        assert result[name]["local"] < math.prod(shape)


@pytest.mark.parametrize("name", ["rank_deficient", "tiny"])
def test_degenerate_gradients_give_orthonormal_finite_projectors(ranks, name):
    for result in ranks:
        b = result[name]["b"]
        assert torch.isfinite(b).all()
        assert (b @ b.T - torch.eye(b.shape[0])).abs().max() <= ORTHONORMALITY


def test_a_singular_gram_falls_back_to_gathering_z(ranks):
    # Rank 3 < w = 16 makes the Gram of Z = G'ᵀQ singular: each power iteration all-gathers Z's row
    # slices (81 padded rows × 16 on each process) and orthonormalizes it by Householder instead.
    for result in ranks:
        assert result["rank_deficient"]["gathers"] == [[81, 16]] * CONFIG.svd_power_iters
        assert result["rank_deficient"]["energy"] >= SHARDED_SKETCH_ENERGY
        for name, _, _ in CASES:
            assert result[name]["gathers"] == []  # well-conditioned Grams take Cholesky-QR
