"""Where a warning should point: the user's line, not this package's or torch's internals."""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that points at the
    first frame outside this package and torch: the user's line that called step() or backward().

    >>> user_stacklevel() >= 1
    True
    """
    package = __name__.split(".")[0]
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in (package, "torch"):
            return level
        level, frame = level + 1, frame.f_back
    return 1
