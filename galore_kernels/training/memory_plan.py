"""Training memory per optimizer mode — weights, gradients, optimizer state, activations — from real shapes.

The model is built on the meta device (shapes only, nothing allocated or downloaded), and optimizer state
is counted from the tensors our optimizers would allocate for each parameter (:func:`state.init_state`),
so the numbers are exact for weights, gradients and optimizer state; activations are an estimate. Modes:

===========================  ==============================================================================
``AdamW``                    ``torch.optim.AdamW``: two moments in the weights' dtype, a 0-dim fp32 ``step``
``8-bit Adam``               :class:`GaLoreAdamW8bit` without projection (bitsandbytes' blockwise format)
``GaLore``                   :class:`GaLoreAdamW`: rank-r projected fp32 moments, fp32 moments elsewhere
``8-bit GaLore``             :class:`GaLoreAdamW8bit`: as GaLore, moments of ≥ 4096 elements in 8 bits
``8-bit GaLore layer-wise``  8-bit GaLore with ``layerwise=True``: one gradient alive at a time
===========================  ==============================================================================

A composite (multimodal) config, such as Gemma 3's or Llama 4's, is planned as its text model: the
causal LM of its ``text_config`` (:func:`causal_lm_config`); the vision tower is left out.

Example::

    config = model_config("llama-7b")
    plan = plan_memory(build_meta_model(config, torch.bfloat16), rank=1024)
    plan.mode("8-bit GaLore layer-wise").total / 1e9  # ≈ 21 (GB); the GaLore paper reports 21.3
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import GROUP_DEFAULTS
from ..optim import GaLoreAdamW8bit
from ..optim.param_groups import galore_param_groups
from ..state import init_state, matrix_shape

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "MODES",
    "PRESETS",
    "PAPER_LLAMA_7B",
    "PAPER_SETTINGS",
    "MemoryPlanError",
    "ModeMemory",
    "MemoryPlan",
    "model_config",
    "causal_lm_config",
    "build_meta_model",
    "plan_memory",
    "activation_bytes",
    "state_bytes",
]

MODES = ("AdamW", "8-bit Adam", "GaLore", "8-bit GaLore", "8-bit GaLore layer-wise")

# Hard-coded so that nothing is downloaded. llama-7b and llama-1b are the GaLore repository's
# configs/llama_7b.json and configs/llama_1b.json (the models of the paper's pre-training runs).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-7b": (
        "llama",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    ),
    "llama-1b": (
        "llama",
        dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    ),
    "mistral-7b": (
        "mistral",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    ),
}

# Zhao et al. 2024, "GaLore" (arXiv 2403.03507), Llama 7B pre-training, one 256-token batch, total bytes
# (decimal GB): "at least 58 GB ... 14GB trainable parameters, 42GB Adam optimizer states and weight
# gradients, and 2GB activation" for BF16 AdamW; 8-bit GaLore (layer-wise weight updates) "reduces ...
# total training memory by 63.3%, compared to a BF16 baseline": 58 × (1 − 0.633) GB.
PAPER_LLAMA_7B: dict[str, float] = {"AdamW": 58e9, "8-bit GaLore layer-wise": 58e9 * (1 - 0.633)}
PAPER_SETTINGS: dict[str, Any] = {
    "model": "llama-7b", "rank": 1024, "dtype": torch.bfloat16, "tokens": 256, "target_modules": ("attn", "mlp")
}

# The 8-bit optimizer's own default, so the plan cannot drift from what GaLoreAdamW8bit allocates.
_MIN_8BIT_SIZE: int = inspect.signature(GaLoreAdamW8bit.__init__).parameters["min_8bit_size"].default


class MemoryPlanError(ValueError):
    """The model or options cannot be planned: an unknown preset, an unreadable or invalid config, a
    ``target_modules`` selecting nothing. The message is one line."""


@dataclass(frozen=True)
class ModeMemory:
    """Bytes of one optimizer mode's training memory; ``activations`` is an estimate, the rest exact."""

    mode: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class MemoryPlan:
    """The memory of every mode in :data:`MODES` for one model, rank, dtype and token batch.

    ``projected_params`` counts the elements of the weights GaLore projects (``num_projected`` tensors);
    ``largest_gradient`` names the parameter whose gradient layer-wise mode holds at its peak;
    ``seq_len`` is the sequence length the activation estimate assumes. ``full_rank`` counts the projected
    weights with min(m, n) ≤ ``rank``: GaLore uses rank min(rank, m, n) on them, their full rank, so it
    compresses nothing there; ``min_effective_rank`` is the smallest min(rank, m, n) of all projected weights.
    ``allreduce_plain`` and ``allreduce_low_rank`` are the elements one data-parallel step all-reduces with
    plain DDP (every trainable element) and with :func:`galore_kernels.distributed.low_rank_hook` on a step
    that refreshes no projector (r·k per projected matrix, every element of the rest).
    """

    num_params: int
    projected_params: int
    num_projected: int
    num_tensors: int
    rank: int
    dtype: torch.dtype
    tokens: int
    seq_len: int
    largest_gradient: str
    full_rank: int
    min_effective_rank: int
    allreduce_plain: int
    allreduce_low_rank: int
    modes: tuple[ModeMemory, ...]

    def mode(self, name: str) -> ModeMemory:
        """The row of mode ``name`` (one of :data:`MODES`)."""
        for row in self.modes:
            if row.mode == name:
                return row
        raise KeyError(f"no mode {name!r}; modes are {MODES}")


