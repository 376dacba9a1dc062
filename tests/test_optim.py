"""GaLoreAdamW / GaLoreAdamW8bit: arguments, edge cases, checkpoints, AMP and schedulers."""

import warnings

import pytest
import torch

from case_ids import case_id, named_by_inputs
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit
from optim_helpers import OPTIMIZERS, parameter_zoo, run_steps, save_and_load, zoo_gradients
from tolerances import CPU_VS_CUDA_ATOL, CPU_VS_CUDA_RTOL


def _assert_same_state(opt_a, opt_b):
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys()
        for name, value in state_a[key].items():
            other = state_b[key][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (key, name)
            else:
                assert value == other, (key, name)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=case_id)
def test_checkpoint_resume_is_bit_identical(cls, kwargs, dtype):
    params_a, groups_a = parameter_zoo(dtype)
    opt_a = cls(groups_a, lr=1e-2, weight_decay=0.01, **kwargs)
    run_steps(opt_a, params_a, 9)

    params_b, groups_b = parameter_zoo(dtype)
    opt_b = cls(groups_b, lr=1e-2, weight_decay=0.01, **kwargs)
    run_steps(opt_b, params_b, 4)
    checkpoint = save_and_load({"model": {k: p.detach() for k, p in params_b.items()}, "optim": opt_b.state_dict()})

    params_c, groups_c = parameter_zoo(dtype, seed=1)  # different initial values: everything comes from the checkpoint
    with torch.no_grad():
        for name, p in params_c.items():
            p.copy_(checkpoint["model"][name])
    opt_c = cls(groups_c, lr=1e-2, weight_decay=0.01, **kwargs)
    opt_c.load_state_dict(checkpoint["optim"])
    run_steps(opt_c, params_c, 5, start=4)

    for name in params_a:
        assert torch.equal(params_a[name], params_c[name]), name
        assert params_c[name].dtype == dtype
    _assert_same_state(opt_a, opt_c)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_state_layout_and_edge_cases(cls, kwargs):
    params, groups = parameter_zoo()
    initial = {k: p.detach().clone() for k, p in params.items()}
    opt = cls(groups, lr=1e-2, **kwargs)
    run_steps(opt, params, 4)
    st = opt.state
    assert st[params["wide"]]["projector"].shape == (8, 24)  # left: B is r × m
    assert st[params["wide"]]["exp_avg"].shape == (8, 40)
    assert st[params["tall"]]["projector"].shape == (8, 24)  # right: B is r × n
    assert st[params["tall"]]["exp_avg"].shape == (8, 40)
    assert st[params["conv"]]["projector"].shape == (6, 6)  # 6 × 40 → left, rank clamped to 6
    assert "projector" not in st[params["bias"]] and "projector" not in st[params["plain"]]
    assert st[params["tiny"]]["projector"].shape == (3, 5)  # reverse_std of 3 × 5: right, rank clamped to 3
    assert st[params["full"]]["projector_right"].shape == (4, 20) and st[params["full"]]["exp_avg"].shape[0] == 4
    assert st[params["empty"]]["step"] == 4 and params["empty"].shape == (0, 8)
    assert st[params["plain"]]["step"] == 3  # its gradient was None on step 2
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        if p.numel():
            assert not torch.equal(p.detach(), initial[name]), name
    for state in st.values():
        for value in state.values():
            assert isinstance(value, (torch.Tensor, int)), type(value)
    quantized = [s for s in st.values() if "exp_avg_absmax" in s]
    assert bool(quantized) == (cls is GaLoreAdamW8bit)
    for s in quantized:
        assert s["exp_avg"].dtype == torch.uint8 and s["exp_avg_absmax"].dtype == torch.float32


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit], ids=lambda cls: cls.__name__)
def test_bf16_state_keeps_its_dtypes_through_load(cls):
    params, groups = parameter_zoo(torch.bfloat16)
    opt = cls(groups, lr=1e-2)
    run_steps(opt, params, 2)
    opt.load_state_dict(save_and_load(opt.state_dict()))
    s = opt.state[params["wide"]]
    assert s["projector"].dtype == torch.bfloat16
    assert (s.get("exp_avg_absmax", s["exp_avg"])).dtype == torch.float32
    assert opt.state[params["bias"]]["exp_avg_sq"].dtype == torch.float32


