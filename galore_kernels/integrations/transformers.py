"""Hugging Face ``transformers``: :class:`GaLoreTrainer`, ``Trainer``-style optimizer names, the logged grad
norm, and GaLore param groups (:func:`galore_param_groups`, from :mod:`galore_kernels.optim.param_groups`,
re-exported here).

``Trainer`` builds GaLore optimizers from galore-torch; :class:`GaLoreTrainer` builds this package's
from the same ``TrainingArguments``: ``Trainer``'s own GaLore recipe with one class name changed::

    from transformers import TrainingArguments
    from galore_kernels.integrations.transformers import GaLoreTrainer

    args = TrainingArguments(
        output_dir="out", optim="galore_adamw_8bit_layerwise", optim_target_modules=["attn", "mlp"],
        optim_args="rank=128,update_proj_gap=200,scale=0.25", gradient_accumulation_steps=4, max_grad_norm=1.0,
    )
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=data)
    trainer.train()

For a custom loop, :func:`create_optimizer` builds the same optimizers from a name and ``optim_args``.

Unlike ``Trainer``'s own layer-wise GaLore, which refuses gradient accumulation, the layer-wise names here
accumulate: a parameter steps on its k-th backward pass, and ``Trainer``'s call to ``optimizer.step()``
once per optimizer step closes the step (``Trainer``'s accelerate wrapper makes that call only at the
end of an accumulation). Clipping is the optimizer's there (``max_grad_norm``), and
:class:`GaLoreGradNormCallback` logs the gradient norm ``Trainer`` cannot see. Checkpoints save and resume
through ``Trainer`` as usual; it reloads optimizer state with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.training_args import OptimizerNames
except ImportError as error:  # the package itself needs no transformers; only this module does
    raise ImportError(
        "galore_kernels.integrations.transformers needs transformers (and accelerate for its Trainer): "
        "pip install transformers accelerate"
    ) from error

from ..config import GaLoreConfig
from ..distributed import LayerwiseDataParallel
from ..optim import GaLoreAdamW, GaLoreAdamW8bit
from ..optim.param_groups import galore_param_groups
from ..sharded import is_sharded

__all__ = ["OPTIMIZER_NAMES", "GaLoreTrainer", "galore_param_groups", "create_optimizer", "GaLoreGradNormCallback"]

OPTIMIZER_NAMES = ("galore_adamw", "galore_adamw_8bit", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise")

# optim_args keys and the type a string value is converted to: galore-torch's four and our refresh knobs
# go into the projected param group; the rest are constructor arguments.
# (``experts`` is not one: galore_param_groups sets it on the group of expert stacks it finds by name.)
_GROUP_KEYS: dict[str, type] = {
    key: kind for key, kind in typing.get_type_hints(GaLoreConfig).items() if key != "experts"
}
_OPTIMIZER_KEYS: dict[str, type] = {"refresh_schedule": str, "seed": int}
# Clipping by the previous step's norm exists only in layer-wise mode; otherwise Trainer clips .grad itself.
_LAYERWISE_KEYS: dict[str, type] = {"max_grad_norm": float}


def create_optimizer(
    model: nn.Module,
    optim: str,
    optim_args: str | Mapping[str, Any] | None = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    gradient_accumulation_steps: int = 1,
    decay_parameter_names: Collection[str] | None = None,
) -> torch.optim.Optimizer:
    """This package's optimizer for a ``Trainer`` GaLore name, for a custom loop or ``Trainer(optimizers=...)``.

    :class:`GaLoreTrainer` calls it with every argument read from ``TrainingArguments``. Called directly,
    ``betas`` and ``eps`` left at None are the classes' defaults, and ``weight_decay`` applies to every
    parameter unless ``decay_parameter_names`` (``trainer.get_decay_parameter_names(model)``) names
    those to decay, as ``Trainer`` does (see :func:`galore_param_groups`).

    ``optim`` is one of ``OPTIMIZER_NAMES``: ``galore_adamw`` and ``galore_adamw_8bit`` give
    :class:`~galore_kernels.GaLoreAdamW` / :class:`~galore_kernels.GaLoreAdamW8bit`; the ``_layerwise``
    names give the same classes with ``layerwise=True, accumulation_steps=gradient_accumulation_steps``,
    each parameter stepping inside backward. Pass ``Trainer``'s ``gradient_accumulation_steps`` for those;
    the other names ignore it, since ``Trainer`` then accumulates in ``.grad`` and steps once.

    ``optim_args`` is ``TrainingArguments.optim_args``' string form (``"rank=512,update_proj_gap=200,
    scale=1.8,proj_type=std"``) or a dict. Keys: galore-torch's ``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type`` and ``svd``, ``svd_oversample``, ``svd_power_iters`` (param-group keys of the projected
    group), ``refresh_schedule`` and ``seed`` (constructor arguments), and for layer-wise names
    ``max_grad_norm``: clipping by the previous step's global gradient norm, the clipping that works in
    layer-wise mode (``Trainer``'s own clipping finds no gradients there, they being consumed inside
    backward; :class:`GaLoreTrainer` passes ``TrainingArguments.max_grad_norm`` as this key). String
    values are converted to int, float or str by key. Parameters are grouped by
    :func:`galore_param_groups` with ``target_modules`` (``Trainer``'s ``optim_target_modules``).

    Raises ``ValueError`` for an unknown name or key, a value that does not convert, or a value the
    optimizer refuses (``rank=0``), naming it and what is accepted.

    Example::

        optimizer = create_optimizer(model, "galore_adamw_8bit", "rank=128,scale=0.25", lr=1e-2)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    """
    options = _optim_options(optim, optim_args)
    groups = galore_param_groups(
        model, target_modules, weight_decay=weight_decay, decay_parameter_names=decay_parameter_names
    )
    group_options = {key: options.pop(key) for key in list(options) if key in _GROUP_KEYS}
    for group in groups:
        if "rank" in group:  # the projected group(s)
            group.update(group_options)
    if optim.endswith("_layerwise"):
        options.update(layerwise=True, accumulation_steps=gradient_accumulation_steps)
    if betas is not None:
        options["betas"] = betas
    if eps is not None:
        options["eps"] = eps
    optimizer_class = GaLoreAdamW8bit if "_8bit" in optim else GaLoreAdamW
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **options)


def _optim_options(optim: str, optim_args: str | Mapping[str, Any] | None) -> dict:
    """The options ``optim_args`` gives name ``optim``, typed and checked against the keys it accepts."""
    if optim not in OPTIMIZER_NAMES:
        raise ValueError(f"optim must be one of {OPTIMIZER_NAMES}, got {optim!r}")
    layerwise = optim.endswith("_layerwise")
    accepted = {**_GROUP_KEYS, **_OPTIMIZER_KEYS, **(_LAYERWISE_KEYS if layerwise else {})}
    return _parse_optim_args(optim_args, accepted, optim)


def _parse_optim_args(optim_args: str | Mapping[str, Any] | None, accepted: dict[str, type], optim: str) -> dict:
    """``optim_args`` as a dict of typed values; strings convert by key, other values are checked later."""
    if optim_args is None:
        return {}
    if isinstance(optim_args, str):
        items = []
        # Trainer's own parser drops every space and splits on "," then "=".
        for item in filter(None, optim_args.replace(" ", "").split(",")):
            key, equals, value = item.partition("=")
            if not equals or "=" in value:
                raise ValueError(f"optim_args entries must be key=value, got {item!r} in {optim_args!r}")
            items.append((key, value))
    elif isinstance(optim_args, Mapping):
        items = list(optim_args.items())
    else:
        raise ValueError(f"optim_args must be a 'key=value,...' string or a dict, got {optim_args!r}")
    options = {}
    for key, value in items:
        if key not in accepted:
            hint = ""
            if key in _LAYERWISE_KEYS:
                hint = (
                    f" ({key} is for the layer-wise names; with {optim!r}, Trainer clips .grad itself: set "
                    f"TrainingArguments.{key})"
                )
            raise ValueError(f"unknown optim_args key {key!r} for {optim!r}{hint}; accepted keys: {sorted(accepted)}")
        if isinstance(value, str):
            try:
                value = accepted[key](value)
            except ValueError:
                raise ValueError(f"optim_args {key}={value!r}: expected {accepted[key].__name__}") from None
        options[key] = value
    return options


class GaLoreGradNormCallback(TrainerCallback):
    """Logs the true gradient norm of a layer-wise optimizer, where ``Trainer`` logs ``grad_norm`` 0.

    ``Trainer`` computes ``grad_norm`` from ``.grad`` just before ``optimizer.step()`` (clipping to
    ``max_grad_norm`` on the way) and logs the value of the latest optimizer step — not an average over
    the steps since the previous log, as it does for ``loss``. A layer-wise optimizer has consumed and
    freed every gradient inside backward by then, so ``Trainer`` sees none and logs 0. This callback puts
    the optimizer's ``last_grad_norm`` — the global L2 norm of the latest step's gradient, summed over its
    micro-batches as ``Trainer``'s is — in its place, in the ``logs`` that ``on_log`` receives and in
    ``state.log_history`` (which keeps its own copy). With a non-layer-wise optimizer it changes nothing:
    ``Trainer``'s value is right there.

    With ``gradient_accumulation_steps > 1`` the two norms differ between projector refreshes: there the
    optimizer sums a projected weight's micro-batch gradients in the subspace, never holding their full
    sum, so the weight contributes the norm of its projected gradient — the part GaLore steps on, at most
    the full gradient's norm. On its refresh steps, and for every other parameter, the norm is
    ``Trainer``'s. The optimizer's ``max_grad_norm`` clips by this same norm.

    ``Trainer`` calls ``on_log`` in callback order: its flow callback, the ``report_to`` integrations,
    the ``callbacks=`` given to it, then the console printer. Given in ``callbacks=``, this one corrects
    ``state.log_history`` (so ``trainer_state.json``) and the console; for integrations to report the true
    norm too, put it first: ``trainer.callback_handler.callbacks.insert(0, callback)``.
    :class:`GaLoreTrainer` does that itself.

    It also checks the layer-wise set-up when training starts. ``ValueError`` for: more than one process
    without :class:`~galore_kernels.distributed.LayerwiseDataParallel` attached (the hooks would step before
    DDP all-reduces; :class:`GaLoreTrainer` attaches it), ``fp16=True`` (the GradScaler unscales after
    the parameters have stepped; ``bf16=True`` needs no scaler), and an optimizer whose
    ``accumulation_steps`` is smaller than ``gradient_accumulation_steps`` (it would step on partial sums);
    ``TrainingArguments.max_grad_norm > 0`` warns when the optimizer does not clip itself, as ``Trainer``'s
    clipping finds no gradients in layer-wise mode: pass ``max_grad_norm`` in ``optim_args`` and set
    ``TrainingArguments(max_grad_norm=0)``.

    Example::

        optimizer = create_optimizer(model, "galore_adamw_layerwise", lr=1e-2)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                          callbacks=[GaLoreGradNormCallback(optimizer)])
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.optimizer.layerwise:
            return
        hooks = self.optimizer.layerwise_hooks
        # FSDP2 reduces each gradient before the hooks run and, under Trainer's no_sync, only on a window's
        # last backward pass: neither the reducer nor the optimizer's own accumulation is needed then.
        sharded = any(is_sharded(p) for group in self.optimizer.param_groups for p in group["params"])
        if args.world_size > 1 and not sharded and not isinstance(hooks.reducer, LayerwiseDataParallel):
            raise ValueError(
                f"a layer-wise optimizer given to Trainer cannot train with {args.world_size} processes on its own: "
                "Trainer's DDP would all-reduce after its hooks have stepped; let GaLoreTrainer build it from a "
                "_layerwise optim name (it averages each gradient across processes with "
                "galore_kernels.distributed.LayerwiseDataParallel), or use a non-layer-wise name"
            )
        if args.fp16:
            raise ValueError(
                "a layer-wise optimizer cannot train with fp16=True: the GradScaler unscales gradients after "
                "backward, when the parameters have already stepped; use bf16=True (no scaler) instead"
            )
        if not sharded and self.optimizer.accumulation_steps < args.gradient_accumulation_steps:
            raise ValueError(
                f"the layer-wise optimizer has accumulation_steps={self.optimizer.accumulation_steps}, fewer than "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}: it would step before Trainer's "
                "accumulation ends; build it with create_optimizer(..., "
                "gradient_accumulation_steps=args.gradient_accumulation_steps)"
            )
        if args.max_grad_norm > 0 and self.optimizer.max_grad_norm is None:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} has no effect with a layer-wise "
                "optimizer (gradients are consumed inside backward, before Trainer clips); pass max_grad_norm "
                "in optim_args to clip by the previous step's norm, and set TrainingArguments(max_grad_norm=0)",
                UserWarning,
                stacklevel=2,
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        norm = self.optimizer.last_grad_norm
        # Training logs carry "loss"; transformers before 5 log no grad_norm at all when max_grad_norm is 0.
        if not self.optimizer.layerwise or norm is None or logs is None or "loss" not in logs:
            return
        logs["grad_norm"] = norm
        # Trainer.log appends {**logs, "step": ...} to log_history just before calling on_log.
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["grad_norm"] = norm


