"""Where a DTensor parameter's local shard sits in its global matrix (docs/DESIGN.md §10).

FSDP2 (``torch.distributed.fsdp.fully_shard``) gives each process a slice of every parameter along one
tensor dimension: ``Shard(0)`` by default, ``Shard(1)`` through ``shard_placement_fn``. GaLore treats a
parameter as the matrix (shape[0], rest), so ``Shard(0)`` slices the matrix's rows and ``Shard(1)`` of a
2-D parameter its columns. Which of the two the projection keeps (not mixes) decides whether a step
needs any communication: see :func:`ShardLayout.shards_kept_dimension`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = ["ShardLayout", "is_sharded", "kept_matrix_dim"]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter FSDP2 or tensor parallelism distributed)."""
    return isinstance(tensor, DTensor)


def kept_matrix_dim(side: str) -> int:
    """The matrix dimension a projection on ``side`` keeps: S = B·G keeps G's columns (left), S = B·Gᵀ its
    rows (right). Sharding that dimension lets every process project, step and back-project its own slice."""
    return 1 if side == "left" else 0


@dataclass(frozen=True)
class ShardLayout:
    """A DTensor parameter's placement: the process group, which matrix dimension is sliced, and this
    process's slice of it (offset and length), computed from the global shape.

    Example::

        layout = ShardLayout.of(param)          # param: a fully_shard-ed weight (DTensor)
        layout.matrix_dim, layout.offset, layout.length   # (0, 4, 3) for rows 4..6 of a 7-row weight
    """

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    group: dist.ProcessGroup
    placements: tuple
    global_shape: tuple[int, ...]
    tensor_dim: int | None  # the tensor dimension sliced; None: every process holds all of it
    matrix_dim: int | None  # the same as a dimension of the (shape[0], rest) matrix view
    offset: int
    length: int
    chunk: int  # the longest slice of any process (torch.chunk's size): padded collectives use it
    world_size: int
    rank: int

    @classmethod
    def of(cls, param: torch.Tensor) -> ShardLayout:
        """The layout of a DTensor parameter; raises ``ValueError`` for placements it cannot step."""
        if not is_sharded(param):
            raise ValueError("ShardLayout.of expects a DTensor parameter (FSDP2 or tensor parallel)")
        mesh, placements = param.device_mesh, tuple(param.placements)
        shape = tuple(param.shape)
        if mesh.ndim != 1:
            raise ValueError(
                f"a parameter of shape {shape} is placed {placements} on a {mesh.ndim}-D device mesh; GaLore "
                "optimizers step DTensors on a 1-D mesh (FSDP2's fully_shard without HSDP); use a 1-D mesh"
            )
        placement = placements[0]
        if isinstance(placement, Replicate):
            tensor_dim = None
        elif type(placement) is Shard:
            tensor_dim = placement.dim % len(shape)
        else:
            raise ValueError(
                f"a parameter of shape {shape} has placement {placement}; GaLore optimizers support Shard(d) "
                "and Replicate() (not Partial or strided shards)"
            )
        local_shape, global_offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        matrix_dim = None
        if tensor_dim is not None:
            matrix_dim = 0 if tensor_dim == 0 else (1 if len(shape) == 2 else -1)
        world = mesh.size()
        return cls(
            mesh=mesh,
            group=mesh.get_group(),
            placements=placements,
            global_shape=shape,
            tensor_dim=tensor_dim,
            matrix_dim=matrix_dim,
            offset=0 if tensor_dim is None else int(global_offset[tensor_dim]),
            length=0 if tensor_dim is None else int(local_shape[tensor_dim]),
            chunk=0 if tensor_dim is None else -(-shape[tensor_dim] // world),
            world_size=world,
            rank=mesh.get_local_rank(),
        )

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The global (shape[0], rest) matrix."""
        rows = self.global_shape[0]
        return rows, (torch.Size(self.global_shape).numel() // rows if rows else 0)

    def shards_kept_dimension(self, side: str) -> bool:
        """Whether every process can step its slice alone: the slice runs along the dimension ``side``
        keeps, or the parameter is not sliced."""
        return self.matrix_dim is None or self.matrix_dim == kept_matrix_dim(side)

    def oriented_slice(self, side: str) -> tuple[int, int]:
        """(offset, length) of this process's slice along G' = G (left) or Gᵀ (right)'s sliced dimension."""
        return self.offset, self.length
