"""The transformers integration: parameters selected as Trainer selects them, optim_args, GaLoreTrainer's
optimizer from TrainingArguments, and Trainer runs (loss, logged gradient norms, checkpoint resume) with
each of the four optimizer names and with GaLoreTrainer."""

import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from case_ids import case_id, named_by_inputs
from galore_kernels.integrations.transformers import (
    OPTIMIZER_NAMES,
    GaLoreGradNormCallback,
    GaLoreTrainer,
    create_optimizer,
    galore_param_groups,
)
from tiny_models import synthetic_tokens, tiny_llama
from tolerances import (
    TRAINER_GRAD_NORM_RTOL,
    TRAINER_LAYERWISE_ATOL,
    TRAINER_LAYERWISE_ATOL_8BIT,
    TRAINER_LAYERWISE_MEAN_ABS,
    TRAINER_LAYERWISE_RTOL,
    TRAINER_OWN_NORM_RTOL,
)

VOCAB, LENGTH, BATCH, ACCUMULATION, STEPS, SAVE_AT = 128, 32, 4, 2, 30, 15
GAP = 10  # the projectors refresh at steps 0, 10 and 20: once after the resume point
OPTIM_ARGS = f"rank=8,update_proj_gap={GAP},scale=0.5"
LAYERWISE = [name for name in OPTIMIZER_NAMES if name.endswith("_layerwise")]
# Layer-wise clipping scales step t by the norm of step t-1, which a resume must restore; at this bound it
# clips most steps.
CLIP = 1.0
RUNS = [(name, OPTIM_ARGS) for name in OPTIMIZER_NAMES]
RUNS.append(("galore_adamw_layerwise", f"{OPTIM_ARGS},max_grad_norm={CLIP}"))
RUN_IDS = [name + ("+clip" if "max_grad_norm" in optim_args else "") for name, optim_args in RUNS]


def _ids(params):
    return {id(p) for p in params}


def _trainer_selection(model, target_modules):
    """(projected, other) parameters as Trainer's GaLore set-up groups them, from its own code."""
    trainer_optimizer = pytest.importorskip("transformers.trainer_optimizer")
    setup = getattr(trainer_optimizer, "_setup_low_rank_optimizer", None)
    if setup is None:
        pytest.skip("this transformers version has no _setup_low_rank_optimizer")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    args = SimpleNamespace(optim_target_modules=targets)
    _, kwargs = setup(args, model, "galore_adamw", {"galore_adamw": None}, {}, {})
    other, projected = kwargs["params"]
    return _ids(projected["params"]), _ids(other["params"])


def _tied_llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "target_modules",
    [
        ("attn", "mlp"),
        [r".*\.q_proj", r".*\.down_proj"],
        r"model\.layers\.1\..*",
        ["q_proj", r".*layers\.0\.mlp\..*"],
        "all-linear",
        "all_linear",
    ],
    ids=case_id,
)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_param_groups_select_what_trainer_selects(target_modules, tied):
    model = _tied_llama() if tied else tiny_llama()
    plain, projected = galore_param_groups(model, target_modules, rank=8, weight_decay=0.1)
    assert (_ids(projected["params"]), _ids(plain["params"])) == _trainer_selection(model, target_modules)
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in projected["params"])
    assert "rank" not in plain and projected["rank"] == 8
    assert plain["weight_decay"] == projected["weight_decay"] == 0.1
    if target_modules in ("all-linear", "all_linear"):
        # Trainer's all-linear keeps the output head, unless it is tied to the (never projected) embedding.
        assert (id(model.lm_head.weight) in _ids(projected["params"])) is not tied