def test_galore_torch_param_group_code_works_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    # As in galore-torch's README.
    galore_params = [model[0].weight, model[2].weight]
    id_galore_params = [id(p) for p in galore_params]
    regular_params = [p for p in model.parameters() if id(p) not in id_galore_params]
    param_groups = [
        {"params": regular_params},
        {"params": galore_params, "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    opt = GaLoreAdamW(param_groups, lr=0.03)
    assert opt.param_groups[1]["svd"] == "randomized" and "rank" not in opt.param_groups[0]
    x = torch.randn(64, 16)
    y = x @ torch.randn(16, 4)  # a learnable target (a teacher map), not noise
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]  # measured 0.31-0.40 over seeds 0-3


@pytest.mark.parametrize(
    "kwargs, message",
    named_by_inputs([
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be a finite"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"betas": 0.9}, "betas must be a pair"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
        ({"seed": -1}, "seed must be an int"),
    ]),
)
def test_bad_arguments_raise_value_error(kwargs, message):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([p], **kwargs)


@pytest.mark.parametrize(
    "group, message",
    named_by_inputs([
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"rank": 4.0}, "rank must be an int >= 1, got 4.0"),
        ({"rank": True}, "rank must be an int"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap must be an int >= 1"),
        ({"rank": 4, "proj_type": "diag"}, r"proj_type must be one of \('std'"),
        ({"rank": 4, "svd": "qr"}, r"svd must be one of \('randomized', 'exact'\)"),
        ({"rank": 4, "scale": 0}, "scale must be > 0"),
        ({"rank": 4, "svd_power_iters": -1}, "svd_power_iters must be an int >= 0"),
        ({"rank": 4, "lr": -0.5}, "lr must be >= 0"),
    ]),
)
def test_bad_groups_raise_value_error(group, message):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([{"params": [p], **group}])
    opt = GaLoreAdamW([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [p], **group})
    assert len(opt.param_groups) == 1  # the bad group was not kept


def test_min_8bit_size_checked():
    with pytest.raises(ValueError, match="min_8bit_size must be an int >= 0"):
        GaLoreAdamW8bit([torch.nn.Parameter(torch.randn(3))], min_8bit_size=-5)


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], backend="triton")
    w.grad = torch.randn(8, 8)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"):
        opt.step()
    assert torch.equal(w, before)


def test_sparse_and_complex_gradients_raise_before_any_update():
    dense = torch.nn.Parameter(torch.randn(4, 4))
    sparse = torch.nn.Parameter(torch.randn(4, 4))
    opt = GaLoreAdamW([{"params": [dense, sparse], "rank": 2}])
    dense.grad = torch.randn(4, 4)
    sparse.grad = torch.randn(4, 4).to_sparse()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, before) and not opt.state
    cplx = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    cplx.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="real floating-point"):
        GaLoreAdamW([cplx]).step()


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_that_parameter(cls, kwargs, bad):
    params, groups = parameter_zoo()
    opt = cls(groups, lr=1e-2, **kwargs)
    run_steps(opt, params, 3)  # step 3 is a refresh step for the "wide" group: the projector must survive
    snapshot = {
        k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in opt.state.items()
    }
    weights = {k: p.detach().clone() for k, p in params.items()}
    grads = zoo_gradients(params, 3)
    grads["wide"][2, 3] = bad
    for name, g in grads.items():
        params[name].grad = g
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        grads["tall"][0, 0] = bad
        params["tall"].grad = grads["tall"]
        opt.step()
    assert sum("NaN or Inf" in str(w.message) for w in caught) == 1
    wide = params["wide"]
    assert torch.equal(wide, weights["wide"])
    for name, value in snapshot[wide].items():
        if name == "nonfinite_skips":
            assert opt.state[wide][name] == 2  # skipped on both steps (its gradient stayed bad)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(opt.state[wide][name], value), name
        else:
            assert opt.state[wide][name] == value, name
    assert opt.state[params["tall"]]["nonfinite_skips"] == 1
    assert not torch.equal(params["conv"], weights["conv"])  # the others stepped


def test_nonfinite_raise_mode():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [p], "rank": 2}], nonfinite="raise")
    p.grad = torch.full((8, 8), float("nan"))
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(p, before)


def test_closure_returns_loss():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.state[w]["step"] == 1


