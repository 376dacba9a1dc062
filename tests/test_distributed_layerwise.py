"""Layer-wise mode on 2 gloo CPU processes (galore_kernels.distributed.LayerwiseDataParallel): each
parameter's window is averaged across processes inside backward. Training equals one layer-wise process fed
the mean loss, with k = 1 and k = 3, through refreshes, a NaN on one rank and a checkpoint resume; hooks
firing in another order, and parameters without a gradient on some ranks, are handled; only S crosses the
network between refreshes."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.distributed as dist

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit
from galore_kernels.distributed import LayerwiseDataParallel
from galore_kernels.distributed.launch import init_gloo
from galore_kernels.state import dequantized_moments
from rank_results import run_and_load
from tolerances import LAYERWISE_DATA_PARALLEL, LAYERWISE_DATA_PARALLEL_MOMENTS, rel_err

WORLD_SIZE = 2
STEPS = 8
RANK, GAP = 8, 3
# Adam amplifies rounding: scaling the loss by 1 + 2^-22 moves a one-process run (k = 3, fp32 moments) by
# 1.2e-6 at lr 1e-2 and 3.7e-7 at lr 3e-3 (first layer's weight, 8 steps), so the bar below sits on the latter.
LR = 3e-3
NAN_STEP, NAN_RANK = 4, 1
RESUME_STEP = 5  # the optimizer is rebuilt from its state_dict (weights_only) before this step
CASES = {
    "GaLoreAdamW": (GaLoreAdamW, {}),
    "GaLoreAdamW8bit": (GaLoreAdamW8bit, {"min_8bit_size": 64}),
}
ACCUMULATION = (1, 3)
# Per parameter: its payload and one presence count. Linear(32, 48).weight (48 × 32) is right-projected and
# Linear(48, 32).weight (32 × 48) left-projected: S is 8 × 48 for both; the biases go whole.
FULL_ELEMENTS = (48 * 32 + 1) + (48 + 1) + (32 * 48 + 1) + (32 + 1)
LOW_RANK_ELEMENTS = (RANK * 48 + 1) + (48 + 1) + (RANK * 48 + 1) + (32 + 1)
# The NaN step is skipped and does not count, so the refreshes (steps 0, 3, 6) fall on iterations 0, 3, 7.
REFRESH_ITERATIONS = {0, 3, 7}


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32))


def _optimizer(name: str, model: torch.nn.Module, k: int) -> torch.optim.Optimizer:
    cls, kwargs = CASES[name]
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": biases}, {"params": weights, "rank": RANK, "update_proj_gap": GAP, "svd": "exact"}]
    return cls(groups, lr=LR, layerwise=True, accumulation_steps=k, **kwargs)


def _mlp_loss(model: torch.nn.Module, step: int, micro: int, rank: int) -> torch.Tensor:
    """One rank's micro-batch of a regression task shared by the ranks (a fixed teacher map)."""
    teacher = torch.randn(32, 32, generator=torch.Generator().manual_seed(7)) / 32**0.5
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randn(16, 32, generator=gen)
    loss = ((model(x) - x @ teacher) ** 2).mean()
    return loss * float("nan") if (step, micro, rank) == (NAN_STEP, 0, NAN_RANK) else loss


