"""Data-parallel training on torch.distributed: what crosses the network between processes.

``low_rank_hook`` is a DDP communication hook: between a projected weight's refreshes it all-reduces the
projection S = B·G' (r × k, fp32) instead of the gradient G (m × n)::

    from torch.nn.parallel import DistributedDataParallel
    from galore_kernels.distributed import LowRankHookState, low_rank_hook

    model = DistributedDataParallel(model)
    optimizer = GaLoreAdamW8bit(groups, lr=1e-3)
    model.register_comm_hook(LowRankHookState(optimizer), low_rank_hook)

``LayerwiseDataParallel`` does the same for a layer-wise optimizer, without DDP: each parameter's gradient
window (its projection between refreshes) is averaged across processes inside backward, before it steps::

    optimizer = GaLoreAdamW8bit(groups, lr=1e-3, layerwise=True, accumulation_steps=4)
    LayerwiseDataParallel(optimizer)

Under FSDP2 (``fully_shard``) the optimizers take the sharded parameters as they are; ``kept_dim_placement_fn``
slices each GaLore weight along the dimension its projection keeps, so its steps need no communication::

    fully_shard(model, shard_placement_fn=kept_dim_placement_fn(galore_weights, world_size))
"""

from .fsdp import kept_dim_placement_fn
from .layerwise import LayerwiseDataParallel
from .low_rank import LowRankHookState, low_rank_hook

__all__ = ["LayerwiseDataParallel", "LowRankHookState", "kept_dim_placement_fn", "low_rank_hook"]
