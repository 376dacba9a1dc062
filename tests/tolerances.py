"""The one tolerance table of DESIGN §7, and the relative-error measure every test uses."""

from __future__ import annotations

import torch

# ‖out − ref‖ / ‖ref‖ against a float64 reference.
FP32_INTERPRETER = 1e-5
FP32_TF32_GPU = 3e-4
BF16_OPERANDS = 1e-2
ABSMAX_8BIT = 1e-6
# galore-torch parity with svd="exact" and weight_decay=0 (issue 2): parameters after 20 steps.
GALORE_TORCH_PARITY = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf so that it never passes."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff
