"""The global gradient norm of each optimizer step, gathered parameter by parameter, and layer-wise clipping."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GradNorm"]


class GradNorm:
    """Σ‖g‖² of the step in progress; at :meth:`finish`, the norms of the step just completed.

    ``last`` is the norm over every gradient of the step, NaN or Inf included (what a log should show);
    ``applied`` is the norm over the gradients the step did apply, which is what clipping scales by: a
    skipped Inf gradient must neither zero the next step (c / inf) nor switch clipping off (c / NaN).

    >>> norms = GradNorm(); norms.add(9.0, 9.0); norms.add(16.0, 16.0); norms.finish()
    >>> norms.last, norms.clip_coef(max_norm=1.0) < 0.2
    (5.0, True)
    """

    def __init__(self) -> None:
        self.last: float | None = None
        self.applied: float | None = None
        self._sq = 0.0
        self._applied_sq = 0.0
        self._count = 0

    def add(self, norm_sq: float, applied_sq: float, count: int = 1) -> None:
        """Add ``count`` gradients' Σ‖g‖², and the part of it from gradients the step applies."""
        self._sq += norm_sq
        self._applied_sq += applied_sq
        self._count += count

    def discard(self) -> None:
        """Forget the step in progress (it was abandoned by an exception)."""
        self._sq, self._applied_sq, self._count = 0.0, 0.0, 0

    def finish(self) -> None:
        """Close the step: its norms become ``last`` and ``applied`` (unchanged when no gradient came)."""
        if self._count:
            self.last, self.applied = math.sqrt(self._sq), math.sqrt(self._applied_sq)
        self.discard()

    def clip_coef(self, max_norm: float | None) -> float:
        """min(1, max_norm / (‖g_{t−1}‖ + 1e-6)) from the previous step's applied norm; 1 before any step."""
        if max_norm is None or self.applied is None:
            return 1.0
        return min(1.0, max_norm / (self.applied + 1e-6))

    def state_dict(self) -> dict[str, Any]:
        return {"last_grad_norm": self.last, "applied_grad_norm": self.applied}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.last = saved.get("last_grad_norm")
        self.applied = saved.get("applied_grad_norm", self.last)
        self.discard()
