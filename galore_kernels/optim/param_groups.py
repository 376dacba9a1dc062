"""GaLore param groups selected by module name, as ``Trainer`` selects ``optim_target_modules``.

Needs no framework: it works on any ``nn.Module``; :mod:`galore_kernels.integrations.transformers`
re-exports it for ``Trainer`` users.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from ..config import GaLoreConfig

__all__ = ["galore_param_groups"]


def galore_param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    rank: int = GaLoreConfig.rank,
    update_proj_gap: int = GaLoreConfig.update_proj_gap,
    scale: float = GaLoreConfig.scale,
    proj_type: str = GaLoreConfig.proj_type,
    weight_decay: float = 0.0,
    decay_parameter_names: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups that project the weights of the ``nn.Linear`` modules ``target_modules`` selects.

    Modules are selected as ``Trainer`` selects them for its ``optim_target_modules``: ``"all-linear"``
    (or ``"all_linear"``) takes every ``nn.Linear`` — the output head ``lm_head`` included, as in
    ``Trainer`` (PEFT's ``"all-linear"`` leaves it out); another string is a regex that must match a
    module's whole name; a list selects a module whose name contains an entry or fully matches one as a
    regex. Only the ``weight`` of a selected ``nn.Linear`` is projected; embeddings, norms and biases
    never are. A weight is found by its name, so one tied to an embedding (listed under the
    embedding's name) stays AdamW, again as in ``Trainer``.

    Mixture-of-experts weights stored as 3-D parameters of a selected module (transformers 5 keeps
    Mixtral's, Qwen-MoE's, DeepSeek-V3's … experts as ``experts.gate_up_proj`` / ``experts.down_proj`` of
    shape experts × out × in) are projected too, each expert with its own projector: they go to a third
    group with ``experts=True``. Any other ≥ 2-D parameter of a selected module stays AdamW, with a
    warning naming it.

    Returns ``[plain, projected]`` (``[plain, projected, experts]`` when the model has expert stacks):
    every other trainable parameter in one AdamW group, the selected weights in groups with ``rank``,
    ``update_proj_gap``, ``scale`` and ``proj_type``; all groups get ``weight_decay``. Frozen parameters
    (``requires_grad=False``) are in no group.

    ``decay_parameter_names`` (``trainer.get_decay_parameter_names(model)``) applies ``Trainer``'s
    convention instead: ``weight_decay`` only for the parameters named there, 0 for the rest (biases and
    norm weights). Each of the two groups is then split in a decayed and a zero-decay part, and the
    empty parts are left out: ``[plain, plain_no_decay, projected]`` for a usual model, whose projected
    ``nn.Linear`` weights are all decayed. The projected groups are those with ``rank``.

    Raises ``ValueError`` when ``target_modules`` is neither a string nor a list of strings, holds an
    invalid regex, or selects no trainable ``nn.Linear`` weight (a string that matches nothing: the
    message suggests the list form, which matches substrings), and for a string as
    ``decay_parameter_names``.

    Example::

        groups = galore_param_groups(model, [r".*\\.(q|v)_proj", "mlp"], rank=64)
        optimizer = GaLoreAdamW(groups, lr=1e-2)
    """
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    if not all_linear:
        _check_target_modules(target_modules)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    selected = [name for name in linear if all_linear or _selects(target_modules, name)]
    stack_names, skipped = _expert_stacks(model, target_modules, all_linear)
    if skipped:
        warnings.warn(
            f"target_modules {target_modules!r} selects modules whose ≥2-D parameters {skipped[:6]} are neither "
            "nn.Linear weights nor 3-D expert stacks: they stay plain AdamW",
            UserWarning,
            stacklevel=2,
        )
    if not selected and not stack_names:
        hint = ""
        if isinstance(target_modules, str) and not all_linear:
            # "attn" meaning "every module whose name contains attn" is the usual slip; a list means that.
            hint = (
                f"; a string is a regex that must match a whole module name: to select the modules whose "
                f"name contains it, pass a list, [{target_modules!r}]"
            )
        raise ValueError(
            f"target_modules {target_modules!r} matches no nn.Linear module{hint}; this model's nn.Linear "
            f"modules include {linear[:6]}"
        )
    weight_names = {f"{name}.weight" if name else "weight" for name in selected}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    plain = [(name, p) for name, p in trainable if name not in weight_names and name not in stack_names]
    projected = [(name, p) for name, p in trainable if name in weight_names]
    stacks = [(name, p) for name, p in trainable if name in stack_names]
    if not projected and not stacks:
        raise ValueError(f"target_modules {target_modules!r} matches only frozen weights: {selected[:6]}")
    galore = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    parts = [(plain, {}), (projected, galore), (stacks, {**galore, "experts": True})]
    if decay_parameter_names is None:
        return [{"params": [p for _, p in plain], "weight_decay": weight_decay}] + [
            {"params": [p for _, p in named], **options, "weight_decay": weight_decay}
            for named, options in parts[1:] if named
        ]
    if isinstance(decay_parameter_names, str):  # a set of its characters would silently decay nothing
        raise ValueError(f"decay_parameter_names must be a collection of names, got {decay_parameter_names!r}")
    decayed = set(decay_parameter_names)
    groups = []
    for named, options in parts:
        for decay in (True, False):
            params = [p for name, p in named if (name in decayed) is decay]
            if params:
                groups.append({"params": params, **options, "weight_decay": weight_decay if decay else 0.0})
    return groups


def _expert_stacks(
    model: nn.Module, target_modules: str | Sequence[str], all_linear: bool
) -> tuple[set[str], list[str]]:
    """Names of the expert stacks among the parameters of selected modules, and of the other ≥ 2-D parameters
    that selected non-``nn.Linear`` modules own (left unprojected; none for ``"all-linear"``, which selects
    linear layers only).

    An expert stack is a 3-D parameter of a module that holds experts: transformers' MoE blocks name it
    ``experts`` and its class ``…Experts`` (MixtralExperts, Qwen3MoeExperts, …). Other 3-D parameters, a
    Conv1d's weight say, are not matrices stacked over experts and are never projected as such.
    """
    stacks, skipped = set(), []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or not (all_linear or _selects(target_modules, module_name)):
            continue
        holds_experts = "expert" in module_name.rsplit(".", 1)[-1].lower() or "expert" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            if param.dim() == 3 and holds_experts:
                stacks.add(full_name)
            elif param.dim() >= 2 and not all_linear:
                skipped.append(full_name)
    return stacks, skipped


def _check_target_modules(target_modules: Any) -> None:
    patterns = [target_modules] if isinstance(target_modules, str) else target_modules
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"target_modules must be 'all-linear', a regex string or a list of substrings/regexes, "
            f"got {target_modules!r}"
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"target_modules entry {pattern!r} is not a valid regex: {error}") from None


def _selects(target_modules: str | Sequence[str], name: str) -> bool:
    """transformers' ``check_target_module_exists``, the matcher behind ``optim_target_modules``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(pattern in name or re.fullmatch(pattern, name) for pattern in target_modules)