def test_lr_scheduler_drives_each_step():
    def run(schedule):
        params, groups = parameter_zoo()
        opt = GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=64)
        lrs = []
        if schedule:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 3))
        for step in range(6):
            if not schedule:
                for g in opt.param_groups:
                    g["lr"] = 1e-2 * min(1.0, step / 3)
            lrs.append(opt.param_groups[1]["lr"])
            run_steps(opt, params, 1, start=step)
            if schedule:
                sched.step()
        return params, lrs

    scheduled, lrs = run(True)
    manual, _ = run(False)
    assert lrs[0] == 0.0 and lrs[-1] == pytest.approx(1e-2)
    for name in scheduled:
        assert torch.equal(scheduled[name], manual[name]), name


def test_lr_zero_first_step_leaves_weights():
    params, groups = parameter_zoo()
    opt = GaLoreAdamW(groups, lr=0.0, weight_decay=0.1)
    before = {k: p.detach().clone() for k, p in params.items()}
    run_steps(opt, params, 1)
    for name in params:
        assert torch.equal(params[name], before[name])


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_grad_scaler_steps_like_unscaled_and_skips_overflow(cls, kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randn(32, 8)

    def train(use_scaler, overflow_at=None):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
        groups = [
            {"params": [model[0].bias, model[2].bias]},
            {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 3},
        ]
        opt = cls(groups, lr=1e-2, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        for step in range(6):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if step == overflow_at:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return model, opt, scaler

    plain, _, _ = train(False)
    scaled, _, _ = train(True)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)  # power-of-two scaling is exact in fp32
    skipped, opt, scaler = train(True, overflow_at=2)
    assert scaler.get_scale() < 2.0**10
    assert opt.state[skipped[0].weight]["step"] == 5
    assert all(torch.isfinite(p).all() for p in skipped.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit], ids=lambda cls: cls.__name__)
def test_checkpoint_moves_between_cpu_and_cuda(cls):
    params, groups = parameter_zoo()
    opt = cls(groups, lr=1e-2)
    run_steps(opt, params, 4)
    saved = save_and_load(opt.state_dict())

    cuda_params, cuda_groups = parameter_zoo(device="cuda")
    with torch.no_grad():
        for name, p in cuda_params.items():
            p.copy_(params[name])
    opt_cuda = cls(cuda_groups, lr=1e-2)
    opt_cuda.load_state_dict(saved)
    for state in opt_cuda.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.is_cuda
    reloaded = cls(parameter_zoo()[1], lr=1e-2)
    reloaded.load_state_dict(save_and_load(opt_cuda.state_dict()))
    _assert_same_state(opt, reloaded)  # CPU → CUDA → CPU is exact

    run_steps(opt, params, 3, start=4)
    run_steps(opt_cuda, cuda_params, 3, start=4)
    for name, p in params.items():
        torch.testing.assert_close(cuda_params[name].cpu(), p, rtol=CPU_VS_CUDA_RTOL, atol=CPU_VS_CUDA_ATOL)


def test_raise_mode_changes_nothing_when_a_later_parameter_is_bad():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [a, b], "rank": 2}], nonfinite="raise")
    a.grad, b.grad = torch.randn(8, 8), torch.full((8, 8), float("nan"))
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(a, before)
    assert not opt.state  # nothing was created either


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_huge_finite_gradient_is_skipped_not_poisoning_state(cls, kwargs):
    # Squared, 1e22 overflows fp32: Adam's second moment would become Inf and 8-bit state NaN.
    params, groups = parameter_zoo()
    opt = cls(groups, lr=1e-2, **kwargs)
    run_steps(opt, params, 2)
    wide = params["wide"]
    before = wide.detach().clone()
    grads = zoo_gradients(params, 2)
    grads["wide"][0, 0] = 1e22
    for name, g in grads.items():
        params[name].grad = g
    with pytest.warns(RuntimeWarning, match="norm of at least 2"):
        opt.step()
    assert torch.equal(wide, before) and opt.state[wide]["nonfinite_skips"] == 1
    run_steps(opt, params, 3, start=3)
    for p in params.values():
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all()