def test_param_groups_skip_frozen_parameters():
    model = tiny_llama()
    frozen = [model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight]
    for p in frozen:
        p.requires_grad_(False)
    plain, projected = galore_param_groups(model, ["attn", "mlp"])
    grouped = [id(p) for group in (plain, projected) for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # each parameter in one group at most
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    trainer_projected, trainer_plain = _trainer_selection(model, ["attn", "mlp"])
    assert _ids(projected["params"]) == trainer_projected - _ids(frozen)
    assert _ids(plain["params"]) == trainer_plain - _ids(frozen)


@pytest.mark.parametrize(
    "target_modules, message",
    named_by_inputs([
        (["nonexistent"], r"'nonexistent'.*matches no nn.Linear.*q_proj"),
        ("mlp", r"matches no nn.Linear module; a string is a regex.*\['mlp'\].*q_proj"),
        (r"model\.embed_tokens", r"matches no nn.Linear"),  # selects a module, but not an nn.Linear
        ([], r"matches no nn.Linear"),
        (["attn", "("], r"'\(' is not a valid regex"),
        (5, "target_modules must be"),
        (None, "target_modules must be"),
        ([b"attn"], "target_modules must be"),
        ({"attn"}, "target_modules must be"),
    ]),
)
def test_param_groups_reject_bad_targets(target_modules, message):
    with pytest.raises(ValueError, match=message):
        galore_param_groups(tiny_llama(), target_modules)


def test_param_groups_string_target_suggests_the_list_form():
    """A string is a regex for whole names: "attn" matches nothing, and the message names the list form."""
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"a string is a regex that must match a whole module name.*"
                                         r"pass a list, \['attn'\]"):
        galore_param_groups(model, "attn")
    with pytest.raises(ValueError, match="matches no nn.Linear") as error:
        galore_param_groups(model, ["attn_nonexistent"])
    assert "pass a list" not in str(error.value)
    _, projected = galore_param_groups(model, ["attn"])  # what the message suggests works
    assert _ids(projected["params"]) == {id(m.weight) for n, m in model.named_modules() if "attn." in n}


def test_param_groups_split_by_decay_parameter_names():
    """Trainer's convention: weight decay on the named parameters only, in every group, projected or not."""
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8), "pre_norm": torch.nn.Linear(8, 8)})
    groups = galore_param_groups(model, ["proj", "pre_norm"], rank=4, weight_decay=0.1,
                                 decay_parameter_names=["proj.weight"])
    named = {id(p): name for name, p in model.named_parameters()}
    assert [(sorted(named[id(p)] for p in g["params"]), g["weight_decay"], g.get("rank")) for g in groups] == [
        (["pre_norm.bias", "proj.bias"], 0.0, None),  # no plain parameter is decayed: that group is left out
        (["proj.weight"], 0.1, 4),
        (["pre_norm.weight"], 0.0, 4),  # an nn.Linear Trainer would not decay ("_norm") keeps no decay
    ]
    default = galore_param_groups(model, ["proj", "pre_norm"], rank=4, weight_decay=0.1)
    assert [g["weight_decay"] for g in default] == [0.1, 0.1]  # without names: as before, decay everywhere
    with pytest.raises(ValueError, match="decay_parameter_names must be a collection of names"):
        galore_param_groups(model, ["proj"], decay_parameter_names="proj.weight")


def test_param_groups_reject_targets_that_are_all_frozen():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="only frozen"):
        galore_param_groups(model, ["q_proj"])


def _groups_without_params(optimizer):
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_optim_args_string_and_dict_agree():
    text = "rank=8, update_proj_gap=10,scale=0.5,proj_type=left,svd=exact,svd_oversample=4,svd_power_iters=1,seed=3"
    typed = {"rank": 8, "update_proj_gap": 10, "scale": 0.5, "proj_type": "left", "svd": "exact",
             "svd_oversample": 4, "svd_power_iters": 1, "seed": 3}
    strings = {key: str(value) for key, value in typed.items()}
    model = tiny_llama()
    built = [create_optimizer(model, "galore_adamw", a, lr=1e-2, weight_decay=0.1) for a in (text, typed, strings)]
    expected = _groups_without_params(built[0])
    assert expected[1] == {**expected[1], **{k: v for k, v in typed.items() if k != "seed"}}
    assert expected[0]["weight_decay"] == expected[1]["weight_decay"] == 0.1
    for optimizer in built:
        assert _groups_without_params(optimizer) == expected
        assert [_ids(g["params"]) for g in optimizer.param_groups] == [_ids(g["params"]) for g in built[0].param_groups]
        assert optimizer.seed == 3 and not optimizer.layerwise


