"""Per-GPU memory under FSDP2 (``fully_shard`` on P GPUs) per optimizer mode, and the refresh's traffic.

Every parameter is sliced as :func:`galore_kernels.distributed.kept_dim_placement_fn` slices it (GaLore
weights along the dimension their projection keeps, the rest ``Shard(0)``); a process holds at most
⌈dim / P⌉ of the sliced dimension (torch.chunk's split, which FSDP2 uses), and the numbers are that
busiest process's. Optimizer state follows docs/DESIGN.md §10: projectors whole on every GPU, moments
sliced with the weight (whole where the mixed dimension is sliced), 8-bit absmax padded to the longest
slice. The 2-process test checks these against the local bytes of a real sharded model's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import GROUP_DEFAULTS, GaLoreConfig
from ..optim.param_groups import galore_param_groups
from ..projector import effective_rank, resolve_side
from ..quant import BLOCK_SIZE
from ..sharded import kept_matrix_dim
from ..sharded.refresh import preferred_refresh, refresh_bytes
from ..state import compute_dtype, matrix_shape, projector_dtype
from .memory_plan import _MIN_8BIT_SIZE, MemoryPlanError, activation_bytes

__all__ = ["FSDP_MODES", "FsdpModeMemory", "FsdpPlan", "plan_fsdp_memory"]

FSDP_MODES = ("AdamW", "8-bit Adam", "GaLore", "8-bit GaLore")


@dataclass(frozen=True)
class FsdpModeMemory:
    """Bytes on the busiest GPU for one mode; ``projectors`` is the part of ``optimizer_state`` held by B."""

    mode: str
    weights: int
    gradients: int
    optimizer_state: int
    projectors: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class FsdpPlan:
    """Per-GPU memory of each mode in :data:`FSDP_MODES` on ``gpus`` GPUs, and the refresh's traffic.

    ``refresh_bytes`` bounds what one GPU sends and receives when every projector refreshes at once (the
    "aligned" schedule's refresh step): the sum over weights of each refresh's busiest process (a gather's
    owner), each weight by the method :func:`choose_refresh` picks; owners go round-robin, so the
    gathers' share is spread over the GPUs in practice;
    ``sketch_weights`` / ``gather_weights`` count the weights of each method; ``kept_weights`` those
    sliced along the kept dimension (no communication between refreshes).
    """

    gpus: int
    rank: int
    update_proj_gap: int
    modes: tuple[FsdpModeMemory, ...]
    refresh_bytes: int
    sketch_weights: int
    gather_weights: int
    kept_weights: int
    num_projected: int

    def mode(self, name: str) -> FsdpModeMemory:
        """The row of mode ``name`` (one of :data:`FSDP_MODES`)."""
        for row in self.modes:
            if row.mode == name:
                return row
        raise KeyError(f"unknown mode {name!r}; modes are {FSDP_MODES}")


def _blocks(length: int) -> int:
    return -(-length // BLOCK_SIZE)


def _chunk(length: int, gpus: int) -> int:
    return -(-length // gpus)


def _sliced_dim(param: torch.Tensor, projected: bool, side: str | None, gpus: int) -> int:
    """The tensor dimension kept_dim_placement_fn slices (0 unless a 2-D weight's kept columns split evenly)."""
    if projected and param.dim() == 2 and kept_matrix_dim(side) == 1 and param.shape[1] % gpus == 0:
        return 1
    return 0


def _local_numel(param: torch.Tensor, dim: int, gpus: int) -> int:
    return param.numel() // max(param.shape[dim], 1) * _chunk(param.shape[dim], gpus)


def _moment_bytes(rows: int, columns: int, dtype: torch.dtype, quantized: bool, absmax_columns: int) -> int:
    if not quantized:
        return 2 * rows * columns * torch.empty(0, dtype=dtype).element_size()
    return 2 * (rows * columns + 4 * rows * absmax_columns)


def _plain_state(param: torch.Tensor, gpus: int, min_8bit_size: int | None) -> int:
    local = _local_numel(param, 0, gpus)
    quantized = min_8bit_size is not None and param.numel() >= max(min_8bit_size, 1)
    return _moment_bytes(1, local, compute_dtype(param.dtype), quantized, _blocks(local))


def _projected_state(
    param: torch.Tensor, group: dict[str, Any], gpus: int, min_8bit_size: int | None
) -> tuple[int, int, bool]:
    """(state bytes, projector bytes, kept) of a projected weight on the busiest GPU."""
    m, n = matrix_shape(param)
    side = resolve_side(group["proj_type"], (m, n))
    r = effective_rank(group["rank"], (m, n))
    d, k = (m, n) if side == "left" else (n, m)
    dim = _sliced_dim(param, True, side, gpus)
    kept = (dim == 1) == (kept_matrix_dim(side) == 1)
    columns = _chunk(k, gpus) if kept else k
    quantized = min_8bit_size is not None and r * k >= max(min_8bit_size, 1)
    projector = r * d * torch.empty(0, dtype=projector_dtype(param)).element_size()
    moments = _moment_bytes(r, columns, compute_dtype(param.dtype), quantized, _blocks(columns))
    return projector + moments, projector, kept


def plan_fsdp_memory(
    model: nn.Module,
    *,
    rank: int,
    gpus: int,
    target_modules: str | Sequence[str] = ("attn", "mlp"),
    tokens: int = 256,
) -> FsdpPlan:
    """Per-GPU bytes of training ``model`` under FSDP2 on ``gpus`` GPUs (see the module docstring).

    Example::

        plan = plan_fsdp_memory(model, rank=512, gpus=8)
        plan.mode("8-bit GaLore").optimizer_state  # bytes on the busiest GPU
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise MemoryPlanError(f"gpus must be an int >= 1, got {gpus!r}")
    try:
        plain, *projected_groups = galore_param_groups(model, target_modules, rank=rank)
    except ValueError as error:
        raise MemoryPlanError(str(error)) from None
    projected = [({**GROUP_DEFAULTS, **g}, p) for g in projected_groups for p in g["params"] if p.numel()]
    if any(group["experts"] for group, _ in projected):
        raise MemoryPlanError("expert stacks are not supported on sharded parameters yet: plan without --gpus")
    projected_ids = {id(p) for _, p in projected}
    params = [p for p in model.parameters() if p.requires_grad]
    config_of = {id(p): GaLoreConfig.from_group(g) for g, p in projected}
    side_of = {id(p): resolve_side(g["proj_type"], matrix_shape(p)) for g, p in projected}
    local = {
        id(p): _local_numel(p, _sliced_dim(p, id(p) in projected_ids, side_of.get(id(p)), gpus), gpus) for p in params
    }
    weights = sum(local[id(p)] * p.element_size() for p in params)
    activations = activation_bytes(model.config, tokens, params[0].dtype)
    adamw = sum(2 * local[id(p)] * p.element_size() + 4 for p in params)

    def galore(min_8bit_size: int | None) -> tuple[int, int]:
        state = projectors = 0
        for p in params:
            if id(p) in projected_ids:
                group = next(g for g, q in projected if q is p)
                nbytes, projector, _ = _projected_state(p, group, gpus, min_8bit_size)
                state, projectors = state + nbytes, projectors + projector
            else:
                state += _plain_state(p, gpus, min_8bit_size)
        return state, projectors

    rows = [FsdpModeMemory("AdamW", weights, weights, adamw, 0, activations)]
    rows.append(FsdpModeMemory("8-bit Adam", weights, weights, sum(_plain_state(p, gpus, _MIN_8BIT_SIZE) for p in params),
                               0, activations))
    for name, min_8bit in (("GaLore", None), ("8-bit GaLore", _MIN_8BIT_SIZE)):
        state, projectors = galore(min_8bit)
        rows.append(FsdpModeMemory(name, weights, weights, state, projectors, activations))
    refresh, methods, kept_count = 0, {"local": 0, "sketch": 0, "gather": 0}, 0
    for group, p in projected:
        config, side = config_of[id(p)], side_of[id(p)]
        m, n = matrix_shape(p)
        d, k = (m, n) if side == "left" else (n, m)
        kept = _projected_state(p, group, gpus, None)[2]
        kept_count += kept
        method, nbytes = refresh_cost(d, k, config, gpus, kept=kept)
        methods[method] += 1
        refresh += nbytes
    return FsdpPlan(
        gpus=gpus, rank=rank, update_proj_gap=int(GROUP_DEFAULTS["update_proj_gap"]), modes=tuple(rows),
        refresh_bytes=refresh, sketch_weights=methods["sketch"], gather_weights=methods["gather"],
        kept_weights=kept_count, num_projected=len(projected),
    )


def refresh_cost(d: int, k: int, config: GaLoreConfig, gpus: int, *, kept: bool) -> tuple[str, int]:
    """(method, bytes the busiest GPU moves) of one refresh of a d × k G' on ``gpus`` GPUs, by the rule of
    :func:`galore_kernels.sharded.choose_refresh` (with ``sharded_refresh="auto"``)."""
    if gpus == 1:
        return "local", 0
    costs = refresh_bytes(d, k, config, gpus, kept=kept and config.svd == "randomized")
    method = preferred_refresh(costs)
    return method, int(costs[method])
