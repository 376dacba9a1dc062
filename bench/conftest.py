"""bench/ holds pytest-benchmark rows only: not default tests (pyproject's testpaths leave bench/ out).

Their cases, clock and timing are the package's (galore_kernels.benchmarks, which ``galore-kernels bench``
runs): pytest-benchmark's timer is the harness's ``synchronized_clock`` (set here, in place of any
--benchmark-timer), and ``time_case`` runs a case as the table's ``seconds_per_call`` does: the warm-up
calls, then one round per batch of back-to-back calls, so that the median column is the table's number.
"""

from collections.abc import Callable

import pytest
import torch

from galore_kernels.benchmarks.harness import Case, Timing, synchronized_clock, warm_up

CLOCK = f"{synchronized_clock.__module__}.{synchronized_clock.__qualname__}"


def pytest_configure(config: pytest.Config) -> None:
    """Every row's timer: the harness's clock (pytest-benchmark reads the option when it configures, after
    this conftest's hook)."""
    config.option.benchmark_timer = CLOCK


@pytest.fixture
def time_case(benchmark) -> Callable[[Case, torch.Tensor, Timing], None]:
    """``time_case(case, gradient, timing)``: prepare the case around ``gradient`` and time it with
    ``timing``; a comparator that is not installed skips the row."""

    def run(case: Case, gradient: torch.Tensor, timing: Timing) -> None:
        try:
            call = case.prepare(gradient)
        except ImportError as missing:
            pytest.skip(f"{missing.name or case.name} is not installed")
        warm_up(call, timing)
        benchmark.group = case.group
        benchmark.pedantic(call, rounds=timing.batches, iterations=timing.calls)

    return run
