"""The training comparison behind ``galore-kernels train``: corpus, runs, report."""
