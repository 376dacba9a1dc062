"""Layer-wise mode: steps inside backward equal the plain optimizer's, with accumulation, schedulers,
checkpoints, clipping and the gradient norm; and it keeps at most one full gradient alive."""

import gc
import math
import warnings
import weakref

import pytest
import torch

from case_ids import named_by_inputs
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit, functional
from optim_helpers import OPTIMIZERS, save_and_load
from tiny_models import synthetic_tokens, tiny_llama
from tolerances import (
    CLIPPING_NORM_RTOL,
    CODES_DIFFERING,
    GRAD_NORM_RTOL,
    LAYERWISE_8BIT_ACCUMULATED_STATE,
    LAYERWISE_8BIT_ACCUMULATED_WEIGHTS,
    LAYERWISE_LLAMA_ACCUMULATED_WEIGHTS,
    LAYERWISE_BF16_ACCUMULATED,
    LAYERWISE_CUDA,
    LAYERWISE_LOSS,
    LAYERWISE_STATE,
    LAYERWISE_TRITON_ACCUMULATED,
    LAYERWISE_WEIGHTS,
    rel_err,
)

STEPS = 20
GAP = 7  # refreshes at steps 0, 7 and 14 of 20


def _mlp(layers=4, width=32, seed=0):
    torch.manual_seed(seed)
    blocks = [m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.Tanh())]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(width, 4))


def _groups(model, rank=4, **galore):
    projected = [p for p in model.parameters() if p.dim() == 2]
    regular = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": regular}, {"params": projected, "rank": rank, "update_proj_gap": GAP, **galore}]


def _llama_groups(model):
    projected = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
    regular = [p for p in model.parameters() if all(p is not q for q in projected)]
    # The exact SVD: the randomized refresh turns the fp32 rounding between an accumulated projected sum and
    # the plain sum into a different basis (measured on this AMD EPYC: moments 1e-2 to 0.35 apart after
    # 20 steps, k = 4; exact SVD 5e-7), which would test the refresh's sensitivity, not accumulation.
    return [{"params": regular}, {"params": projected, "rank": 8, "update_proj_gap": GAP, "scale": 0.5, "svd": "exact"}]


def _mlp_loss(model, gen):
    x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 4, generator=gen)
    return ((model(x) - y) ** 2).mean()


def _llama_loss(model, gen):
    tokens = synthetic_tokens(4, 16, 128, gen)
    return model(input_ids=tokens, labels=tokens).loss


def _train(model, opt, loss_fn, k, steps, *, start=0, scheduler=None, hook=None):
    """``steps`` optimizer steps of ``k`` backward passes each, with data seeded by the step."""
    losses = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for _ in range(k):
            loss = loss_fn(model, gen)
            loss.backward()
            losses.append(loss.item())
        if hook is not None:
            hook(step)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8))


