"""pytest-benchmark rows of the GPU table's headline case (``galore_kernels.benchmarks.gpu``; CUDA only:
run with pytest bench --benchmark-only).

Llama-7B MLP weight 4096×11008, rank 512, bf16: the fused step against our reference and galore-torch.
Each call synchronizes so that the timer sees the GPU work.
"""

import warnings

import pytest
import torch

from galore_kernels import functional
from galore_kernels.benchmarks.cases import power_law_gradient
from galore_kernels.reference import AdamHyper, GaLoreConfig
from galore_kernels.state import init_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE, RANK = (4096, 11008), 512


def _synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_galore_step(benchmark, backend):
    g = power_law_gradient(*SHAPE, device="cuda").bfloat16()
    w = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16)
    state = init_state(w, {"rank": RANK, "proj_type": "std"}, param_seed=0, min_8bit_size=4096)
    cfg = GaLoreConfig(RANK, 10**9, 0.25, "std", "randomized", 8, 2)
    hyper = AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0)
    functional.galore_adamw_step(w, g, state, hyper, cfg, backend=backend)
    benchmark.group = "GaLore 8-bit step 4096x11008 r=512 bf16"
    benchmark(_synchronized(lambda: functional.galore_adamw_step(w, g, state, hyper, cfg, backend=backend)))


def test_galore_torch_step(benchmark):
    galore_torch = pytest.importorskip("galore_torch")
    w = torch.nn.Parameter(torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16))
    w.grad = power_law_gradient(*SHAPE, device="cuda").bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt = galore_torch.GaLoreAdamW8bit(
            [{"params": [w], "rank": RANK, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}], lr=1e-3
        )
    opt.step()
    benchmark.group = "GaLore 8-bit step 4096x11008 r=512 bf16"
    benchmark(_synchronized(opt.step))
