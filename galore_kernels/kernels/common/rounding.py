"""@triton.jit store-side rounding: fp32 → the destination dtype, round-to-nearest-even everywhere.

The GPU's cvt.rn.bf16.f32 rounds to nearest even; Triton 3.9's interpreter truncates fp32 → bf16 (half
the elements of a random vector land one ulp low, which drifts a bf16 weight by 0.4% per step), so under
the interpreter bf16 is rounded by hand with the same rule. fp16 converts correctly in both.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr):
    """x (fp32) converted to ``dtype`` with round-to-nearest-even."""
    if SOFTWARE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
