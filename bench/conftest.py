"""bench/ holds pytest-benchmark files only: not default tests (pyproject's testpaths leave bench/ out).
What they time comes from the package, galore_kernels.benchmarks, which ``galore-kernels bench`` runs."""
