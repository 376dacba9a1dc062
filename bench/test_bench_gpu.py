"""pytest-benchmark rows of the GPU table's headline step rows (``galore_kernels.benchmarks.gpu``; CUDA
only: run with pytest bench --benchmark-only): the table's cases, timed as the table times them
(bench/conftest.py).

Llama-7B MLP weight 4096×11008, rank 512, bf16: the fused step against our reference, galore-torch,
bitsandbytes, torch's fused AdamW and a cuBLAS hybrid.
"""

import pytest
import torch

from galore_kernels.benchmarks import gpu
from galore_kernels.benchmarks.harness import power_law_gradient

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
(M, N), RANK, DTYPE = gpu.SHAPES[1], 512, torch.bfloat16


@pytest.mark.parametrize("case", gpu.step_cases(M, N, RANK, DTYPE, "cuda"), ids=lambda case: case.name)
def test_gpu_step(time_case, case):
    time_case(case, power_law_gradient(M, N, device="cuda").to(DTYPE), gpu.SIZES["full"].step_timing)