def model_config(model: str) -> PretrainedConfig:
    """The transformers config of a preset name (:data:`PRESETS`), a config.json, or a folder holding one.

    A file is read as JSON and built with ``AutoConfig.for_model(model_type, **fields)``; a composite
    config keeps its sub-configs (:func:`causal_lm_config` picks the text model). Raises
    :class:`MemoryPlanError` for an unknown name, a missing file, invalid JSON, a missing or unknown
    ``model_type``, fields the config class refuses, or a config with no causal-LM model in transformers
    (neither its own nor its text model's).

    Example::

        model_config("mistral-7b").num_key_value_heads  # 8
        model_config("path/to/checkpoint")  # reads path/to/checkpoint/config.json
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model in PRESETS:
        model_type, fields = PRESETS[model]
    else:
        model_type, fields = _read_config_json(model)
        if model_type not in CONFIG_MAPPING:
            raise MemoryPlanError(
                f"{model}: unknown model_type {model_type!r} (transformers knows e.g. 'llama', 'mistral')"
            )
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ImportError:  # transformers itself is broken or interrupted: not the config's fault
        raise
    except Exception as error:  # only the user's fields can make a known config class fail here
        raise MemoryPlanError(f"{model}: invalid {model_type} config: {_one_line(error)}") from None
    try:
        causal_lm_config(config)
    except MemoryPlanError as error:
        raise MemoryPlanError(f"{model}: {error}") from None
    return config


def causal_lm_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config whose causal-LM model is planned: a composite config's text model's, else ``config``.

    A composite (multimodal) config, such as Gemma 3's or Llama 4's, holds its language model's config
    as ``text_config`` (``config.get_text_config(decoder=True)``); that one is used when transformers has
    a causal LM for it (``gemma3_text`` → ``Gemma3ForCausalLM``), so the vision tower is left out.
    Otherwise ``config`` itself, when transformers has a causal LM for it (``mllama`` →
    ``MllamaForCausalLM``, which is the text model too). Raises :class:`MemoryPlanError` when neither has
    one.

    Example::

        causal_lm_config(model_config("path/to/gemma-3-4b-it")).model_type  # 'gemma3_text'
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        text = config.get_text_config(decoder=True)
    except ValueError:  # several text sub-configs and no way to tell the decoder: plan config itself
        text = config
    for candidate in (text, config):
        if candidate.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return candidate
    inner = f" (text model {text.model_type!r})" if text is not config else ""
    raise MemoryPlanError(f"model_type {config.model_type!r}{inner} has no causal-LM model in transformers")


def _read_config_json(model: str) -> tuple[str, dict[str, Any]]:
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise MemoryPlanError(f"{model}: folder without a config.json")
    if not path.is_file():
        raise MemoryPlanError(
            f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config.json or folder with one"
        )
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise MemoryPlanError(f"{path}: cannot read: {_one_line(error)}") from None
    except json.JSONDecodeError as error:
        raise MemoryPlanError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise MemoryPlanError(f"{path}: expected a JSON object of config fields, got {type(fields).__name__}")
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise MemoryPlanError(f"{path}: no \"model_type\" (e.g. \"llama\") to tell which config it is")
    return model_type, fields


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal-LM model of ``config`` on the meta device, parameters in ``dtype``: shapes, no storage.

    A composite config's model is its text model's (:func:`causal_lm_config`).

    Example::

        model = build_meta_model(model_config("llama-1b"), torch.bfloat16)
    """
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ImportError:
        raise
    except Exception as error:  # e.g. hidden_size <= 0 or an unknown rope_type: the config's fields
        message = f"cannot build a {config.model_type} model from this config: {_one_line(error)}"
        raise MemoryPlanError(message) from None
    return model.to(dtype)


