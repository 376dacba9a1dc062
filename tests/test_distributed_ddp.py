"""Plain DDP with both optimizer classes, unchanged: on 2 gloo CPU processes every rank ends with the same
weights and optimizer state, bit-equal to one process stepping on the mean gradient; a NaN gradient on one
rank only (it reaches every rank through the all-reduce) is skipped on both."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from galore_kernels.distributed.launch import init_gloo
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit
from rank_results import run_and_load

WORLD_SIZE = 2
STEPS = 8  # refreshes at steps 0, 3 and 6
NAN_STEP, NAN_RANK = 4, 1
CASES = {
    "GaLoreAdamW": (GaLoreAdamW, {}),
    "GaLoreAdamW8bit": (GaLoreAdamW8bit, {"min_8bit_size": 64}),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 48 × 32 (right-projected) then 32 × 48 (left-projected), with biases.
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32))


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls, kwargs = CASES[name]
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": biases}, {"params": weights, "rank": 8, "update_proj_gap": 3}]
    return cls(groups, lr=1e-2, **kwargs)


def _loss(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    loss = ((model(x) - y) ** 2).mean()
    return loss * float("nan") if (step, rank) == (NAN_STEP, NAN_RANK) else loss


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        results = {}
        for name in CASES:
            model = _model()
            ddp = DistributedDataParallel(model)
            opt = _optimizer(name, model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's skip warning
                for step in range(STEPS):
                    _loss(ddp, step, rank).backward()
                    opt.step()
                    opt.zero_grad()
            results[name] = {"params": [p.detach().clone() for p in model.parameters()], "optimizer": opt.state_dict()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(name: str) -> dict:
    """One process stepping on the mean of both ranks' gradients, as DDP averages them (÷2 is exact)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        opt = _optimizer(name, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(STEPS):
                grads = []
                for rank in range(WORLD_SIZE):
                    model.zero_grad()
                    _loss(model, step, rank).backward()
                    grads.append([p.grad.clone() for p in model.parameters()])
                for p, *per_rank in zip(model.parameters(), *grads):
                    p.grad = sum(g / WORLD_SIZE for g in per_rank)
                opt.step()
                opt.zero_grad()
        return {"params": [p.detach().clone() for p in model.parameters()], "optimizer": opt.state_dict()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' final weights and optimizer states: one spawn for the whole module."""
    out_dir = tmp_path_factory.mktemp("ddp")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


def _assert_state_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, theirs[key]), key
        else:
            assert value == theirs[key], key


@pytest.mark.parametrize("name", list(CASES))
def test_plain_ddp_is_bit_equal_to_one_process_on_the_mean_gradient(ranks, name):
    expected = _single_process(name)
    for result in ranks:
        got = result[name]
        assert all(torch.equal(a, b) for a, b in zip(got["params"], expected["params"]))
        assert got["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
        for index, state in got["optimizer"]["state"].items():
            _assert_state_equal(state, expected["optimizer"]["state"][index])


@pytest.mark.parametrize("name", list(CASES))
def test_a_nan_gradient_on_one_rank_is_skipped_on_both(ranks, name):
    for result in ranks:
        states = result[name]["optimizer"]["state"].values()
        assert all(state["nonfinite_skips"] == 1 and state["step"] == STEPS - 1 for state in states)
