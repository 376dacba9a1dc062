"""Readable parametrize ids: ``ids=case_id`` names a case by its values instead of pytest's ``shape0``,
``dtype1`` or ``kwargs3``; :func:`named_by_inputs` names an error case by what it passes, not by the
message it expects."""

import pytest
import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def case_id(value):
    """(67, 300) → "67x300", torch.bfloat16 → "bf16", {"rank": 0} → "rank=0", ["--rank", "0"] → "--rank 0";
    any other value gets pytest's own id (None)."""
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES[value]
    if isinstance(value, dict) and value:
        return ",".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, (tuple, list)) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return "x".join(map(str, value))
        if all(isinstance(item, str) for item in value):
            return " ".join(value)
    return None


def named_by_inputs(cases, inputs=1):
    """``cases`` as pytest.params whose id is made of their first ``inputs`` values only."""
    return [
        pytest.param(*case, id="-".join(case_id(value) or str(value) for value in case[:inputs]))
        for case in cases
    ]