def _assert_close_models(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel_err(q, p) <= tol, (name, rel_err(q, p))


def _assert_close_states(opt_a, opt_b, tol, code_step=1):
    """Every state entry of the two optimizers: equal counters, tensors within ``tol``, 8-bit codes at most
    ``code_step`` apart and few of them different."""
    params_a = [p for g in opt_a.param_groups for p in g["params"]]
    params_b = [p for g in opt_b.param_groups for p in g["params"]]
    for sa, sb in zip((opt_a.state[p] for p in params_a), (opt_b.state[p] for p in params_b)):
        assert sa.keys() == sb.keys()
        for key, va in sa.items():
            vb = sb[key]
            if not isinstance(va, torch.Tensor):
                assert va == vb, key
            elif va.dtype == torch.uint8:  # 8-bit codes: neighbours where a rounding difference met a tie
                assert (va.int() - vb.int()).abs().le(code_step).all(), key
                assert (va != vb).float().mean() <= CODES_DIFFERING, key
            else:
                assert rel_err(vb, va) <= tol, (key, rel_err(vb, va))


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("k", [1, 4], ids=["k=1", "k=4"])  # backward passes per step
@pytest.mark.parametrize("schedule", ["aligned", "spread"])
def test_mlp_layerwise_equals_plain(cls, kwargs, k, schedule):
    runs = {}
    for layerwise in (False, True):
        model = _mlp()
        opt = cls(
            _groups(model), lr=1e-2, refresh_schedule=schedule, layerwise=layerwise,
            accumulation_steps=k if layerwise else 1, **kwargs,
        )
        _train(model, opt, _mlp_loss, k, STEPS, scheduler=_warmup(opt))
        runs[layerwise] = model, opt
    (plain, plain_opt), (layer, layer_opt) = runs[False], runs[True]
    if k == 1:  # the same calls on the same gradients
        for p, q in zip(plain.parameters(), layer.parameters()):
            assert torch.equal(p, q)
    _assert_close_models(plain, layer, LAYERWISE_WEIGHTS)
    _assert_close_states(plain_opt, layer_opt, LAYERWISE_STATE)
    assert all(s["step"] == STEPS for s in layer_opt.state.values())


@pytest.mark.slow  # 20 steps of a transformers Llama in both modes: seconds per case
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("k", [1, 4], ids=["k=1", "k=4"])  # backward passes per step
def test_tiny_llama_layerwise_equals_plain(cls, kwargs, k):
    runs = {}
    for layerwise in (False, True):
        model = tiny_llama(hidden_size=32, layers=2)
        opt = cls(_llama_groups(model), lr=3e-3, layerwise=layerwise, accumulation_steps=k if layerwise else 1,
                  **kwargs)
        losses = _train(model, opt, _llama_loss, k, STEPS, scheduler=_warmup(opt))
        runs[layerwise] = model, opt, losses
    (plain, plain_opt, plain_losses), (layer, layer_opt, layer_losses) = runs[False], runs[True]
    if k == 1:
        _assert_close_states(plain_opt, layer_opt, LAYERWISE_STATE)
    else:  # flipped 8-bit codes of the embedding move their neighbours' values a little further
        _assert_close_states(plain_opt, layer_opt, LAYERWISE_8BIT_ACCUMULATED_STATE, code_step=255)
    # 8-bit with accumulation: the projected sums' fp32 rounding flips a few moment codes of the embedding;
    # everything else agrees to fp32 rounding.
    accumulated_8bit = cls is GaLoreAdamW8bit and k > 1
    weights_bar = LAYERWISE_WEIGHTS if k == 1 else LAYERWISE_LLAMA_ACCUMULATED_WEIGHTS
    _assert_close_models(plain, layer, LAYERWISE_8BIT_ACCUMULATED_WEIGHTS if accumulated_8bit else weights_bar)
    assert layer_losses[-1] < layer_losses[0]
    assert max(abs(a - b) for a, b in zip(plain_losses, layer_losses)) < LAYERWISE_LOSS


def test_each_step_uses_the_scheduler_learning_rate(monkeypatch):
    used = []  # (parameter step, lr) as each parameter's step saw it
    for name in ("galore_adamw_step", "galore_adamw_step_from_projection", "adamw"):
        real = getattr(functional, name)

        def spy(param, grad, state, hyper, *args, _real=real, **kwargs):
            steps = [s["step"] for s in state] if isinstance(state, list) else [state["step"]]
            used.extend((t, hyper.lr) for t in steps)
            return _real(param, grad, state, hyper, *args, **kwargs)

        monkeypatch.setattr(functional, name, spy)
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2)
    _train(model, opt, _mlp_loss, 2, 10, scheduler=_warmup(opt))
    expected = [1e-2 * min(1.0, (s + 1) / 8) for s in range(10)]
    n_params = len(list(model.parameters()))
    assert len(used) == 10 * n_params
    for t, lr in used:
        assert lr == pytest.approx(expected[t], rel=1e-12), (t, lr)


def _observe_live_grads(model, holder):
    """Largest sum of bytes of full gradients alive (in .grad or an open window) seen from any hook.

    Register it before the optimizer's hooks (the optimizer goes into ``holder["opt"]`` later), so it
    runs while the newest gradient is still in .grad.
    """
    peak = [0]

    def observe(_):
        in_grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        peak[0] = max(peak[0], in_grads + holder["opt"].accumulation_bytes()[0])

    return peak, [p.register_post_accumulate_grad_hook(observe) for p in model.parameters()]