def test_create_optimizer_classes_and_layerwise_options():
    from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit

    for name in OPTIMIZER_NAMES:
        layerwise = name in LAYERWISE
        optim_args = {"refresh_schedule": "spread", **({"max_grad_norm": "1.5"} if layerwise else {})}
        model = tiny_llama()
        optimizer = create_optimizer(model, name, optim_args, lr=1e-2, gradient_accumulation_steps=3)
        assert type(optimizer) is (GaLoreAdamW8bit if "8bit" in name else GaLoreAdamW)
        assert optimizer.layerwise is layerwise and optimizer.refresh_schedule == "spread"
        assert optimizer.max_grad_norm == (1.5 if layerwise else None)
        projected = optimizer.param_groups[1]
        assert (projected["rank"], projected["update_proj_gap"], projected["scale"]) == (128, 200, 0.25)
        # Layer-wise, a parameter steps on its third backward pass; the other names ignore the accumulation
        # steps (Trainer accumulates in .grad) and step in step() only.
        weight = model.model.layers[0].mlp.up_proj.weight
        before = weight.detach().clone()
        tokens = synthetic_tokens(2, 8, VOCAB, torch.Generator().manual_seed(0))
        for passes in range(1, 4):
            model(input_ids=tokens, labels=tokens).loss.backward()
            assert torch.equal(weight, before) is not (layerwise and passes == 3), passes
        optimizer.step()
        assert not torch.equal(weight, before)


