"""Argument checks for optimizer arguments and param groups (docs/DESIGN.md §8).

Every check raises ``ValueError`` naming the argument, the value given and what is allowed, before any
state exists, so bad input never reaches weights or optimizer state.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch

from ..config import GROUP_DEFAULTS
from ..projector import ALIGNMENTS, PROJ_TYPES, SVD_METHODS

__all__ = ["NONFINITE_MODES", "REFRESH_SCHEDULES", "check_hyper", "check_group", "check_layerwise"]

NONFINITE_MODES = ("skip", "raise")
REFRESH_SCHEDULES = ("aligned", "spread")
SHARDED_REFRESHES = ("auto", "sketch", "gather")


def _real(name: str, value: Any) -> float:
    # 0-dim tensors are accepted where torch.optim accepts them (a tensor lr, for instance).
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Check the AdamW hyper-parameters shared by every group."""
    if _real("lr", lr) < 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    if _real("eps", eps) < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if _real("weight_decay", weight_decay) < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def check_group(group: dict[str, Any]) -> None:
    """Fill GaLore defaults into a group that has ``rank`` and check every value; plain groups are AdamW."""
    check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    if "rank" not in group:
        return
    for key, default in GROUP_DEFAULTS.items():
        group.setdefault(key, default)
    _int("rank", group["rank"], 1)
    group["rank"] = int(group["rank"])  # numpy ints become plain ints, which checkpoints keep as they are
    _int("update_proj_gap", group["update_proj_gap"], 1)
    if _real("scale", group["scale"]) <= 0.0:
        raise ValueError(f"scale must be > 0, got {group['scale']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
    if group["svd"] not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {group['svd']!r}")
    _int("svd_oversample", group["svd_oversample"], 0)
    _int("svd_power_iters", group["svd_power_iters"], 0)
    if group["sharded_refresh"] not in SHARDED_REFRESHES:
        raise ValueError(f"sharded_refresh must be one of {SHARDED_REFRESHES}, got {group['sharded_refresh']!r}")
    if group["sharded_refresh"] == "sketch" and group["svd"] != "randomized":
        raise ValueError("sharded_refresh='sketch' is the randomized SVD; it needs svd='randomized' "
                         f"(got svd={group['svd']!r}): use sharded_refresh='auto' or 'gather'")
    if group["projector_alignment"] not in ALIGNMENTS:
        raise ValueError(f"projector_alignment must be one of {ALIGNMENTS}, got {group['projector_alignment']!r}")
    if not isinstance(group["experts"], bool):
        raise ValueError(f"experts must be True or False, got {group['experts']!r}")
    if group["experts"] and group["proj_type"] == "full":
        raise ValueError(
            "proj_type='full' is not supported with experts=True; use 'std', 'reverse_std', 'left' or 'right'"
        )


def check_layerwise(layerwise: Any, accumulation_steps: Any, refresh_schedule: Any, max_grad_norm: Any) -> None:
    """Check the layer-wise options; accumulation and clipping are layer-wise features."""
    if not isinstance(layerwise, bool):
        raise ValueError(f"layerwise must be True or False, got {layerwise!r}")
    _int("accumulation_steps", accumulation_steps, 1)
    if refresh_schedule not in REFRESH_SCHEDULES:
        raise ValueError(f"refresh_schedule must be one of {REFRESH_SCHEDULES}, got {refresh_schedule!r}")
    if max_grad_norm is not None and _real("max_grad_norm", max_grad_norm) <= 0.0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    if not layerwise and accumulation_steps != 1:
        raise ValueError(
            f"accumulation_steps={accumulation_steps} needs layerwise=True; without it gradients accumulate in "
            ".grad: call step() every k backward passes"
        )
    if not layerwise and max_grad_norm is not None:
        raise ValueError(
            "max_grad_norm needs layerwise=True; without it clip with torch.nn.utils.clip_grad_norm_ before step()"
        )
