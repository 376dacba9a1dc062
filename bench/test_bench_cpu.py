"""pytest-benchmark rows of ``galore-kernels bench``'s refresh and step tables (CPU; run: pytest bench
--benchmark-only): the tables' cases, on the first refresh shape, timed as the tables time them
(bench/conftest.py).

Not part of the default test run. Compare rows of one run side by side; absolute times only mean
something on the machine that produced them.
"""

import pytest

from galore_kernels.benchmarks import refresh, step
from galore_kernels.benchmarks.harness import REFRESH_SHAPES, power_law_gradient

M, N, RANK = REFRESH_SHAPES[0]  # 1024×2816, rank 128: also a step table shape


@pytest.mark.parametrize("case", refresh.cases(M, N, RANK), ids=lambda case: case.name)
def test_refresh(time_case, case):
    time_case(case, power_law_gradient(M, N), refresh.SIZES["full"].timing)


@pytest.mark.parametrize("case", step.cases(M, N, RANK, refresh=False), ids=lambda case: case.name)
def test_steady_step(time_case, case):
    time_case(case, power_law_gradient(M, N), step.SIZES["full"].timing)
