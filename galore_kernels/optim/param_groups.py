"""GaLore param groups selected by module name, as ``Trainer`` selects ``optim_target_modules``.

Needs no framework: it works on any ``nn.Module``; :mod:`galore_kernels.integrations.transformers`
re-exports it for ``Trainer`` users.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
) -> list[dict[str, Any]]:
    """Param groups that project the weights of the ``nn.Linear`` modules ``target_modules`` selects.

    Modules are selected as ``Trainer`` selects them for its ``optim_target_modules``: ``"all-linear"``
    (or ``"all_linear"``) takes every ``nn.Linear`` — the output head ``lm_head`` included, as in
    ``Trainer`` (PEFT's ``"all-linear"`` leaves it out); another string is a regex that must match a
    module's whole name; a list selects a module whose name contains an entry or fully matches one as a
    regex. Only the ``weight`` of a selected ``nn.Linear`` is projected; embeddings, norms and biases
    never are. A weight is found by its name, so one tied to an embedding (listed under the
    embedding's name) stays AdamW, again as in ``Trainer``.

    Returns ``[plain, projected]``: every other trainable parameter in one AdamW group, the selected
    weights in a group with ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``; both groups get
    ``weight_decay``. Frozen parameters (``requires_grad=False``) are in neither group.

    Raises ``ValueError`` when ``target_modules`` is neither a string nor a list of strings, holds an
    invalid regex, or selects no trainable ``nn.Linear`` weight.

    Example::

        groups = galore_param_groups(model, [r".*\\.(q|v)_proj", "mlp"], rank=64)
        optimizer = GaLoreAdamW(groups, lr=1e-2)
    """
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    if not all_linear:
        _check_target_modules(target_modules)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    selected = [name for name in linear if all_linear or _selects(target_modules, name)]
    if not selected:
        raise ValueError(
            f"target_modules {target_modules!r} matches no nn.Linear module; this model's nn.Linear modules "
            f"include {linear[:6]}"
        )
    weight_names = {f"{name}.weight" if name else "weight" for name in selected}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    projected = [p for name, p in trainable if name in weight_names]
    if not projected:
        raise ValueError(f"target_modules {target_modules!r} matches only frozen nn.Linear weights: {selected[:6]}")
    return [
        {"params": [p for name, p in trainable if name not in weight_names], "weight_decay": weight_decay},
        {
            "params": projected,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            "weight_decay": weight_decay,
        },
    ]


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
