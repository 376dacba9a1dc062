"""FSDP2 placements that make GaLore's steps local (docs/DESIGN.md §10).

Under ``fully_shard`` each process holds a slice of every weight, ``Shard(0)`` by default. A projection
S = B·G' mixes one dimension of the weight and keeps the other; when the kept one is sliced, every
process projects, steps and back-projects its own slice with no communication between refreshes. That
is ``Shard(0)`` for a right-projected weight (m ≥ n under "std": S = B·Gᵀ keeps the rows) and
``Shard(1)`` for a left-projected one (m < n, such as Llama's down_proj, 4096 × 11008: S = B·G keeps
the columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import Shard

from ..projector import resolve_side
from ..sharded import kept_matrix_dim
from ..state import matrix_shape

__all__ = ["kept_dim_placement_fn"]


def kept_dim_placement_fn(
    galore_params: Iterable[torch.Tensor], world_size: int, proj_type: str = "std"
) -> Callable[[torch.nn.Parameter], Shard | None]:
    """A ``shard_placement_fn`` for ``fully_shard`` that slices each GaLore weight along the dimension its
    projection keeps; other parameters get FSDP2's default (``None``: ``Shard(0)``).

    ``galore_params`` are the weights (before ``fully_shard``) that will go in a group with ``rank`` and
    this ``proj_type``. FSDP2 refuses an uneven ``Shard(1)``, so a left-projected weight whose columns do
    not split evenly over ``world_size`` keeps ``Shard(0)``; so does a ≥3-D weight (its kept dimension is
    not a tensor dimension). Those still step correctly, with the costs docs/distributed.md lists.

    Example::

        galore = [p for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n]
        placement = kept_dim_placement_fn(galore, dist.get_world_size())
        for layer in model.layers:
            fully_shard(layer, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
    """
    resolve_side(proj_type, (1, 1))  # refuses an unknown proj_type now, not inside fully_shard
    if proj_type == "full":
        raise ValueError("proj_type='full' is not supported on sharded parameters; use 'std', 'reverse_std', "
                         "'left' or 'right'")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    kept: dict[int, int] = {}
    for param in galore_params:
        if param.dim() < 2:
            continue
        side = resolve_side(proj_type, matrix_shape(param))
        dim = kept_matrix_dim(side)
        if param.dim() == 2 and (dim == 0 or param.shape[1] % world_size == 0):
            kept[id(param)] = dim

    def placement(param: torch.nn.Parameter) -> Shard | None:
        dim = kept.get(id(param))
        return None if dim is None else Shard(dim)

    return placement
