"""The settings one step runs with: AdamW hyper-parameters and GaLore projection settings, with their defaults.

:class:`GaLoreConfig`'s field names are the param-group keys (galore-torch's ``rank``, ``update_proj_gap``,
``scale``, ``proj_type``, plus the refresh's ``svd``, ``svd_oversample``, ``svd_power_iters``) and its
defaults are the package's GaLore defaults: every other place reads them from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AdamHyper", "GaLoreConfig", "GROUP_DEFAULTS"]


@dataclass(frozen=True)
class AdamHyper:
    """The AdamW hyper-parameters of one step of one parameter group.

    >>> AdamHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1).decay
    0.9999
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> AdamHyper:
        """The hyper-parameters of a param group; ``float()`` turns 0-dim tensors (accepted as torch.optim
        accepts them) into the numbers kernels take."""
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))

    @property
    def decay(self) -> float:
        """The decoupled weight-decay factor 1 − lr·wd applied to W before the update."""
        return 1.0 - self.lr * self.weight_decay

    def step_size(self, step: int) -> float:
        """lr·√(1−β2^(t+1)) / (1−β1^(t+1)) for ``step`` = t completed steps (galore-torch's folding)."""
        t = step + 1
        return self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)


@dataclass(frozen=True)
class GaLoreConfig:
    """The projection settings of one GaLore parameter group; field names are the group's keys.

    >>> GaLoreConfig(rank=64).update_proj_gap, GaLoreConfig.from_group({"rank": 8, "scale": 1.0}).scale
    (200, 1.0)
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    svd: str = "randomized"
    svd_oversample: int = 8
    svd_power_iters: int = 2
    # How a DTensor (FSDP2) weight's projector is recomputed: "auto" picks per shape, "sketch" runs the
    # randomized SVD through all-reduces, "gather" refreshes on one process (galore_kernels.sharded.refresh).
    sharded_refresh: str = "auto"
    # How a randomized refresh's new basis is matched to the previous one, whose coordinates the moments
    # are in: "procrustes" rotates it by the r × r orthogonal matrix closest to B_old·B_newᵀ (same
    # subspace, rows as close to the old rows as it allows), "signs" flips rows against their
    # predecessors, "none" keeps canonical signs. svd="exact" keeps galore-torch's signs in every case.
    projector_alignment: str = "signs"
    # Each ≥3-D parameter of the group is a stack of matrices (experts × out × in, as transformers stores
    # mixture-of-experts weights), each projected with its own projector; otherwise (shape[0], rest).
    experts: bool = False

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> GaLoreConfig:
        """The settings of a group that has ``rank``; keys it lacks take the defaults."""
        values = {f.name: group[f.name] for f in dataclasses.fields(cls) if f.name in group}
        if "scale" in values:
            values["scale"] = float(values["scale"])
        return cls(**values)


# What a param group with ``rank`` gets for the keys it leaves out (``rank`` itself is required there).
GROUP_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(GaLoreConfig) if f.name != "rank"
}
