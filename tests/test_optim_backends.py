"""The optimizers on backend="triton" (interpreter on CPU, kernels on CUDA) against backend="torch":
params and every state tensor over 8 steps with refreshes inside, a state_dict round trip in the middle,
and a switch of backend mid-run. Eight steps of the parameter zoo through the interpreter take seconds
per case: marked ``slow``."""

import pytest
import torch

from case_ids import case_id
from kernel_cases import DEVICE, tolerance
from optim_helpers import OPTIMIZERS, parameter_zoo, run_steps, save_and_load
from tolerances import (
    ABSMAX_8BIT,
    BACKENDS_STATE,
    BACKENDS_ZOO_MOVED,
    CODES_DIFFERING,
    CODES_MORE_THAN_ONE_APART,
    rel_err,
)

pytestmark = pytest.mark.slow


def _reloaded(opt, cls, groups, backend, kwargs):
    """A new optimizer on ``backend`` continuing from ``opt``'s state saved and loaded through bytes."""
    fresh = cls(groups, lr=1e-2, weight_decay=0.01, backend=backend, **kwargs)
    fresh.load_state_dict(save_and_load(opt.state_dict()))
    return fresh


def _assert_runs_agree(params_a, opt_a, params_b, opt_b, dtype, start):
    for name in params_a:
        # Distance travelled from the common start: a wrong update cannot hide inside the weight's norm.
        moved_a = params_a[name].detach().cpu().double() - start[name].double()
        moved_b = params_b[name].detach().cpu().double() - start[name].double()
        assert rel_err(moved_b, moved_a) <= BACKENDS_ZOO_MOVED[dtype], name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key, entries in state_a.items():
        for name, value in entries.items():
            other = state_b[key][name]
            if not isinstance(value, torch.Tensor):
                assert value == other, (key, name)
            elif value.dtype == torch.uint8:
                # Codes of runs that differ by rounding: nearly all equal, the rest one code apart.
                diff = (value.int() - other.cpu().int()).abs()
                assert (diff > 1).sum() <= max(1, int(diff.numel() * CODES_MORE_THAN_ONE_APART)), (key, name)
                assert (diff > 0).float().mean() <= CODES_DIFFERING, (key, name)
            elif name.endswith("absmax"):
                assert rel_err(value, other.cpu()) <= max(ABSMAX_8BIT, tolerance(dtype)), (key, name)
            elif name.startswith("projector"):
                # Same subspace (rows may differ in sign or rotate within near-equal singular values).
                a, b = value.double(), other.cpu().double()
                assert rel_err(b.T @ b, a.T @ a) <= max(BACKENDS_STATE, tolerance(dtype)), (key, name)
            else:
                assert rel_err(value, other.cpu()) <= max(BACKENDS_STATE, tolerance(dtype)), (key, name)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
def test_triton_backend_equals_torch_backend(cls, kwargs, dtype):
    params_t, groups_t = parameter_zoo(dtype)
    start = {name: p.detach().clone() for name, p in params_t.items()}
    opt_t = cls(groups_t, lr=1e-2, weight_decay=0.01, backend="torch", **kwargs)
    run_steps(opt_t, params_t, 8, start=0)

    params_k, groups_k = parameter_zoo(dtype, device=DEVICE)
    opt_k = cls(groups_k, lr=1e-2, weight_decay=0.01, backend="triton", **kwargs)
    run_steps(opt_k, params_k, 4, start=0)
    opt_k = _reloaded(opt_k, cls, groups_k, "triton", kwargs)
    run_steps(opt_k, params_k, 4, start=4)
    _assert_runs_agree(params_t, opt_t, params_k, opt_k, dtype, start)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("first, second", [("triton", "torch"), ("torch", "triton")])
def test_switching_backend_mid_run(cls, kwargs, first, second):
    params_a, groups_a = parameter_zoo()
    start = {name: p.detach().clone() for name, p in params_a.items()}
    opt_a = cls(groups_a, lr=1e-2, weight_decay=0.01, backend="torch", **kwargs)
    run_steps(opt_a, params_a, 8, start=0)

    params_b, groups_b = parameter_zoo(device=DEVICE)
    opt_b = cls(groups_b, lr=1e-2, weight_decay=0.01, backend=first, **kwargs)
    run_steps(opt_b, params_b, 4, start=0)
    opt_b = _reloaded(opt_b, cls, groups_b, second, kwargs)  # same state format: the other backend continues
    run_steps(opt_b, params_b, 4, start=4)
    _assert_runs_agree(params_a, opt_a, params_b, opt_b, torch.float32, start)
