"""The low-rank DDP communication hook on 2 gloo CPU processes: between a projected weight's refreshes only
its projection S crosses the network, and training follows plain DDP to fp32 rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from galore_kernels.distributed.launch import init_gloo
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit
from galore_kernels.distributed import LowRankHookState, low_rank_hook
from galore_kernels.state import dequantized_moments
from rank_results import run_and_load
from tolerances import LOW_RANK_VS_PLAIN_DDP, LOW_RANK_VS_PLAIN_DDP_MOMENTS, rel_err

WORLD_SIZE = 2
STEPS = 9
RANK, GAP = 8, 3
NAN_STEP, NAN_RANK = 4, 1
CASES = {
    "GaLoreAdamW": (GaLoreAdamW, {}),
    "GaLoreAdamW8bit": (GaLoreAdamW8bit, {"min_8bit_size": 64}),
}
# Linear(32, 48).weight is 48 × 32: right-projected, S is 8 × 48; Linear(48, 32).weight is 32 × 48:
# left-projected, S is 8 × 48; the biases (48 + 32) are all-reduced whole.
FULL_ELEMENTS = 48 * 32 + 48 + 32 * 48 + 32
LOW_RANK_ELEMENTS = RANK * 48 + 48 + RANK * 48 + 32
# The optimizer's step count at each iteration: iteration NAN_STEP is skipped (NaN on one rank) and does
# not count, so refreshes (steps 0, 3, 6) fall on iterations 0, 3 and 7.
REFRESH_ITERATIONS = {0, 3, 7}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32))


def _loss(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    """Each rank's batch of one regression task (a fixed teacher map), so the ranks' gradients agree as
    in training; with unrelated targets per rank they cancel, and the mean's rounding grows relative to
    it."""
    teacher = torch.randn(32, 32, generator=torch.Generator().manual_seed(7)) / 32**0.5
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 32, generator=gen)
    loss = ((model(x) - x @ teacher) ** 2).mean()
    return loss * float("nan") if (step, rank) == (NAN_STEP, NAN_RANK) else loss


def _train(name: str, rank: int, low_rank: bool) -> dict:
    cls, kwargs = CASES[name]
    model = _model()
    ddp = DistributedDataParallel(model)
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = cls([{"params": biases}, {"params": weights, "rank": RANK, "update_proj_gap": GAP}], lr=1e-2, **kwargs)
    hook_state = LowRankHookState(opt)
    if low_rank:
        ddp.register_comm_hook(hook_state, low_rank_hook)
    elements = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's skip warning
        for step in range(STEPS):
            hook_state.elements_reduced = 0
            _loss(ddp, step, rank).backward()
            elements.append(hook_state.elements_reduced)
            opt.step()
            opt.zero_grad()
    states = {
        index: {**state, "moments": dequantized_moments(state)} for index, state in enumerate(opt.state.values())
    }
    return {"params": [p.detach().clone() for p in model.parameters()], "states": states, "elements": elements}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        results = {(name, low_rank): _train(name, rank, low_rank) for name in CASES for low_rank in (False, True)}
        torch.save({f"{name}/{low_rank}": value for (name, low_rank), value in results.items()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("low_rank")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


@pytest.mark.parametrize("name", list(CASES))
def test_low_rank_communication_follows_plain_ddp(ranks, name):
    for result in ranks:
        plain, low = result[f"{name}/False"], result[f"{name}/True"]
        for a, b in zip(low["params"], plain["params"]):
            assert rel_err(a, b) <= LOW_RANK_VS_PLAIN_DDP
        for index, state in low["states"].items():
            for moment, expected in zip(state["moments"], plain["states"][index]["moments"]):
                assert rel_err(moment, expected) <= LOW_RANK_VS_PLAIN_DDP_MOMENTS
            assert state["step"] == plain["states"][index]["step"] == STEPS - 1
            assert state["nonfinite_skips"] == 1  # the NaN on one rank reached both through S


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_ends_identical(ranks, name):
    first, second = (result[f"{name}/True"] for result in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"]))
    for index, state in first["states"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second["states"][index][key]), key


@pytest.mark.parametrize("name", list(CASES))
def test_elements_all_reduced_per_step_are_as_predicted(ranks, name):
    expected = [FULL_ELEMENTS if i in REFRESH_ITERATIONS else LOW_RANK_ELEMENTS for i in range(STEPS)]
    for result in ranks:
        assert result[f"{name}/True"]["elements"] == expected