class GaLoreTrainer(Trainer):
    """``Trainer`` that builds this package's optimizer for the GaLore names of ``TrainingArguments.optim``.

    The arguments are ``Trainer``'s own GaLore recipe: ``optim`` one of ``OPTIMIZER_NAMES``,
    ``optim_target_modules`` (required, as in ``Trainer``) and ``optim_args`` (the keys of
    :func:`create_optimizer`). From the rest it reads ``learning_rate``, ``weight_decay`` (on the
    parameters ``get_decay_parameter_names`` names, so not on biases and norm weights, as ``Trainer``
    does), ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and ``gradient_accumulation_steps``. Any
    other ``optim``, an optimizer given in ``optimizers=`` and ``optimizer_cls_and_kwargs=`` are
    ``Trainer``'s as usual.

    With a layer-wise name, ``max_grad_norm`` > 0 becomes the optimizer's ``max_grad_norm``, clipping by
    the previous step's global norm; ``max_grad_norm`` in ``optim_args`` takes precedence, and 0 clips
    nothing. ``Trainer``'s own clipping is left in place: it finds no gradients (they are consumed inside
    backward) and changes nothing, its cost being that of the norm ``Trainer`` computes for its logs
    either way.

    On several processes (``torchrun``, ``accelerate launch``) the non-layer-wise names train under
    ``Trainer``'s DDP. A layer-wise name is built with
    :class:`~galore_kernels.distributed.LayerwiseDataParallel` instead, which averages each parameter's
    gradient (its projection between refreshes) across processes inside backward. Accelerate then prepares
    the model without its DDP wrapper (mixed precision and compilation still apply): DDP would keep a full
    set of gradients in its buckets and all-reduce only after the parameters have stepped.

    For an optimizer of this package (built here or given in ``optimizers=``) it installs
    :class:`GaLoreGradNormCallback` first among the callbacks, so that the logs, ``trainer_state.json``
    and the ``report_to`` integrations get the optimizer's gradient norm in layer-wise mode, and the
    layer-wise set-up is checked when training starts.

    Example::

        args = TrainingArguments(output_dir="out", optim="galore_adamw_8bit_layerwise",
                                 optim_target_modules=["attn", "mlp"], optim_args="rank=128,scale=0.25",
                                 gradient_accumulation_steps=4)
        GaLoreTrainer(model=model, args=args, train_dataset=data).train()
    """

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        # TrainingArguments holds optim as an OptimizerNames member, whose str() is "OptimizerNames.…".
        name = OptimizerNames(self.args.optim).value
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and name in OPTIMIZER_NAMES:
            self._check_sharding(name)
            self.optimizer = self._create_galore_optimizer(self.model if model is None else model, name)
            if self.optimizer.layerwise and self.is_fsdp_enabled:
                self._sync_hooks_after_prepare(self.optimizer)
            elif self.optimizer.layerwise and self.args.world_size > 1:
                self._average_layerwise_across_processes(self.optimizer)
        if isinstance(self.optimizer, GaLoreAdamW):
            self._install_grad_norm_callback(self.optimizer)
        # With self.optimizer set, Trainer only wraps it where it must (SageMaker model parallel).
        return super().create_optimizer(model)

    def _check_sharding(self, name: str) -> None:
        """Refuse FSDP1; warn where ``TrainingArguments.fsdp`` asks for sharding that accelerate will not do."""
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                f"optim={name!r} does not work with FSDP1: it flattens each module's parameters into one vector, "
                "so the weight matrices GaLore projects are gone; use FSDP2: fsdp_config={'version': 2}"
            )
        if self.args.fsdp and not self.is_fsdp_enabled:
            warnings.warn(
                f"TrainingArguments.fsdp={self.args.fsdp!r} is ignored: accelerate runs FSDP only on GPUs and other "
                "accelerators, so these CPU processes train under DDP with whole weights and optimizer state on "
                "each; to shard on CPU processes, use fully_shard in your own loop (docs/distributed.md)",
                UserWarning,
                stacklevel=3,
            )

    def _sync_hooks_after_prepare(self, optimizer: GaLoreAdamW) -> None:
        """Re-hook the layer-wise optimizer once accelerate's FSDP2 prepare has swapped in sharded parameters."""
        prepare = self.accelerator.prepare

        def prepare_then_sync_hooks(*objects: Any, **kwargs: Any) -> Any:
            prepared = prepare(*objects, **kwargs)
            optimizer.sync_layerwise_hooks()
            return prepared

        self.accelerator.prepare = prepare_then_sync_hooks

    def _average_layerwise_across_processes(self, optimizer: GaLoreAdamW) -> None:
        """Attach LayerwiseDataParallel, and have accelerate prepare the model without DDP."""
        LayerwiseDataParallel(optimizer)
        prepare_model = self.accelerator.prepare_model

        # Trainer has no switch for this; accelerate's evaluation_mode applies everything but the wrapper.
        def prepare_model_without_ddp(model: nn.Module, device_placement: bool | None = None, **_: Any) -> nn.Module:
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_model_without_ddp

    def _create_galore_optimizer(self, model: nn.Module, name: str) -> GaLoreAdamW:
        args = self.args
        if args.optim_target_modules is None:
            raise ValueError(
                f"optim={name!r} needs TrainingArguments.optim_target_modules, as in Trainer: e.g. ['attn', 'mlp'] "
                "(modules whose name contains an entry) or 'all-linear'"
            )
        options = _optim_options(name, args.optim_args)
        if name.endswith("_layerwise") and args.max_grad_norm > 0:
            options.setdefault("max_grad_norm", args.max_grad_norm)
        return create_optimizer(
            model,
            name,
            options,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            target_modules=args.optim_target_modules,
            # Under FSDP2, Trainer's no_sync defers the reduce-scatter to a window's last backward pass, so the
            # hooks see each window's gradient once, already summed.
            gradient_accumulation_steps=1 if self.is_fsdp_enabled else args.gradient_accumulation_steps,
            decay_parameter_names=self.get_decay_parameter_names(model),
        )

    def _install_grad_norm_callback(self, optimizer: GaLoreAdamW) -> None:
        callbacks = self.callback_handler.callbacks
        if any(isinstance(c, GaLoreGradNormCallback) and c.optimizer is optimizer for c in callbacks):
            return
        # One for an earlier optimizer (model_init builds a new one per train()) would report a stale norm.
        callbacks[:] = [c for c in callbacks if not isinstance(c, GaLoreGradNormCallback)]
        callbacks.insert(0, GaLoreGradNormCallback(optimizer))
