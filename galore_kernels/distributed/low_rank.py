"""A DDP communication hook that all-reduces GaLore's projected gradients instead of the full ones.

Projection is linear: the mean over processes of S_i = B·G_i' equals B·(mean of G_i)', which is all the
optimizer uses of a projected weight's gradient between refreshes. So for such a weight the hook
all-reduces S (r × k elements instead of m × n) and hands the averaged S to the optimizer, which steps
from it (``GaLoreAdamW.take_reduced_projection``); the weight's ``.grad`` is left at zero. On a weight's
refresh step, and for every unprojected parameter, the full gradient is all-reduced as plain DDP does.

What it changes, beyond the bytes: ``optimizer.last_grad_norm`` counts a projected weight between
refreshes by the norm of its averaged S, the part of the gradient GaLore steps on (at most the full
gradient's norm). A NaN or Inf on one process reaches every process through the all-reduce (of S or of G),
so the optimizer's non-finite skip is the same decision on all of them. Clipping ``.grad`` with
``clip_grad_norm_`` before ``step()`` cannot see the projected weights' gradients (they are in S).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as real classes.
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["LowRankHookState", "low_rank_hook"]


@dataclass
class LowRankHookState:
    """What :func:`low_rank_hook` needs: the GaLore optimizer of the DDP model's parameters, and the process
    group (the default one when None). ``elements_reduced`` counts the elements all-reduced since it was
    last reset (for reports and tests).

    Example::

        state = LowRankHookState(optimizer)
        ddp_model.register_comm_hook(state, low_rank_hook)
    """

    optimizer: torch.optim.Optimizer
    process_group: dist.ProcessGroup | None = None
    elements_reduced: int = field(default=0)


def low_rank_hook(state: LowRankHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce one DDP bucket: projected weights' S between refreshes, full gradients otherwise (mean)."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    pieces, projection_shapes = [], []
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        s = state.optimizer.projection_to_communicate(param, grad)
        projection_shapes.append(None if s is None else s.shape)
        pieces.append((grad if s is None else s).reshape(-1).float())
    # One all-reduce per bucket, as DDP makes; fp32, which S is (plain gradients of 16-bit models cost
    # twice their bytes here).
    flat = torch.cat(pieces).div_(world_size)
    state.elements_reduced += flat.numel()
    future = dist.all_reduce(flat, group=group, async_op=True).get_future()

    def unpack(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = done.value()[0]
        offset = 0
        for param, grad, shape in zip(bucket.parameters(), bucket.gradients(), projection_shapes):
            size = grad.numel() if shape is None else shape.numel()
            values = reduced[offset : offset + size]
            offset += size
            if shape is None:
                grad.copy_(values.view_as(grad))
            else:
                state.optimizer.take_reduced_projection(param, values.view(shape).clone())
                grad.zero_()
        return bucket.buffer()

    return future.then(unpack)
