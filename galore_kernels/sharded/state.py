"""Optimizer state of DTensor parameters, kept as DTensors (docs/DESIGN.md §10).

Each state tensor is a DTensor on the parameter's mesh, so ``torch.distributed.checkpoint`` with
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` saves and reshards it like any FSDP2 state.
Steps run on the local tensors (:func:`local_view`), in the state format of docs/DESIGN.md §4:

========================  =====================================  ========================================
entry                     projected, kept dimension sliced       elsewhere
========================  =====================================  ========================================
``projector`` (r × d)     Replicate: every process holds B       Replicate
``exp_avg[_sq]`` (r × k)  Shard(1): this process's columns       Replicate (the step all-reduces S)
``*_absmax``              Shard(1), ⌈chunk/256⌉ blocks a process  Replicate
plain moments             the parameter's placement              (8-bit: codes in the parameter's shape,
                                                                 absmax (P, ⌈chunk numel/256⌉) Shard(0))
========================  =====================================  ========================================

8-bit blocks follow the local slice: they restart at its first column (first element for a plain
parameter). Absmax rows are padded to the longest slice's block count so that every process's part has
the same length, which a DTensor's even split needs; the padding blocks stay zero. A checkpoint's block
layout therefore depends on the slicing: sliced 8-bit state records ``absmax_slices`` (the number of
processes), and loads only on that world size. fp32 state reshards to any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..projector import effective_rank, resolve_side
from ..quant import BLOCK_SIZE
from ..state import compute_dtype, is_projected, projector_dtype
from .layout import ShardLayout

__all__ = ["init_sharded_state", "local_view", "moments_are_sliced"]


def _blocks(length: int) -> int:
    return -(-length // BLOCK_SIZE)


def moments_are_sliced(layout: ShardLayout, side: str) -> bool:
    """Whether a projected parameter's moments are sliced like its gradient (kept dimension sliced)."""
    return layout.matrix_dim is not None and layout.shards_kept_dimension(side)


def _wrap(local: torch.Tensor, layout: ShardLayout, placement: Any, shape: tuple[int, ...]) -> DTensor:
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, layout.mesh, (placement,), run_check=False, shape=torch.Size(shape), stride=stride)


def _plain_state(param: DTensor, layout: ShardLayout, quantized: bool) -> dict[str, Any]:
    local = param.to_local()
    dtype = compute_dtype(param.dtype)
    if not quantized:
        return {
            name: _wrap(torch.zeros(local.shape, dtype=dtype, device=local.device), layout, layout.placements[0],
                        layout.global_shape)
            for name in ("exp_avg", "exp_avg_sq")
        }
    rest = torch.Size(layout.global_shape).numel() // max(layout.global_shape[layout.tensor_dim or 0], 1)
    blocks = _blocks(layout.chunk * rest if layout.tensor_dim is not None else local.numel())
    absmax_placement = Shard(0) if layout.tensor_dim is not None else Replicate()
    absmax_rows = layout.world_size if layout.tensor_dim is not None else 1
    state = {}
    for name in ("exp_avg", "exp_avg_sq"):
        state[name] = _wrap(torch.zeros(local.shape, dtype=torch.uint8, device=local.device), layout,
                            layout.placements[0], layout.global_shape)
        state[f"{name}_absmax"] = _wrap(torch.zeros((1, blocks), device=local.device), layout, absmax_placement,
                                        (absmax_rows, blocks))
    if layout.tensor_dim is not None:
        state["absmax_slices"] = layout.world_size
    return state


def _projected_state(param: DTensor, layout: ShardLayout, group: dict[str, Any], quantize) -> dict[str, Any]:
    m, n = layout.matrix_shape
    side = resolve_side(group["proj_type"], (m, n))
    r = effective_rank(group["rank"], (m, n))
    d, k = (m, n) if side == "left" else (n, m)
    device = param.to_local().device
    sliced = moments_are_sliced(layout, side)
    local_k = layout.length if sliced else k
    placement = Shard(1) if sliced else Replicate()
    state = {
        "projector": _wrap(torch.zeros((r, d), dtype=projector_dtype(param), device=device), layout, Replicate(),
                           (r, d)),
    }
    dtype = compute_dtype(param.dtype)
    if not quantize(r * k):
        for name in ("exp_avg", "exp_avg_sq"):
            state[name] = _wrap(torch.zeros((r, local_k), dtype=dtype, device=device), layout, placement, (r, k))
        return state
    blocks = _blocks(layout.chunk if sliced else k)
    absmax_columns = blocks * layout.world_size if sliced else blocks
    for name in ("exp_avg", "exp_avg_sq"):
        state[name] = _wrap(torch.zeros((r, local_k), dtype=torch.uint8, device=device), layout, placement, (r, k))
        state[f"{name}_absmax"] = _wrap(torch.zeros((r, blocks), device=device), layout, placement,
                                        (r, absmax_columns))
    if sliced:
        state["absmax_slices"] = layout.world_size
    return state


def init_sharded_state(
    param: DTensor,
    group: dict[str, Any],
    *,
    param_seed: int,
    min_8bit_size: int | None,
    refresh_offset: int = 0,
) -> dict[str, Any]:
    """Fresh state for a DTensor parameter: the entries :func:`galore_kernels.state.init_state` creates for
    the global parameter, as DTensors placed as the module docstring says. Whether a moment is 8-bit is
    decided on its global size, so every process decides alike."""
    layout = ShardLayout.of(param)

    def quantize(numel: int) -> bool:
        return min_8bit_size is not None and numel >= max(min_8bit_size, 1)

    state: dict[str, Any] = {"step": 0, "nonfinite_skips": 0}
    if not is_projected(param, group):
        state.update(_plain_state(param, layout, quantize(param.numel())))
        return state
    state.update({"seed": int(param_seed), "refresh_offset": int(refresh_offset), "pending_refresh": 0})
    state.update(_projected_state(param, layout, group, quantize))
    return state


@contextmanager
def local_view(state: dict[str, Any], layout: ShardLayout, *, projected: bool) -> Iterator[dict[str, Any]]:
    """The state as the single-process code reads it: local tensors (views: writes reach the DTensors),
    absmax cut to the slice's own blocks and 8-bit codes of a plain parameter as the flat row (1, numel).
    Numbers the step changes (``step``, ``pending_refresh``, ...) are written back on exit."""
    local: dict[str, Any] = {}
    for key, value in state.items():
        local[key] = value.to_local() if isinstance(value, DTensor) else value
    if "exp_avg_absmax" in local:
        codes = local["exp_avg"]
        if projected:
            used = _blocks(codes.shape[1])
        else:
            codes = codes.reshape(1, -1)
            used = _blocks(codes.shape[1])
            local["exp_avg"], local["exp_avg_sq"] = codes, local["exp_avg_sq"].reshape(1, -1)
        for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            # A contiguous copy when padding blocks follow: kernels take absmax rows as dense.
            padded = local[name]
            local[name] = padded if used == padded.shape[1] else padded[:, :used].clone()
    yield local
    for key, value in local.items():
        if not isinstance(value, torch.Tensor):
            state[key] = value
        elif key.endswith("_absmax") and value.data_ptr() != state[key].to_local().data_ptr():
            state[key].to_local()[:, : value.shape[1]].copy_(value)
