"""Facts about how kernels run that launchers need: the interpreter, and dtype choices for tl.dot."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dot(*dtypes: torch.dtype) -> bool:
    """Whether tl.dot operands must be widened to fp32 before the product.

    Mixed dtypes always are. The interpreter's tl.dot mis-reads bf16 operands (products off by 1e10 in
    Triton 3.9), so there 16-bit operands are widened too; widening bf16/fp16 to fp32 is exact and the
    products are accumulated in fp32 either way, so the numbers match the tensor-core path.
    """
    return len(set(dtypes)) > 1 or (interpreting() and dtypes[0] != torch.float32)