def test_load_state_dict_fills_galore_torch_groups_and_checks_them():
    params, groups = parameter_zoo()
    opt = GaLoreAdamW(groups, lr=1e-2)
    run_steps(opt, params, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in ("svd", "svd_oversample", "svd_power_iters"):
            group.pop(key, None)  # as galore-torch writes them
    fresh = GaLoreAdamW(parameter_zoo()[1], lr=1e-2)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[1]["svd"] == "randomized"
    bad = opt.state_dict()
    bad["param_groups"][1]["rank"] = 0
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        fresh.load_state_dict(bad)


def test_load_state_dict_rejects_state_that_does_not_fit_and_changes_nothing():
    params, groups = parameter_zoo()
    opt = GaLoreAdamW(groups, lr=1e-2)
    run_steps(opt, params, 2)
    other_params, other_groups = parameter_zoo()
    target = GaLoreAdamW8bit(other_groups, lr=1e-2, min_8bit_size=64)
    run_steps(target, other_params, 1)
    snapshot = {id(p): dict(s) for p, s in target.state.items()}
    with pytest.raises(ValueError, match="saved by the other optimizer class"):
        target.load_state_dict(opt.state_dict())
    assert {id(p): dict(s) for p, s in target.state.items()}.keys() == snapshot.keys()
    assert target.state[other_params["wide"]]["step"] == 1
    swapped = opt.state_dict()
    state = swapped["state"]
    state[1], state[3] = state[3], state[1]  # "wide" and "conv" states exchanged
    with pytest.raises(ValueError, match=r"state of parameter 1 \(shape \(24, 40\)\)"):
        GaLoreAdamW(parameter_zoo()[1], lr=1e-2).load_state_dict(swapped)


def test_tensor_lr_and_numpy_rank_are_accepted():
    import numpy as np

    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": np.int64(2)}], lr=torch.tensor(1e-2))
    w.grad = torch.randn(8, 6)
    opt.step()
    assert opt.state[w]["projector"].shape == (2, 6) and type(opt.param_groups[0]["rank"]) is int


def test_float64_parameters_step_like_torch_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    # eps = 0: torch adds ε to √v̂, galore-torch's convention (ours) to √v; without it the two agree exactly.
    opt = GaLoreAdamW([ours], lr=1e-2, eps=0.0, weight_decay=0.1)
    reference = torch.optim.AdamW([theirs], lr=1e-2, eps=0.0, weight_decay=0.1)
    for _ in range(10):
        ours.grad = torch.randn_like(ours)
        theirs.grad = ours.grad.clone()
        opt.step()
        reference.step()
    assert opt.state[ours]["exp_avg"].dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=case_id)
def test_float64_projected_parameters_step(cls, kwargs):
    w = torch.nn.Parameter(torch.randn(64, 48, dtype=torch.float64))
    opt = cls([{"params": [w], "rank": 4, "update_proj_gap": 3}], lr=1e-3, **kwargs)
    start = w.detach().clone()
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    assert w.dtype == torch.float64 and torch.isfinite(w).all() and not torch.equal(w, start)
    # The step computes in float64: the update is not rounded to fp32 on its way into the weight.
    assert not torch.equal(w, w.float().double())


def test_a_zero_gradient_does_not_fix_the_projector():
    """A zero-initialized readout makes the layer below get an all-zero gradient at step 0: no projector is
    taken from it, and the next step with a gradient refreshes; the schedule keeps its phase."""
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 50, "svd": "exact"}], lr=1e-3)
    w.grad = torch.zeros_like(w)
    opt.step()
    state = opt.state[w]
    assert state["pending_refresh"] == 1 and state["refresh_offset"] == 0 and not state["projector"].any()
    gradient = torch.randn(32, 24)
    w.grad = gradient.clone()
    opt.step()
    from galore_kernels.projector import compute_projector

    torch.testing.assert_close(state["projector"], compute_projector(gradient, 4, "right", method="exact"))
    w.grad = torch.randn(32, 24)
    before = state["projector"].clone()
    opt.step()
    assert torch.equal(state["projector"], before) and state["pending_refresh"] == 0  # next refresh: step 50


