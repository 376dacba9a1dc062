"""Layer-wise data parallel training whose processes do not match: every process raises a clear error
instead of hanging, mixing gradients, or being aborted by gloo. 2 gloo CPU processes, one spawn."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from galore_kernels import GaLoreAdamW
from galore_kernels.distributed import LayerwiseDataParallel
from galore_kernels.distributed.launch import init_gloo
from rank_results import run_and_load

WORLD_SIZE = 2
CONTROL_TIMEOUT = timedelta(seconds=2)


def _setup(rank: int, galore_rank: int = 4, k: int = 1) -> tuple[torch.nn.Module, GaLoreAdamW, LayerwiseDataParallel]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16))
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = GaLoreAdamW([{"params": biases}, {"params": weights, "rank": galore_rank, "update_proj_gap": 10}],
                      lr=1e-2, layerwise=True, accumulation_steps=k)
    return model, opt, LayerwiseDataParallel(opt, control_timeout=CONTROL_TIMEOUT)


def _backward(model: torch.nn.Module) -> None:
    model(torch.randn(8, 16)).square().mean().backward()


def _error_of(action) -> str:
    try:
        action()
    except RuntimeError as error:
        return str(error)
    return "no error"


def _more_backward_passes(rank: int) -> str:
    """k = 2: rank 0 calls step() after one backward pass, rank 1 runs its second."""
    model, opt, _ = _setup(rank, k=2)

    def run() -> None:
        _backward(model)
        if rank == 1:
            _backward(model)
        opt.step()

    return _error_of(run)


def _different_optimizers(rank: int) -> str:
    """Rank 1 projects at rank 2 instead of 4: the payloads' sizes differ from the first step after a refresh."""
    model, opt, _ = _setup(rank, galore_rank=4 if rank == 0 else 2)

    def run() -> None:
        for _ in range(2):
            _backward(model)
            opt.step()

    return _error_of(run)


def _a_process_stops(rank: int) -> str:
    """Rank 1 stops after one step; rank 0's second step gets no agreement record: it times out and raises."""
    model, opt, _ = _setup(rank)
    _backward(model)
    opt.step()
    if rank == 1:
        time.sleep(2 * CONTROL_TIMEOUT.total_seconds())  # alive but silent, as a stuck process is
        return "stopped"
    start = time.monotonic()
    message = _error_of(lambda: _backward(model))
    return f"{message} [after {time.monotonic() - start:.1f} s]"


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        results = {case.__name__: case(rank) for case in (_more_backward_passes, _different_optimizers)}
        results["_a_process_stops"] = _a_process_stops(rank)  # last: it leaves rank 0's control group broken
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("layerwise_mismatch")
    return run_and_load(_worker, WORLD_SIZE, out_dir, deadline_s=120)


def test_different_backward_pass_counts_raise_on_every_process(ranks):
    for result in ranks:
        message = result["_more_backward_passes"]
        assert "disagree" in message and "backward passes: process 0 1, process 1 2" in message


def test_different_optimizers_raise_before_any_data_moves(ranks):
    for result in ranks:
        message = result["_different_optimizers"]
        assert "disagree" in message and "plan checksum" in message and "Nothing was sent" in message


def test_a_silent_process_raises_within_the_timeout(ranks):
    message = ranks[0]["_a_process_stops"]
    assert "not every process reached optimizer step 1 within the timeout" in message
    assert ranks[1]["_a_process_stops"] == "stopped"