def plan_memory(
    model: nn.Module,
    *,
    rank: int,
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    tokens: int = 256,
) -> MemoryPlan:
    """Bytes per mode of training ``model`` (a transformers causal LM, on the meta device or real).

    Weights are the trainable parameters in their dtype. GaLore projects the ``nn.Linear`` weights that
    ``target_modules`` selects (:func:`~galore_kernels.optim.param_groups.galore_param_groups`;
    embeddings and ``lm_head`` stay AdamW, as in the paper) at ``rank`` with ``proj_type="std"``.
    Gradients are every trainable parameter's, in its dtype, except layer-wise, where one is alive at a
    time: the largest. Optimizer state is the bytes of the state tensors each optimizer allocates; it
    does not change after the first step. Activations: :func:`activation_bytes` for ``tokens``.

    A projected weight whose min(m, n) is at most ``rank`` keeps rank min(rank, m, n), its full rank
    (counted in ``full_rank``): its state is then no smaller than AdamW's.

    Raises :class:`MemoryPlanError` when ``target_modules`` selects no weight, ``rank`` or ``tokens``
    is below 1, or the config lacks a field the activation estimate needs.

    Example::

        plan = plan_memory(model, rank=128)
        plan.mode("GaLore").optimizer_state  # bytes
    """
    for name, value in (("rank", rank), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoryPlanError(f"{name} must be an int >= 1, got {value!r}")
    try:
        with warnings.catch_warnings():
            # Matrices a target selects but GaLore leaves alone (MoE routers) are AdamW here, counted as such;
            # the header's count of projected weights says what is projected.
            warnings.simplefilter("ignore", UserWarning)
            plain, *projected_groups = galore_param_groups(model, target_modules, rank=rank)
    except ValueError as error:
        raise MemoryPlanError(str(error)) from None
    # Expert stacks (Mixtral's experts × out × in weights) come in their own group, one projector per expert.
    projected = [({**GROUP_DEFAULTS, **group}, p) for group in projected_groups for p in group["params"]]
    galore_groups = [(plain, p) for p in plain["params"]] + projected
    plain_groups = [({}, p) for _, p in galore_groups]
    params = [p for _, p in galore_groups]
    weights = sum(_nbytes(p) for p in params)
    largest_name, largest = max(
        ((name, p) for name, p in model.named_parameters() if p.requires_grad), key=lambda item: _nbytes(item[1])
    )
    activations = activation_bytes(model.config, tokens, params[0].dtype)

    def row(mode: str, gradients: int, optimizer_state: int) -> ModeMemory:
        return ModeMemory(mode, weights, gradients, optimizer_state, activations)

    eight_bit_galore = _galore_state_bytes(galore_groups, _MIN_8BIT_SIZE)
    # The matrices projected (each expert's for a stack); empty weights are not projected.
    shapes = [matrix_shape(p, group["experts"])[-2:] for group, p in projected if p.numel()]
    modes = (
        row("AdamW", weights, sum(_adamw_state_bytes(p) for p in params)),
        row("8-bit Adam", weights, _galore_state_bytes(plain_groups, _MIN_8BIT_SIZE)),
        row("GaLore", weights, _galore_state_bytes(galore_groups, None)),
        row("8-bit GaLore", weights, eight_bit_galore),
        row("8-bit GaLore layer-wise", _nbytes(largest), eight_bit_galore),
    )
    return MemoryPlan(
        num_params=sum(p.numel() for p in params),
        projected_params=sum(p.numel() for _, p in projected),
        num_projected=len(projected),
        num_tensors=len(params),
        rank=rank,
        dtype=params[0].dtype,
        tokens=tokens,
        seq_len=_seq_len(model.config, tokens),
        largest_gradient=largest_name,
        full_rank=sum(min(shape) <= rank for shape in shapes),
        allreduce_plain=sum(p.numel() for p in params),
        allreduce_low_rank=sum(p.numel() for p in plain["params"]) + sum(
            _projection_elements(group, p) for group, p in projected
        ),
        min_effective_rank=min((min(rank, *shape) for shape in shapes), default=rank),
        modes=modes,
    )


def _projection_elements(group: dict[str, Any], param: torch.Tensor) -> int:
    """The elements of S = B·G' the low-rank hook all-reduces for ``param`` (its moments' size); an empty
    weight is not projected and sends its (zero) elements whole."""
    if not param.numel():
        return 0
    state = init_state(param, group, param_seed=0, min_8bit_size=None)
    return state["exp_avg"].numel()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in one parameter's optimizer state (plain numbers in it take none)."""
    return sum(_nbytes(value) for value in state.values() if isinstance(value, torch.Tensor))


def _galore_state_bytes(groups: list[tuple[dict[str, Any], torch.Tensor]], min_8bit_size: int | None) -> int:
    return sum(state_bytes(init_state(p, group, param_seed=0, min_8bit_size=min_8bit_size)) for group, p in groups)


def _adamw_state_bytes(param: torch.Tensor) -> int:
    # torch.optim.AdamW (single-tensor and foreach) keeps exp_avg and exp_avg_sq like the parameter and
    # ``step`` as a 0-dim fp32 tensor: 4 bytes (fp64 only under a float64 default dtype).
    return 2 * _nbytes(param) + 4


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    # A composite model's config (mllama's) holds its text model's sizes in a sub-config.
    try:
        return config.get_text_config(decoder=True)
    except ValueError:
        return config


def _seq_len(config: PretrainedConfig, tokens: int) -> int:
    # The token batch is one sequence while it fits the model's context, else full-context sequences.
    return min(tokens, getattr(_text_config(config), "max_position_embeddings", None) or tokens)


def activation_bytes(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> int:
    """An estimate of the activations saved for backward over a batch of ``tokens`` tokens.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1):
    each layer saves s·b·h·(34 + 5·a·s/h) bytes with 16-bit activations and no recomputation, here with
    b·s = ``tokens`` and s = min(tokens, max_position_embeddings); plus the final norm's input and output
    (4 bytes per token per hidden unit) and fp32 logits (4 bytes per token per vocabulary entry). Their
    count is for GPT layers (4h GeLU MLP, dropout); counting a Llama layer the same way (SwiGLU with
    intermediate size i, no dropout: 16h + 8i + 2as bytes per token) gives 6% less for Llama-7B at
    s = 256. fp32 activations double the 16-bit terms.

    Example::

        activation_bytes(model_config("llama-7b"), 256, torch.bfloat16) / 1e9  # ≈ 1.5; the paper says 2 GB
    """
    text = _text_config(config)
    fields = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    missing = [name for name in fields if not isinstance(getattr(text, name, None), int)]
    if missing:
        raise MemoryPlanError(
            f"cannot estimate activations: the {text.model_type} config has no integer {', '.join(missing)}"
        )
    h, a, layers, vocab_size = (getattr(text, name) for name in fields)
    s = _seq_len(config, tokens)
    sixteen_bit = layers * tokens * (34 * h + 5 * a * s) + tokens * 4 * h
    scale = torch.finfo(dtype).bits // 16
    return sixteen_bit * scale + tokens * 4 * vocab_size