@pytest.mark.parametrize(
    "name, optim_args, message",
    named_by_inputs([
        ("galore_adamw", "rnak=8", r"unknown optim_args key 'rnak'.*accepted keys: \[.*'rank'.*'svd_power_iters'"),
        ("galore_adamw", {"lr": 1e-3}, r"unknown optim_args key 'lr'"),
        ("galore_adamw", "max_grad_norm=1.0", r"'max_grad_norm'.*layer-wise names.*TrainingArguments\.max_grad_norm"),
        ("galore_adamw", "rank=abc", r"rank='abc': expected int"),
        ("galore_adamw", "rank=1.5", r"rank='1.5': expected int"),
        ("galore_adamw_8bit", {"scale": "big"}, r"scale='big': expected float"),
        ("galore_adamw", "rank=0", r"rank must be an int >= 1, got 0"),
        ("galore_adamw", {"rank": 0}, r"rank must be an int >= 1, got 0"),
        ("galore_adamw", "proj_type=diagonal", r"proj_type must be one of"),
        ("galore_adamw_layerwise", "max_grad_norm=-1", r"max_grad_norm must be > 0"),
        ("galore_adamw", "refresh_schedule=never", r"refresh_schedule must be one of"),
        ("galore_adamw", "rank", r"key=value.*'rank'"),
        ("galore_adamw", "rank=8=9", r"key=value"),
        ("galore_adamw", ["rank=8"], r"optim_args must be"),
        ("galore_adafactor", None, r"optim must be one of \('galore_adamw', 'galore_adamw_8bit', "
                                   r"'galore_adamw_layerwise', 'galore_adamw_8bit_layerwise'\)"),
    ], inputs=2),
)
def test_create_optimizer_rejects_bad_input(name, optim_args, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer(tiny_llama(), name, optim_args, lr=1e-2)


def test_callback_checks_layerwise_setup(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=2,
                             max_grad_norm=1.0)

    def call(event, optimizer):
        getattr(GaLoreGradNormCallback(optimizer), event)(args, TrainerState(), TrainerControl())

    short = create_optimizer(tiny_llama(), "galore_adamw_layerwise", "max_grad_norm=1", lr=1e-2)
    with pytest.raises(ValueError, match="accumulation_steps=1, fewer than gradient_accumulation_steps=2"):
        call("on_train_begin", short)
    layerwise = create_optimizer(tiny_llama(), "galore_adamw_layerwise", "max_grad_norm=1", lr=1e-2,
                                 gradient_accumulation_steps=2)
    base = dict(world_size=1, fp16=False, gradient_accumulation_steps=2, max_grad_norm=0.0)
    for changes, message in (({"world_size": 2}, "cannot train with 2 processes"), ({"fp16": True}, "fp16=True")):
        fake_args = SimpleNamespace(**{**base, **changes})
        with pytest.raises(ValueError, match=message):
            GaLoreGradNormCallback(layerwise).on_train_begin(fake_args, TrainerState(), TrainerControl())
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 has no effect with a layer-wise optimizer"):
        call("on_train_begin", create_optimizer(tiny_llama(), "galore_adamw_layerwise", lr=1e-2,
                                                gradient_accumulation_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call("on_train_begin", create_optimizer(tiny_llama(), "galore_adamw_layerwise", "max_grad_norm=1", lr=1e-2,
                                                gradient_accumulation_steps=2))
        call("on_train_begin", create_optimizer(tiny_llama(), "galore_adamw", lr=1e-2))  # Trainer clips


def _galore_trainer(tmp_path, model=None, **training_args):
    """A GaLoreTrainer on a tiny Llama, its optimizer not built yet (train() builds it)."""
    settings = {
        "optim": "galore_adamw_8bit_layerwise",
        "optim_target_modules": ["attn", "mlp"],
        "optim_args": OPTIM_ARGS,
        "gradient_accumulation_steps": ACCUMULATION,
        "max_grad_norm": CLIP,
    }
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{**settings, **training_args})
    return GaLoreTrainer(model=tiny_llama() if model is None else model, args=args)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_galore_trainer_reads_the_training_arguments(name, tmp_path):
    from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit

    trainer = _galore_trainer(tmp_path, optim=name, learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.8,
                              adam_beta2=0.95, adam_epsilon=1e-7)
    optimizer = trainer.create_optimizer()
    layerwise = name in LAYERWISE
    assert type(optimizer) is (GaLoreAdamW8bit if "8bit" in name else GaLoreAdamW)
    assert optimizer.layerwise is layerwise
    # Layer-wise, the optimizer accumulates and clips; otherwise Trainer does both on .grad.
    assert optimizer.accumulation_steps == (ACCUMULATION if layerwise else 1)
    assert optimizer.max_grad_norm == (CLIP if layerwise else None)
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-3, (0.8, 0.95), 1e-7)
    # Weight decay exactly where Trainer puts it: not on the norm weights (this Llama has no biases).
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    zero_decay = sorted(names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"])
    assert zero_decay == sorted(set(names.values()) - decayed)
    assert zero_decay and all("norm" in n for n in zero_decay)
    assert all(g["weight_decay"] in (0.0, 0.1) for g in optimizer.param_groups)
    # The projected weights are galore_param_groups' selection, with optim_args' keys.
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert [(g["rank"], g["update_proj_gap"], g["scale"], g["weight_decay"]) for g in projected] == [(8, GAP, 0.5, 0.1)]
    assert _ids(projected[0]["params"]) == _ids(galore_param_groups(trainer.model, ["attn", "mlp"])[1]["params"])
    # The grad-norm callback comes first, once, however often Trainer asks for the optimizer.
    assert trainer.create_optimizer() is optimizer
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], GaLoreGradNormCallback) and callbacks[0].optimizer is optimizer
    assert sum(isinstance(c, GaLoreGradNormCallback) for c in callbacks) == 1


