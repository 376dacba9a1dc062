"""``python -m galore_kernels``: the ``galore-kernels`` command."""

import sys

from .cli import main

sys.exit(main())