def _deep_model(layers=10, width=64):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_at_most_one_full_gradient_alive(layerwise):
    model = _deep_model()
    holder = {}
    peak, _ = _observe_live_grads(model, holder)
    opt = holder["opt"] = GaLoreAdamW8bit([{"params": list(model.parameters()), "rank": 4}], lr=1e-3,
                                          layerwise=layerwise)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(16, 64, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    one = 64 * 64 * 4
    assert peak[0] == (one if layerwise else 10 * one)


def test_spread_refreshes_keep_fewer_full_gradients_while_accumulating():
    peaks, offsets = {}, {}
    for schedule in ("aligned", "spread"):
        model = _deep_model()
        holder = {}
        peak, _ = _observe_live_grads(model, holder)
        opt = holder["opt"] = GaLoreAdamW8bit(
            [{"params": list(model.parameters()), "rank": 4, "update_proj_gap": 5}],
            lr=1e-3, layerwise=True, accumulation_steps=4, refresh_schedule=schedule,
        )
        gen = torch.Generator().manual_seed(0)
        per_step = []
        for _ in range(10):
            peak[0] = 0
            for _ in range(4):
                model(torch.randn(16, 64, generator=gen)).square().mean().backward()
            opt.step()
            per_step.append(peak[0])
        peaks[schedule] = per_step
        offsets[schedule] = sorted(s["refresh_offset"] for s in opt.state.values())
    one = 64 * 64 * 4
    assert offsets == {"aligned": [0] * 10, "spread": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]}
    # Step 0 refreshes every parameter in both (there is no projector yet). Aligned, step 5 does again:
    # all ten full gradient sums live through that window.
    # (Each count includes the gradient autograd has just produced, before the hook adds it to its sum.)
    assert peaks["aligned"][0] == peaks["spread"][0] == peaks["aligned"][5] == 11 * one
    # Spread: from step 1 on, only the two parameters sharing an offset keep full sums.
    assert max(peaks["spread"][1:]) == 3 * one, peaks


def test_grad_norm_is_the_global_norm():
    model = _mlp()
    seen = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone())) for p in model.parameters()]
    opt = GaLoreAdamW(_groups(model), lr=1e-3, layerwise=True)
    gen = torch.Generator().manual_seed(0)
    _mlp_loss(model, gen).backward()
    opt.step()
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen])).item()
    assert opt.last_grad_norm == pytest.approx(expected, rel=GRAD_NORM_RTOL)
    for h in handles:
        h.remove()
    plain = GaLoreAdamW(_groups(_mlp()), lr=1e-3)
    assert plain.last_grad_norm is None


def test_clipping_by_the_previous_step_norm():
    """Layer-wise clipping equals scaling each step's gradients by min(1, c / ‖g_{t−1}‖) by hand."""
    max_norm = 0.3
    layer_model, plain_model = _mlp(), _mlp()
    layer_opt = GaLoreAdamW(_groups(layer_model), lr=1e-2, layerwise=True, max_grad_norm=max_norm)
    plain_opt = GaLoreAdamW(_groups(plain_model), lr=1e-2)
    previous, coefs = [None], []

    def clip_by_hand(step):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain_model.parameters()])).item()
        coef = 1.0 if previous[0] is None else min(1.0, max_norm / (previous[0] + 1e-6))  # ε of clip_grad_norm_
        coefs.append(coef)
        for p in plain_model.parameters():
            p.grad.mul_(coef)
        previous[0] = norm

    _train(layer_model, layer_opt, _mlp_loss, 1, STEPS)
    _train(plain_model, plain_opt, _mlp_loss, 1, STEPS, hook=clip_by_hand)
    assert min(coefs) < 0.5  # clipping did act
    _assert_close_models(plain_model, layer_model, LAYERWISE_WEIGHTS)
    assert layer_opt.last_grad_norm == pytest.approx(previous[0], rel=CLIPPING_NORM_RTOL)


