"""One optimizer step of a DTensor parameter (docs/DESIGN.md §10), on local tensors.

A plain parameter's AdamW is elementwise: each process steps its slice. A projected parameter whose
kept dimension is sliced needs nothing from the others between refreshes: S_local = B·G'_local is its
columns of S, Adam runs on its columns of the moments, and ΔW_local = back-projection of its columns.
Any other slicing (the mixed dimension sliced) sums S's partial products with one r × k all-reduce per
step, keeps the moments whole on every process and back-projects with its columns of B.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .. import functional, reference
from ..config import AdamHyper, GaLoreConfig
from ..projector import resolve_side
from ..state import matrix_shape
from .layout import ShardLayout, is_sharded
from .refresh import Reduce, refresh_sharded_projector_
from .state import local_view, moments_are_sliced

__all__ = ["check_projectable", "gradient_norms", "sharded_adamw", "sharded_galore_step"]


def check_projectable(param: torch.Tensor, config: GaLoreConfig) -> ShardLayout:
    """The layout of a projected DTensor parameter; ``ValueError`` for what sharded GaLore does not step."""
    layout = ShardLayout.of(param)
    where = f"a sharded parameter of shape {tuple(param.shape)} placed {layout.placements}"
    if config.experts and param.dim() == 3:
        raise ValueError(f"{where}: experts=True groups are not supported on DTensor parameters yet; shard "
                         "the experts' weights with a plain group (projected as (shape[0], rest)) or keep them local")
    if resolve_side(config.proj_type, layout.matrix_shape) == "full":
        raise ValueError(f"{where}: proj_type='full' is not supported on DTensor parameters; use 'std', "
                         "'reverse_std', 'left' or 'right'")
    if layout.matrix_dim == -1:
        raise ValueError(f"{where}: a ≥3-D parameter is projected as (shape[0], rest), so only Shard(0) slices "
                         "that matrix; shard it with Shard(0)")
    return layout


def gradient_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 L2 norm of each gradient, a DTensor's over all its slices (one all-reduce of the squares per
    process group). Norms are computed in the gradient's precision promoted to fp32 at least."""
    norms = []
    sliced: dict[Any, list[int]] = {}
    for i, grad in enumerate(grads):
        local = grad.to_local() if is_sharded(grad) else grad
        norms.append(torch.linalg.vector_norm(local, dtype=torch.promote_types(local.dtype, torch.float32)))
        if is_sharded(grad) and any(p.is_shard() for p in grad.placements):
            sliced.setdefault(grad.device_mesh.get_group(), []).append(i)
    for group, members in sliced.items():
        squares = torch.stack([norms[i].float() for i in members]).square()
        dist.all_reduce(squares, group=group)
        for i, square in zip(members, squares.sqrt()):
            norms[i] = square
    return [norm.float() for norm in norms]


def sharded_adamw(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, *,
                  backend: str) -> None:
    """AdamW on a DTensor parameter without projection: each process steps its slice."""
    layout = ShardLayout.of(param)
    with local_view(state, layout, projected=False) as local:
        functional.adamw([param.to_local()], [grad.to_local()], [local], hyper, backend=backend)


def sharded_galore_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    config: GaLoreConfig,
    *,
    backend: str,
    reduce: Reduce | None = None,
) -> None:
    """GaLore-AdamW on a projected DTensor parameter from its (reduced) DTensor gradient: refresh B on
    schedule (:mod:`.refresh`), project this process's slice, Adam, back-project, update the slice."""
    layout = check_projectable(param, config)
    side = resolve_side(config.proj_type, layout.matrix_shape)
    # The side follows the global shape; a slice's own shape could resolve "std" the other way.
    local_config = dataclasses.replace(config, proj_type=side)
    weight = param.to_local()
    g = grad.to_local().reshape(matrix_shape(weight))
    with local_view(state, layout, projected=True) as local:
        if reference.needs_refresh(local, config.update_proj_gap):
            refresh_sharded_projector_(
                local, g, layout, side, config, reduce=reduce, source=functional.gaussian_source(backend)
            )
        sliced = moments_are_sliced(layout, side)
        if sliced or layout.matrix_dim is None:
            s = reference.project(local, g, side)
            functional.galore_adamw_step_from_projection(weight, s, local, hyper, local_config, backend=backend)
            return
        # The mixed dimension d is sliced: this process holds columns of B's d and rows of G'.
        columns = local["projector"][:, layout.offset : layout.offset + layout.length].contiguous()
        step_state = {**local, "projector": columns}
        s = reference.project(step_state, g, side)
        dist.all_reduce(s, group=layout.group)
        functional.galore_adamw_step_from_projection(weight, s, step_state, hyper, local_config, backend=backend)
        local["step"] = step_state["step"]