def test_zero_gradients_keep_the_spread_schedule():
    layers = [torch.nn.Parameter(torch.randn(32, 24)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": layers, "rank": 4, "update_proj_gap": 8}], lr=1e-3, refresh_schedule="spread")
    for p in layers:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert [opt.state[p]["refresh_offset"] for p in layers] == [0, 2, 4, 6]


def test_a_subnormal_gradient_is_negligible_but_a_tiny_normal_one_is_not():
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    w.grad = torch.full_like(w, 1e-40)  # subnormal in fp32: products of it flush to zero
    opt.step()
    assert opt.state[w]["pending_refresh"] == 1
    w.grad = torch.randn_like(w) * 1e-20
    opt.step()
    assert opt.state[w]["projector"].any()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"rank": 8}, "rank, proj_type and experts are fixed"),
        ({"proj_type": "left"}, "rank, proj_type and experts are fixed"),
        ({"lr": float("nan")}, "lr must be a finite real number"),
        ({"scale": float("nan")}, "scale must be a finite real number"),
        ({"update_proj_gap": 0}, "update_proj_gap must be an int >= 1"),
    ],
    ids=named_by_inputs,
)
def test_group_edits_after_state_exists_raise_before_anything_changes(edit, message):
    w = torch.nn.Parameter(torch.randn(32, 24))
    b = torch.nn.Parameter(torch.randn(24))
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 4, "update_proj_gap": 5}], lr=1e-3)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    opt.param_groups[1].update(edit)
    snapshot = (w.detach().clone(), b.detach().clone(), {k: v.clone() for k, v in opt.state[w].items() if
                                                          isinstance(v, torch.Tensor)})
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(w, snapshot[0]) and torch.equal(b, snapshot[1])
    assert all(torch.equal(opt.state[w][k], v) for k, v in snapshot[2].items())


def test_removing_rank_after_state_exists_raises():
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    del opt.param_groups[0]["rank"]
    with pytest.raises(ValueError, match="does not fit"):
        opt.step()


def test_valid_edits_of_schedule_values_are_taken():
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 5}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0].update(update_proj_gap=2, scale=0.5, lr=1e-4)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["step"] == 4


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda st: st.update(step=-1), "'step' must be an int >= 0"),
        (lambda st: st["exp_avg"].fill_(float("nan")), "'exp_avg' holds NaN or Inf"),
        (lambda st: st["exp_avg_sq"].fill_(float("inf")), "'exp_avg_sq' holds NaN or Inf"),
    ],
    ids=["negative-step", "nan-moment", "inf-moment"],
)
def test_loading_a_negative_step_or_nonfinite_moments_is_refused(corrupt, message):
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = save_and_load(opt.state_dict())
    corrupt(saved["state"][0])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert opt.state[w]["step"] == 1 and torch.isfinite(opt.state[w]["exp_avg"]).all()


def test_loading_another_optimizers_state_names_it():
    w = torch.nn.Parameter(torch.randn(32, 24))
    adamw = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    adamw.step()
    opt = GaLoreAdamW([w], lr=1e-3)
    with pytest.raises(ValueError, match="saved by torch.optim.AdamW"):
        opt.load_state_dict(adamw.state_dict())
    galore_torch = pytest.importorskip("galore_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 200, "scale": 0.25,
                                            "proj_type": "std"}], lr=1e-3)
    theirs.step()
    ours = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    with pytest.raises(ValueError, match="saved by galore-torch"):
        ours.load_state_dict(theirs.state_dict())


def test_a_parameter_that_keeps_skipping_warns_again_with_its_shape():
    w = torch.nn.Parameter(torch.randn(32, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            w.grad = torch.full_like(w, float("nan"))
            opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert "(32, 24) has skipped its last 10 steps" in messages[1]


def test_the_nonfinite_warning_points_at_the_callers_line():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([w], lr=1e-3)
    w.grad = torch.full_like(w, float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert caught and caught[0].filename == __file__


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_compiled_step_equals_eager_and_compiles_once(svd):
    dynamo = pytest.importorskip("torch._dynamo")

    def run(compiled):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(32, 24))
        b = torch.nn.Parameter(torch.randn(24))
        opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 4, "update_proj_gap": 3, "svd": svd}], lr=1e-2)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(7):  # refreshes at steps 0, 3 and 6
            w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            step()
        return w.detach(), b.detach()

    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = run(compiled=True)
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    eager = run(compiled=False)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    assert graphs <= 1  # at most the thin wrapper around step(), never a graph per step


def test_loading_a_bitsandbytes_8bit_state_names_it():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.nn.Parameter(torch.randn(64, 64))
    theirs = bnb.optim.AdamW8bit([w], lr=1e-3, min_8bit_size=0)
    w.grad = torch.randn_like(w)
    theirs.step()
    with pytest.raises(ValueError, match="bitsandbytes-style 8-bit optimizer"):
        GaLoreAdamW8bit([w], lr=1e-3).load_state_dict(theirs.state_dict())
