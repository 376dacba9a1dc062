import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton code runs under its interpreter on CPU tensors. The switch is read when Triton's
# own @jit helpers (tl.randn and friends) are decorated, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled (float) or 0xAB-filled (integer) tensors, so an output element
    a kernel forgot to write shows up instead of passing by luck."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 0xAB)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: a run is reproducible whatever else ran first."""
    torch.manual_seed(0)
