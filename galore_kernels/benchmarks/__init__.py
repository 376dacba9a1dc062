"""Benchmarks behind ``galore-kernels bench``: each module measures rows and prints one table.

Every module has ``measure(settings, device)``, a generator of rows (yielded as they are measured, so a
run cut short keeps what it printed), ``print_table(rows, settings, device)``, and ``SIZES``: the
settings for a "full", "quick" and "smoke" run. :mod:`.harness` holds what they share: the shapes, the
gradient, :class:`~.harness.Case` (one row's call), the one timer :func:`~.harness.seconds_per_call` and
its clock, and the environment line (date, device and versions) every table starts with.

- :mod:`.refresh`: projector refresh, exact SVD vs randomized (time, captured energy).
- :mod:`.step`: one optimizer step, our reference vs galore-torch.
- :mod:`.layerwise`: layer-wise mode, peak full gradients alive and step time.
- :mod:`.gpu`: the GPU table: fused kernels vs reference, galore-torch, bitsandbytes, roofline floor.

The measured numbers are in bench/RESULTS.md of the source tree. bench/ also holds pytest-benchmark rows
of the refresh, step and gpu tables: the same cases (``refresh.cases``, ``step.cases``,
``gpu.step_cases``), timed with the same clock and :class:`~.harness.Timing`.
"""