def test_checkpoint_resume_mid_run_is_identical():
    def build():
        model = _mlp()
        opt = GaLoreAdamW8bit(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2, max_grad_norm=1.0,
                              refresh_schedule="spread", min_8bit_size=64)
        return model, opt, _warmup(opt)

    model_a, opt_a, sched_a = build()
    _train(model_a, opt_a, _mlp_loss, 2, STEPS, scheduler=sched_a)
    model_b, opt_b, sched_b = build()
    _train(model_b, opt_b, _mlp_loss, 2, 9, scheduler=sched_b)
    saved = save_and_load({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()})
    model_c, opt_c, sched_c = build()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    assert opt_c.last_grad_norm == opt_b.last_grad_norm
    _train(model_c, opt_c, _mlp_loss, 2, STEPS - 9, start=9, scheduler=sched_c)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)


def test_step_closure_zero_grad_and_detach():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2)
    gen = torch.Generator().manual_seed(0)

    def closure():
        loss = _mlp_loss(model, gen)
        loss.backward()
        return loss

    loss = opt.step(closure)  # one backward of two: step() closes the open windows
    assert isinstance(loss, torch.Tensor) and all(s["step"] == 1 for s in opt.state.values())
    _mlp_loss(model, gen).backward()
    opt.zero_grad()  # harmless: the window's gradients live in the optimizer, not in .grad
    assert opt.accumulation_bytes()[0] > 0
    with pytest.raises(RuntimeError, match="middle of an accumulation window"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="middle of an accumulation window"):
        opt.detach_hooks()
    _mlp_loss(model, gen).backward()  # the second backward pass steps every parameter
    assert all(s["step"] == 2 for s in opt.state.values()) and opt.accumulation_bytes() == (0, 0)
    opt.step()
    opt.detach_hooks()
    assert not opt.layerwise
    _mlp_loss(model, gen).backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook took them
    opt.step()
    assert all(s["step"] == 3 for s in opt.state.values())


def test_end_of_epoch_partial_window_equals_plain():
    """Three backward passes with k=2: step() after the third steps on that one gradient, like plain mode."""
    models, opts = (_mlp(), _mlp()), []
    opts = [GaLoreAdamW(_groups(models[0]), lr=1e-2), GaLoreAdamW(_groups(models[1]), lr=1e-2, layerwise=True,
                                                                   accumulation_steps=2)]
    for model, opt in zip(models, opts):
        gen = torch.Generator().manual_seed(0)
        for micro in range(3):
            _mlp_loss(model, gen).backward()
            if micro in (1, 2):
                opt.step()
                opt.zero_grad()
    _assert_close_models(models[0], models[1], LAYERWISE_WEIGHTS)


def test_nonfinite_gradient_skips_only_that_parameter():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    first = model[0].weight
    first.register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert torch.equal(first, before[0]) and opt.state[first]["nonfinite_skips"] == 1
    assert not torch.equal(model[0].bias, before[1])
    assert math.isnan(opt.last_grad_norm)

    with pytest.raises(RuntimeError, match="already steps in another layer-wise optimizer"):
        GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    opt.detach_hooks()
    raising = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, nonfinite="raise")
    with pytest.raises(RuntimeError, match="nonfinite='raise'"):
        _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    assert raising.state[first]["step"] == 0 and torch.equal(first, before[0])