@pytest.mark.parametrize(
    "training_args, expected",
    [
        ({"max_grad_norm": 0.0}, None),  # 0: no clipping, as in Trainer
        ({"optim_args": f"{OPTIM_ARGS},max_grad_norm=0.5"}, 0.5),  # optim_args' value wins over Trainer's 1.0
        ({"optim_args": {"max_grad_norm": 0.5}, "max_grad_norm": 0.0}, 0.5),
    ],
    ids=["args-0", "optim_args", "optim_args-dict"],
)
def test_galore_trainer_layerwise_clipping(training_args, expected, tmp_path):
    assert _galore_trainer(tmp_path, **training_args).create_optimizer().max_grad_norm == expected


def test_galore_trainer_leaves_other_optimizers_to_trainer(tmp_path):
    trainer = _galore_trainer(tmp_path, optim="adamw_torch", optim_args=None, weight_decay=0.1)
    model = tiny_llama()
    reference = Trainer(model=model, args=trainer.args).create_optimizer()
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is type(reference) is torch.optim.AdamW
    assert _groups_without_params(optimizer) == _groups_without_params(reference)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in reference.param_groups]
    assert not any(isinstance(c, GaLoreGradNormCallback) for c in trainer.callback_handler.callbacks)


def test_galore_trainer_takes_a_given_optimizer_and_adds_the_callback(tmp_path):
    model = tiny_llama()
    optimizer = create_optimizer(model, "galore_adamw", OPTIM_ARGS, lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])  # optim: Trainer's default
    trainer = GaLoreTrainer(model=model, args=args, optimizers=(optimizer, None))
    assert trainer.create_optimizer() is optimizer
    assert trainer.callback_handler.callbacks[0].optimizer is optimizer


def test_galore_trainer_needs_target_modules(tmp_path):
    trainer = _galore_trainer(tmp_path, optim_target_modules=None)
    with pytest.raises(ValueError, match=r"optim='galore_adamw_8bit_layerwise' needs TrainingArguments\."
                                         r"optim_target_modules"):
        trainer.create_optimizer()
    with pytest.raises(ValueError, match=r"a string is a regex.*pass a list, \['attn'\]"):
        _galore_trainer(tmp_path, optim_target_modules="attn").create_optimizer()


def test_package_imports_without_transformers():
    """galore_kernels.integrations imports no framework; the transformers module says what to install."""
    code = (
        "import sys\n"
        "import galore_kernels.integrations\n"
        "assert 'transformers' not in sys.modules\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "try:\n"
        "    import galore_kernels.integrations.transformers\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "needs transformers" in out and "pip install transformers accelerate" in out


class _Recorder(TrainerCallback):
    """What a report_to integration sees (the logs each on_log gets) and the optimizer's norm after each step."""

    def __init__(self, optimizer=None):
        self.optimizer = optimizer  # None: the one Trainer builds, read at each step
        self.logs, self.norms = [], []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Trainer passes its optimizer in accelerate's wrapper, whose .optimizer is ours.
        self.norms.append((self.optimizer or optimizer.optimizer).last_grad_norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def data():
    # 25 batches an epoch: each epoch ends on a one-batch accumulation window that optimizer.step() closes.
    tokens = synthetic_tokens(100, LENGTH, VOCAB, torch.Generator().manual_seed(1))
    return [{"input_ids": t, "labels": t} for t in tokens]


def _train(name, optim_args, data, output_dir, resume_from_checkpoint=None, **training_args):
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, layers=2, seed=0)
    settings = {
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "learning_rate": 1e-2,
        # Trainer's clipping finds no gradients in layer-wise mode; off for all four, so the runs compare.
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": SAVE_AT,
        "dataloader_num_workers": 0,
        "seed": 0,
        "disable_tqdm": True,
    }
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to=[], **{**settings, **training_args})
    optimizer = create_optimizer(
        model, name, optim_args, lr=args.learning_rate, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    recorder = _Recorder(optimizer)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[recorder])
    # First, as the docstring says, so that the recorder (standing in for report_to) sees the corrected logs.
    trainer.callback_handler.callbacks.insert(0, GaLoreGradNormCallback(optimizer))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return SimpleNamespace(model=model, trainer=trainer, recorder=recorder, output_dir=output_dir)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """The uninterrupted run of each (name, optim_args), trained once for the module. Five 30-step Trainer
    runs, seconds each on a CPU: the tests that use it are marked ``slow``."""
    runs = {}

    def get(name, optim_args=OPTIM_ARGS):
        if (name, optim_args) not in runs:
            runs[name, optim_args] = _train(name, optim_args, data, tmp_path_factory.mktemp(name))
        return runs[name, optim_args]

    return get