def _round_trip(optimizer: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _result(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Weights, and each parameter's state in the optimizer's parameter order (states are created in hook
    order, which differs between the ranks of the branches model)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    states = {i: {**opt.state[p], "moments": dequantized_moments(opt.state[p])} for i, p in enumerate(params)}
    return {"params": [p.detach().clone() for p in model.parameters()], "states": states}


def _train_mlp(name: str, k: int, rank: int | None, **reducer_options) -> dict:
    """Layer-wise training; ``rank`` None is the single process on the mean of both ranks' losses."""
    model = _mlp()
    opt = _optimizer(name, model, k)
    reducer = LayerwiseDataParallel(opt, **reducer_options) if rank is not None else None
    elements = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's skip warning
        for step in range(STEPS):
            if step == RESUME_STEP:  # a resumed run: a new optimizer from the checkpoint (and a new reducer)
                saved = _round_trip(opt)
                opt.detach_hooks()
                opt = _optimizer(name, model, k)
                opt.load_state_dict(saved)
                reducer = LayerwiseDataParallel(opt, **reducer_options) if rank is not None else None
            if reducer is not None:
                reducer.elements_reduced = 0
            for micro in range(k):
                if rank is None:
                    (sum(_mlp_loss(model, step, micro, r) for r in range(WORLD_SIZE)) / WORLD_SIZE).backward()
                else:
                    _mlp_loss(model, step, micro, rank).backward()
            opt.step()
            if reducer is not None:
                elements.append(reducer.elements_reduced)
    return {**_result(model, opt), "elements": elements}


class _Branches(torch.nn.Module):
    """Two independent branches; the forward order of the branches, and whether ``b`` runs, per call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16))
        self.b = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16))

    def forward(self, x: torch.Tensor, *, b_first: bool, use_b: bool) -> torch.Tensor:
        # Autograd runs the later-created branch first, so b_first reverses the order the hooks fire in.
        branches = [self.b, self.a] if b_first else [self.a, self.b]
        return sum(branch(x) for branch in branches if use_b or branch is not self.b)


# Step → ranks whose loss does not use branch b (no gradient for its parameters there).
B_UNUSED = {2: {1}, 5: {0, 1}}


def _branches_loss(model: _Branches, step: int, micro: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + 1000 * step + 10 * micro + rank)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    out = model(x, b_first=rank == 1, use_b=rank not in B_UNUSED.get(step, ()))
    return ((out - y) ** 2).mean()


def _train_branches(k: int, rank: int | None) -> dict:
    model = _Branches()
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = GaLoreAdamW([{"params": biases}, {"params": weights, "rank": 4, "update_proj_gap": GAP, "svd": "exact"}], lr=1e-2,
                      layerwise=True, accumulation_steps=k)
    if rank is not None:
        LayerwiseDataParallel(opt)
    for step in range(STEPS):
        for micro in range(k):
            if rank is None:
                losses = [_branches_loss(model, step, micro, r) for r in range(WORLD_SIZE)]
                (sum(losses) / WORLD_SIZE).backward()
            else:
                _branches_loss(model, step, micro, rank).backward()
        opt.step()
    return _result(model, opt)


def _sent_before_the_first_layer(rank: int) -> list[tuple[int, int]]:
    """Per step: (elements sent when the first layer's weight gradient arrives, elements sent in all)."""
    model = _mlp()
    seen = []
    # Registered before the optimizer's hooks, so it runs just before that weight's own hook.
    model[0].weight.register_post_accumulate_grad_hook(lambda _: seen.append(reducer.elements_reduced))
    opt = _optimizer("GaLoreAdamW", model, 1)
    reducer = LayerwiseDataParallel(opt)
    counts = []
    for step in range(4):
        reducer.elements_reduced = 0
        _mlp_loss(model, step, 0, rank).backward()
        opt.step()
        counts.append((seen[-1], reducer.elements_reduced))
    return counts


def _refusals() -> list[str]:
    """What LayerwiseDataParallel refuses once torch.distributed is up."""
    messages = []
    opt = _optimizer("GaLoreAdamW", _mlp(), 1)
    for attempt in (lambda: LayerwiseDataParallel(opt, max_inflight_bytes=-1), lambda: LayerwiseDataParallel(opt),
                    lambda: LayerwiseDataParallel(opt)):
        try:
            attempt()
        except (ValueError, RuntimeError) as error:
            messages.append(f"{type(error).__name__}: {error}")
    return messages


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        results = {f"mlp/{name}/{k}": _train_mlp(name, k, rank) for name in CASES for k in ACCUMULATION}
        results.update({f"branches/{k}": _train_branches(k, rank) for k in ACCUMULATION})
        # Nothing in flight beyond one all-reduce: every hook waits for the previous send.
        results["one_in_flight"] = _train_mlp("GaLoreAdamW8bit", 3, rank, max_inflight_bytes=0)
        results["refusals"] = _refusals()
        results["sent_mid_backward"] = _sent_before_the_first_layer(rank)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: one spawn for the whole module."""
    out_dir = tmp_path_factory.mktemp("layerwise_dp")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


def _single_process(train, *args) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same reduction order in every product
    try:
        return train(*args, None)
    finally:
        torch.set_num_threads(threads)


def _assert_follows(got: dict, expected: dict) -> None:
    for a, b in zip(got["params"], expected["params"]):
        assert rel_err(a, b) <= LAYERWISE_DATA_PARALLEL
    assert got["states"].keys() == expected["states"].keys()
    for index, state in got["states"].items():
        want = expected["states"][index]
        assert (state["step"], state["nonfinite_skips"]) == (want["step"], want["nonfinite_skips"])
        for moment, expected_moment in zip(state["moments"], want["moments"]):
            assert rel_err(moment, expected_moment) <= LAYERWISE_DATA_PARALLEL_MOMENTS


@pytest.mark.parametrize("k", ACCUMULATION, ids=lambda k: f"k={k}")
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_layerwise_process_on_the_mean_loss(ranks, name, k):
    expected = _single_process(_train_mlp, name, k)
    for result in ranks:
        _assert_follows(result[f"mlp/{name}/{k}"], expected)
        for state in result[f"mlp/{name}/{k}"]["states"].values():
            assert state["step"] == STEPS - 1 and state["nonfinite_skips"] == 1  # the NaN reached both ranks


@pytest.mark.parametrize("k", ACCUMULATION, ids=lambda k: f"k={k}")
@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_ends_identical(ranks, name, k):
    first, second = (result[f"mlp/{name}/{k}"] for result in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"]))
    for index, state in first["states"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second["states"][index][key]), key


@pytest.mark.parametrize("k", ACCUMULATION, ids=lambda k: f"k={k}")
def test_elements_all_reduced_per_step_are_as_predicted(ranks, k):
    expected = [FULL_ELEMENTS if i in REFRESH_ITERATIONS else LOW_RANK_ELEMENTS for i in range(STEPS)]
    for result in ranks:
        for name in CASES:
            assert result[f"mlp/{name}/{k}"]["elements"] == expected


@pytest.mark.parametrize("k", ACCUMULATION, ids=lambda k: f"k={k}")
def test_hook_order_and_missing_gradients_are_handled(ranks, k):
    """Rank 1's hooks fire in the other order; branch b has no gradient on rank 1 at step 2 (it steps on
    rank 0's half) and none anywhere at step 5 (it does not step), as with one process."""
    expected = _single_process(_train_branches, k)
    b_steps = [state["step"] for i, state in expected["states"].items() if i % 4 >= 2]  # b's weights
    assert b_steps and all(step == STEPS - 1 for step in b_steps)  # step 5 did not count for b
    for result in ranks:
        _assert_follows(result[f"branches/{k}"], expected)


def test_bytes_in_flight_do_not_change_the_result(ranks):
    for result in ranks:
        bounded, default = result["one_in_flight"], result["mlp/GaLoreAdamW8bit/3"]
        assert all(torch.equal(a, b) for a, b in zip(bounded["params"], default["params"]))


def test_bad_arguments_are_refused(ranks):
    assert ranks[0]["refusals"] == [
        "ValueError: max_inflight_bytes must be an int >= 0, got -1",
        "RuntimeError: this optimizer already has a LayerwiseDataParallel",
    ]
    with pytest.raises(ValueError, match="needs a GaLore optimizer built with layerwise=True, got GaLoreAdamW with "
                                         "layerwise=False; without layer-wise mode, wrap the model in Distributed"):
        LayerwiseDataParallel(GaLoreAdamW(_mlp().parameters()))
    with pytest.raises(ValueError, match="got SGD"):
        LayerwiseDataParallel(torch.optim.SGD(_mlp().parameters()))
    with pytest.raises(RuntimeError, match="needs torch.distributed: call init_process_group first"):
        LayerwiseDataParallel(_optimizer("GaLoreAdamW", _mlp(), 1))


def test_sends_start_inside_backward(ranks):
    """Overlap: by the time the first layer's gradient arrives, the last layer's windows are on the wire."""
    for result in ranks:
        for sent_then, sent_in_all in result["sent_mid_backward"]:
            assert 0 < sent_then < sent_in_all