@pytest.mark.parametrize(
    "kwargs, match",
    named_by_inputs([
        ({"accumulation_steps": 2}, "needs layerwise=True"),
        ({"max_grad_norm": 1.0}, "needs layerwise=True"),
        ({"layerwise": True, "accumulation_steps": 0}, "accumulation_steps must be an int >= 1"),
        ({"layerwise": True, "max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"layerwise": "yes"}, "layerwise must be True or False"),
        ({"refresh_schedule": "random"}, r"refresh_schedule must be one of \('aligned', 'spread'\)"),
    ]),
)
def test_bad_layerwise_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW(_groups(_mlp()), **kwargs)


def test_triton_backend_accumulates_like_the_reference():
    """Accumulated windows through the kernels (adam_direction on the summed projections) agree with the
    reference under the interpreter."""
    runs = []
    for backend in ("torch", "triton"):
        model = _mlp(layers=2)
        opt = GaLoreAdamW8bit(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2, backend=backend,
                              min_8bit_size=64)
        _train(model, opt, _mlp_loss, 2, 9)
        runs.append((model, opt))
    _assert_close_models(runs[0][0], runs[1][0], LAYERWISE_TRITON_ACCUMULATED)


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_cuda_layerwise_accumulation_equals_plain(cls, kwargs):
    """On a GPU the kernels run both modes (adam_direction on the summed projections for accumulated windows)."""
    runs = []
    for layerwise in (False, True):
        model = _mlp(width=32).cuda()
        opt = cls(_groups(model), lr=1e-2, layerwise=layerwise, accumulation_steps=4 if layerwise else 1, **kwargs)

        def loss_fn(m, gen):
            x, y = torch.randn(8, 32, generator=gen).cuda(), torch.randn(8, 4, generator=gen).cuda()
            return ((m(x) - y) ** 2).mean()

        _train(model, opt, loss_fn, 4, STEPS)
        runs.append(model)
    _assert_close_models(runs[0], runs[1], LAYERWISE_CUDA)


@pytest.mark.parametrize("k, tol", [(1, 0.0), (4, LAYERWISE_BF16_ACCUMULATED)], ids=["k=1", "k=4"])
def test_bf16_weights(k, tol):
    """bf16 weights: k=1 is the same computation; with k=4, non-refresh windows sum projections in fp32
    while plain mode sums bf16 gradients, so they differ by bf16 rounding."""
    runs = []
    for layerwise in (False, True):
        model = _mlp().to(torch.bfloat16)
        opt = GaLoreAdamW8bit(_groups(model), lr=1e-2, layerwise=layerwise, accumulation_steps=k if layerwise else 1,
                              min_8bit_size=64)

        def loss_fn(m, gen):
            x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 4, generator=gen)
            return ((m(x.bfloat16()).float() - y) ** 2).mean()

        _train(model, opt, loss_fn, k, STEPS)
        runs.append(model)
    _assert_close_models(runs[0], runs[1], tol)


def test_failed_construction_and_deleted_optimizers_leave_no_working_hooks():
    model = _mlp()
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        GaLoreAdamW([{"params": list(model[0].parameters())}, {"params": [model[2].weight], "rank": 0}],
                    layerwise=True)
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)  # no leftover hooks from the failed one
    del opt
    gc.collect()
    before = [p.detach().clone() for p in model.parameters()]
    _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the deleted one does not step
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)  # replaces the orphaned hooks


def test_add_param_group_and_gradients_set_after_a_hook_stepped():
    model = _mlp()
    opt = GaLoreAdamW([{"params": list(model[0].parameters())}], lr=1e-2, layerwise=True)
    other = GaLoreAdamW([{"params": list(model[2].parameters())}], lr=1e-2, layerwise=True)
    with pytest.raises(RuntimeError, match="already steps in another layer-wise optimizer"):
        opt.add_param_group({"params": list(model[2].parameters())})
    assert len(opt.param_groups) == 1
    other.detach_hooks()
    opt.add_param_group({"params": [p for layer in model[2:] for p in layer.parameters()], "rank": 2})
    _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    # What DDP does after backward: write the reduced gradient back into .grad of a parameter that stepped.
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.raises(RuntimeError, match="does not work with DDP or FSDP1"):
        opt.step()


def test_a_skipped_gradient_neither_zeroes_nor_disables_clipping():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, max_grad_norm=1e6)
    handle = model[0].weight.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.warns(RuntimeWarning):
        _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    opt.step()
    handle.remove()
    assert opt.last_grad_norm == math.inf  # logged as it was
    before = model[2].weight.detach().clone()
    _mlp_loss(model, torch.Generator().manual_seed(1)).backward()
    opt.step()
    assert not torch.equal(model[2].weight, before)  # clipped by the applied norm (≈ 1), not scaled by 1e6/inf = 0


def test_detach_hooks_turns_clipping_off_out_loud():
    opt = GaLoreAdamW(_groups(_mlp()), lr=1e-2, layerwise=True, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm clipping is off"):
        opt.detach_hooks()
    assert opt.max_grad_norm is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaLoreAdamW(_groups(_mlp()), lr=1e-2, layerwise=True).detach_hooks()


def test_checkpoints_from_before_refresh_offset_load():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2)
    _train(model, opt, _mlp_loss, 1, 2)
    saved = opt.state_dict()
    for st in saved["state"].values():
        st.pop("refresh_offset", None)
    del saved["galore_kernels"]
    fresh = GaLoreAdamW(_groups(model), lr=1e-2)
    fresh.load_state_dict(save_and_load(saved))
    assert all(st["refresh_offset"] == 0 for st in fresh.state.values() if "seed" in st)