def _step_logs(trainer):
    return [record for record in trainer.state.log_history if "loss" in record]


@pytest.mark.slow
@pytest.mark.parametrize("name, optim_args", RUNS, ids=RUN_IDS)
def test_trainer_loss_falls_and_logs_the_gradient_norm(name, optim_args, full_run):
    run = full_run(name, optim_args)
    logs = _step_logs(run.trainer)
    losses = [record["loss"] for record in logs]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 0.9 * math.log(VOCAB), losses  # starts near uniform over the vocabulary
    assert last < 0.6 * first, losses
    logged = [record["grad_norm"] for record in logs]
    assert all(math.isfinite(x) and x > 0 for x in logged), logged
    assert [record["grad_norm"] for record in run.recorder.logs if "loss" in record] == logged
    if name in LAYERWISE:
        assert logged == run.recorder.norms  # Trainer logged 0; the callback put the optimizer's norm in
    else:
        assert logged == pytest.approx(run.recorder.norms, rel=TRAINER_OWN_NORM_RTOL)  # Trainer's own norm, kept
    if "max_grad_norm" in optim_args:
        assert logged[SAVE_AT - 1] > CLIP  # so the step after the resume point is clipped by a restored norm


def test_layerwise_trainer_with_its_own_clipping_on_warns(data, tmp_path):
    """Trainer's default max_grad_norm=1.0 clips nothing layer-wise (and breaks nothing): the callback says so."""
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 has no effect"):
        run = _train("galore_adamw_layerwise", OPTIM_ARGS, data, tmp_path, max_steps=2, max_grad_norm=1.0,
                     save_strategy="no")
    assert [record["grad_norm"] for record in _step_logs(run.trainer)] == run.recorder.norms


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERWISE)
def test_layerwise_trainer_run_matches_the_plain_one(name, full_run):
    """Stepping inside backward with accumulation gives the run of stepping after it, to fp32 rounding.

    The logged norm is Trainer's (that of the summed full gradient) on refresh steps only: between them
    a window keeps a projected weight's gradients as their projected sum, whose norm is at most the full one.
    """
    layerwise, plain = full_run(name), full_run(name.removesuffix("_layerwise"))
    atol = TRAINER_LAYERWISE_ATOL_8BIT if "8bit" in name else TRAINER_LAYERWISE_ATOL
    for (param_name, p), q in zip(layerwise.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=TRAINER_LAYERWISE_RTOL, atol=atol, msg=param_name)
        assert (p - q).abs().mean() < TRAINER_LAYERWISE_MEAN_ABS, param_name
    norms = [record["grad_norm"] for record in _step_logs(layerwise.trainer)]
    trainer_norms = [record["grad_norm"] for record in _step_logs(plain.trainer)]
    for step, (norm, trainer_norm) in enumerate(zip(norms, trainer_norms)):
        if step % GAP == 0:
            assert norm == pytest.approx(trainer_norm, rel=TRAINER_GRAD_NORM_RTOL), step
        else:
            assert norm < trainer_norm, step


