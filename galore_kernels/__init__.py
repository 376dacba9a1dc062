"""Triton-accelerated GaLore optimizers: low-rank projected Adam with 8-bit state for LLM training."""

from .native import native_available
from .optim import GaLoreAdamW, GaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "native_available"]
__version__ = "0.1.0"
