"""Data-parallel training on torch.distributed: what crosses the network between processes.

``low_rank_hook`` is a DDP communication hook: between a projected weight's refreshes it all-reduces the
projection S = B·G' (r × k, fp32) instead of the gradient G (m × n)::

    from torch.nn.parallel import DistributedDataParallel
    from galore_kernels.distributed import LowRankHookState, low_rank_hook

    model = DistributedDataParallel(model)
    optimizer = GaLoreAdamW8bit(groups, lr=1e-3)
    model.register_comm_hook(LowRankHookState(optimizer), low_rank_hook)
"""

from .low_rank import LowRankHookState, low_rank_hook

__all__ = ["LowRankHookState", "low_rank_hook"]
