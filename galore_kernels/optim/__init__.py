"""``torch.optim`` classes: argument checks, param groups and state; the math lives in ``functional``."""

from .galore_adamw import GaLoreAdamW, GaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit"]