@pytest.mark.parametrize("k", [1, 2])
def test_a_second_step_without_optimizer_step_raises(k):
    """The loop accumulates 2k micro-batches but the optimizer was told k (or step() was forgotten): the
    parameter's second window must not step it again before optimizer.step()."""
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=k)
    gen = torch.Generator().manual_seed(0)
    for _ in range(k):
        _mlp_loss(model, gen).backward()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    with pytest.raises(RuntimeError, match="would step a second time since the last optimizer.step"):
        for _ in range(k):
            _mlp_loss(model, gen).backward()


def test_optimizer_step_between_windows_allows_the_next_one():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(2):
            _mlp_loss(model, gen).backward()
        opt.step()
    assert all(opt.state[p]["step"] == 3 for p in model.parameters())


def test_grad_scaler_is_refused_with_its_cause():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(0)
    scaler.scale(_mlp_loss(model, gen)).backward()
    with pytest.raises(RuntimeError, match="layer-wise mode does not work with torch.amp.GradScaler"):
        scaler.step(opt)
    opt.step()  # the refusal leaves the optimizer usable without the scaler
    _mlp_loss(model, gen).backward()
    opt.step()
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


def test_group_edits_are_checked_inside_backward_before_the_parameter_steps():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    gen = torch.Generator().manual_seed(0)
    _mlp_loss(model, gen).backward()
    opt.step()
    opt.param_groups[1]["rank"] = 8
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="rank, proj_type and experts are fixed"):
        _mlp_loss(model, gen).backward()
    projected = [p for p in model.parameters() if p.dim() == 2]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before) if any(p is q for q in projected))


def test_a_skipped_window_counts_as_the_parameters_step():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (_mlp_loss(model, gen) * float("nan")).backward()  # every window closes on a skipped step
    with pytest.raises(RuntimeError, match="would step a second time"):
        _mlp_loss(model, gen).backward()
    assert opt.accumulation_steps == 1


def _swap_parameters(model, opt):
    """What accelerate's FSDP2 prepare does after the optimizer exists: every parameter of the model and of
    the optimizer's groups is replaced by a new one (there a DTensor slice; here a copy)."""
    replacement = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            replacement[param] = torch.nn.Parameter(param.detach().clone())
            setattr(module, name, replacement[param])
    for group in opt.param_groups:
        group["params"] = [replacement[p] for p in group["params"]]


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_hooks_follow_parameters_swapped_into_the_groups(cls, kwargs):
    reference, swapped = _mlp(), _mlp()
    ref_opt = cls(_groups(reference), lr=1e-2, layerwise=True, **kwargs)
    opt = cls(_groups(swapped), lr=1e-2, layerwise=True, **kwargs)
    originals = [weakref.ref(p) for p in swapped.parameters()]
    _swap_parameters(swapped, opt)
    opt.sync_layerwise_hooks()
    gc.collect()
    assert all(ref() is None for ref in originals)  # the hooks no longer hold the unsharded originals
    for step in range(4):
        for model, optimizer in ((reference, ref_opt), (swapped, opt)):
            _mlp_loss(model, torch.Generator().manual_seed(step)).backward()
            assert all(p.grad is None for p in model.parameters())  # consumed inside backward
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(swapped.parameters(), reference.parameters()))


def test_step_hooks_swapped_parameters_it_finds_with_a_warning():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True)
    _swap_parameters(model, opt)
    _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing hooked them yet
    with pytest.warns(UserWarning, match="were replaced after it was built"):
        opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    opt.zero_grad()
    _mlp_loss(model, torch.Generator().manual_seed(1)).backward()
    assert all(p.grad is None for p in model.parameters())  # hooked from the second pass on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_swapping_parameters_inside_an_accumulation_window_is_refused():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2)
    _mlp_loss(model, torch.Generator().manual_seed(0)).backward()
    _swap_parameters(model, opt)
    with pytest.raises(RuntimeError, match="cannot replace parameters in the middle of an accumulation window"):
        opt.sync_layerwise_hooks()
