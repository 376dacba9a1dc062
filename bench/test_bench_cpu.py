"""pytest-benchmark versions of the refresh and step rows of ``galore-kernels bench`` (CPU; run:
pytest bench --benchmark-only).

Not part of the default test run. Compare rows of one run side by side; absolute times only mean
something on the machine that produced them.
"""

import warnings

import pytest
import torch

from galore_kernels import GaLoreAdamW
from galore_kernels.benchmarks.cases import power_law_gradient
from galore_kernels.projector import compute_projector

SHAPE, RANK = (1024, 2816), 128


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_refresh(benchmark, method):
    g = power_law_gradient(*SHAPE)
    benchmark.group = f"refresh {SHAPE[0]}x{SHAPE[1]} r={RANK}"
    benchmark(compute_projector, g, RANK, "left", method=method, seed=1)


@pytest.mark.parametrize("impl", ["galore-torch", "ours"])
def test_steady_step(benchmark, impl):
    weight = torch.nn.Parameter(torch.randn(*SHAPE))
    weight.grad = power_law_gradient(*SHAPE)
    group = {"params": [weight], "rank": RANK, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    if impl == "galore-torch":
        galore_torch = pytest.importorskip("galore_torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            opt = galore_torch.GaLoreAdamW([group], lr=1e-3)
    else:
        opt = GaLoreAdamW([group], lr=1e-3)
    opt.step()
    benchmark.group = f"steady step {SHAPE[0]}x{SHAPE[1]} r={RANK}"
    benchmark(opt.step)
