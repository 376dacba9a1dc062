"""Facts about how kernels run that launchers need: the interpreter, and dtype choices for tl.dot."""

from __future__ import annotations

import contextlib
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


def dot_precision(*dtypes: torch.dtype) -> str:
    """tl.dot's input_precision: "tf32x3" when fp32 operands reach the product, "tf32" (unused) otherwise.

    Plain tf32 keeps 10 mantissa bits of each fp32 operand: S and the 8-bit absmax built from it would sit
    ~1e-4 from the fp32 reference, beyond the 1e-6 absmax tolerance of docs/DESIGN.md §7. tf32x3 splits each
    operand into a tf32 head and tail and keeps fp32 accuracy on the tensor cores, at three MMAs instead
    of one; 16-bit operands are exact in one MMA.
    """
    return "tf32x3" if torch.float32 in dtypes else "tf32"


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's GPU current for a launch: Triton launches on the current device, which is not
    the tensor's when one process drives several GPUs (a model split with device_map="auto")."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
