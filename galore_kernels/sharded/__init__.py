"""GaLore on DTensor parameters (FSDP2's ``fully_shard``): layouts, DTensor state, the sharded step and
the refresh of a sharded gradient (docs/DESIGN.md §10). The optimizers dispatch here by themselves."""

from .layout import ShardLayout, is_sharded, kept_matrix_dim
from .refresh import choose_refresh, gather_refresh_elements, sketch_refresh_elements, sketched_projector
from .state import init_sharded_state
from .step import check_projectable, gradient_norms, sharded_adamw, sharded_galore_step

__all__ = [
    "ShardLayout",
    "is_sharded",
    "kept_matrix_dim",
    "choose_refresh",
    "gather_refresh_elements",
    "sketch_refresh_elements",
    "sketched_projector",
    "init_sharded_state",
    "check_projectable",
    "gradient_norms",
    "sharded_adamw",
    "sharded_galore_step",
]