@pytest.mark.slow
@pytest.mark.parametrize("name, optim_args", RUNS, ids=RUN_IDS)
def test_trainer_resume_is_exact(name, optim_args, full_run, data, tmp_path, monkeypatch):
    run = full_run(name, optim_args)
    loads = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    checkpoint = run.output_dir / f"checkpoint-{SAVE_AT}"
    resumed = _train(name, optim_args, data, tmp_path, resume_from_checkpoint=str(checkpoint))
    assert [weights_only for f, weights_only in loads if f.endswith("optimizer.pt")] == [True]
    assert resumed.trainer.state.global_step == STEPS
    for (param_name, p), q in zip(run.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), param_name
    # The resumed run logs the same losses and gradient norms as the uninterrupted one, step for step.
    assert _step_logs(resumed.trainer) == _step_logs(run.trainer)


def _train_galore_trainer(data, output_dir, resume_from_checkpoint=None):
    """Trainer's own GaLore recipe with GaLoreTrainer: every setting in TrainingArguments, Trainer's clipping on."""
    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to=[], optim="galore_adamw_8bit_layerwise",
        optim_target_modules=["attn", "mlp"], optim_args=OPTIM_ARGS, gradient_accumulation_steps=ACCUMULATION,
        max_grad_norm=CLIP, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        weight_decay=0.01, logging_steps=1, save_strategy="steps", save_steps=SAVE_AT, dataloader_num_workers=0,
        seed=0, disable_tqdm=True,
    )
    recorder = _Recorder()
    trainer = GaLoreTrainer(model=tiny_llama(vocab_size=VOCAB, hidden_size=64, layers=2, seed=0), args=args,
                            train_dataset=data, callbacks=[recorder])
    with warnings.catch_warnings():
        # The optimizer clips with TrainingArguments.max_grad_norm: the callback has nothing to warn about.
        warnings.filterwarnings("error", message=".*max_grad_norm", category=UserWarning)
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return SimpleNamespace(model=trainer.model, trainer=trainer, recorder=recorder, output_dir=output_dir)


@pytest.fixture(scope="module")
def galore_trainer_run(data, tmp_path_factory):
    """The uninterrupted GaLoreTrainer run, trained once for the module (a 30-step Trainer run)."""
    return _train_galore_trainer(data, tmp_path_factory.mktemp("galore_trainer"))


@pytest.mark.slow
def test_galore_trainer_learns_clips_and_logs_the_gradient_norm(galore_trainer_run):
    run = galore_trainer_run
    optimizer = run.trainer.callback_handler.callbacks[0].optimizer  # the callback GaLoreTrainer installed
    assert type(optimizer).__name__ == "GaLoreAdamW8bit" and optimizer.layerwise
    assert (optimizer.accumulation_steps, optimizer.max_grad_norm) == (ACCUMULATION, CLIP)  # from the arguments
    logs = _step_logs(run.trainer)
    losses = [record["loss"] for record in logs]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[0] > 0.9 * math.log(VOCAB) and sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    logged = [record["grad_norm"] for record in logs]
    assert all(math.isfinite(x) and x > 0 for x in logged), logged
    assert logged == run.recorder.norms  # the optimizer's norm, not Trainer's 0
    assert [record["grad_norm"] for record in run.recorder.logs if "loss" in record] == logged  # report_to's too
    assert logged[SAVE_AT - 1] > CLIP  # so the step after the resume point is clipped by a restored norm


@pytest.mark.slow
def test_galore_trainer_resume_is_exact(galore_trainer_run, data, tmp_path):
    run = galore_trainer_run
    checkpoint = run.output_dir / f"checkpoint-{SAVE_AT}"
    resumed = _train_galore_trainer(data, tmp_path, resume_from_checkpoint=str(checkpoint))
    assert resumed.trainer.state.global_step == STEPS
    for (param_name, p), q in zip(run.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), param_name
    assert _step_logs(resumed.trainer) == _step_logs(run.trainer)
