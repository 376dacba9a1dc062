"""Layer-wise updates: each parameter steps inside backward, from a post-accumulate-grad hook.

The hook takes the gradient off ``param.grad`` as soon as autograd has accumulated it, so at most the
gradient of the parameter being processed is alive. With ``accumulation_steps=k`` a parameter steps on
its k-th backward pass; until then its window keeps either

* the sum of its projected gradients, fp32 (r × k), when the window holds no refresh step, or
* the sum of its full gradients, in the gradient's dtype (what ``.grad`` would hold), on the window of
  its refresh step — the refresh needs the summed full gradient — and for parameters without projection.

Summing full gradients here adds them in the order and dtype autograd would, so those windows match a
non-layer-wise run bit for bit; a projected sum B·G₁ + … + B·G_k differs from B·(G₁ + … + G_k) by fp32
rounding only.

On several processes a :class:`GradientReducer` (``galore_kernels.distributed.LayerwiseDataParallel``)
takes over the closing of windows: it averages each window's sum across processes before the parameter
steps. It then wants the projected sum even with k = 1, since S is what crosses the network.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import functional, reference
from .. import projector as proj
from ..sharded import is_sharded
from ..state import is_projected, matrix_shape

__all__ = ["AccumulationWindow", "GradientReducer", "LayerwiseHooks"]

# Parameters hooked by some layer-wise optimizer: a second one would find .grad already taken.
_HOOKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


@dataclass
class AccumulationWindow:
    """One parameter's gradients since its last step: how many, and their sum (full or projected)."""

    count: int = 0
    full_sum: torch.Tensor | None = None
    projected_sum: torch.Tensor | None = None

    def add_full(self, grad: torch.Tensor) -> None:
        self.full_sum = grad if self.full_sum is None else self.full_sum.add_(grad)

    def add_projected(self, s: torch.Tensor) -> None:
        self.projected_sum = s if self.projected_sum is None else self.projected_sum.add_(s)


class GradientReducer(Protocol):
    """What closes windows when several processes train together (see the module docstring)."""

    def gradient_ready(self, param: torch.Tensor) -> None:
        """``param``'s window has taken this backward pass's gradient."""

    def close_open_windows(self) -> None:
        """``optimizer.step()`` was called: close every window still open, on every process alike."""


class LayerwiseHooks:
    """The hooks and open windows of a layer-wise optimizer; ``close`` hands a window to the optimizer.

    ``prepare(group, param)`` returns the parameter's state (created on first use); ``close(group, param,
    window)`` steps the parameter from its window. Both are the optimizer's bound methods, held weakly:
    the parameters' hooks must not keep a deleted optimizer alive and stepping. Once it is gone the hooks
    do nothing (gradients stay in ``.grad``), and the next layer-wise optimizer on those parameters
    removes them.
    """

    def __init__(
        self,
        accumulation_steps: int,
        backend: str,
        prepare: Callable[[dict[str, Any], torch.Tensor], dict[str, Any]],
        close: Callable[[dict[str, Any], torch.Tensor, AccumulationWindow], None],
        check_grad: Callable[[torch.Tensor], None],
    ) -> None:
        self.accumulation_steps = accumulation_steps
        self._backend = backend
        self._prepare = weakref.WeakMethod(prepare)
        self._close = weakref.WeakMethod(close)
        self._check_grad = check_grad
        self._handles: dict[torch.Tensor, Any] = {}
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self.windows: dict[torch.Tensor, AccumulationWindow] = {}
        self.reducer: GradientReducer | None = None  # set by galore_kernels.distributed; None: one process
        self._synced: list[Any] = []  # the groups, then their parameters, that the hooks last followed

    def hooked(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """(group, parameter) of every hooked parameter, in the optimizer's order."""
        return [(group, param) for param, group in self._group_of.items()]

    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The param group a hooked parameter belongs to now."""
        return self._group_of[param]

    def close(self, group: dict[str, Any], param: torch.Tensor, window: AccumulationWindow) -> None:
        """Step ``param`` from ``window`` (the optimizer's ``close``)."""
        close = self._close()
        if close is None:
            raise RuntimeError("the layer-wise optimizer these hooks step for has been deleted")
        close(group, param, window)

    def attach(self, group: dict[str, Any]) -> None:
        """Hook every parameter of ``group`` that requires grad (others step in ``optimizer.step()``)."""
        params = [p for p in group["params"] if p.requires_grad and p not in self._handles]
        for param in params:
            owner = _HOOKED.get(param)
            if owner is not None and not owner.orphaned():
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} already steps in another layer-wise optimizer; "
                    "call detach_hooks() on that one first"
                )
        for param in params:
            if param in _HOOKED:
                _HOOKED[param].detach()  # an orphan's hooks: its optimizer was deleted
            self._group_of[param] = group
            self._handles[param] = param.register_post_accumulate_grad_hook(self._on_grad)
            _HOOKED[param] = self

    def sync(self, param_groups: list[dict[str, Any]]) -> int:
        """Follow the parameters ``param_groups`` hold now, and return how many were newly hooked.

        Hooks point at these group dicts (``load_state_dict`` makes new ones); parameters no longer in any
        group are unhooked and released, and new ones are hooked. Accelerate's FSDP2 ``prepare`` needs this:
        it swaps every parameter in the optimizer's groups for its sharded replacement after the optimizer
        was built, and hooks left on the originals would keep the whole unsharded model alive. ``step()``
        calls it every step: unchanged groups (the same dicts holding the same parameters) return at once.
        """
        # Objects, compared by identity: a swapped-in parameter can reuse a released one's id.
        followed = [*param_groups] + [p for group in param_groups for p in group["params"]]
        if len(followed) == len(self._synced) and all(a is b for a, b in zip(followed, self._synced)):
            return 0
        self._synced = followed
        current = {param for group in param_groups for param in group["params"]}
        gone = [param for param in self._handles if param not in current]
        if any(param in self.windows for param in gone):
            self.refuse_if_open("replace parameters")
        for param in gone:
            self._handles.pop(param).remove()
            if _HOOKED.get(param) is self:
                del _HOOKED[param]
        self._group_of = {p: g for g in param_groups for p in g["params"] if p in self._handles}
        hooked = len(self._handles)
        for group in param_groups:
            self.attach(group)
        return len(self._handles) - hooked

    def orphaned(self) -> bool:
        """Whether the optimizer these hooks step for has been deleted."""
        return self._close() is None

    def detach(self) -> None:
        """Remove every hook (refused while a window is open, unless the optimizer is gone)."""
        if not self.orphaned():
            self.refuse_if_open("detach the hooks")
        for param, handle in self._handles.items():
            handle.remove()
            if _HOOKED.get(param) is self:
                del _HOOKED[param]
        self._handles.clear()
        self._group_of.clear()
        self._synced = []

    def refuse_if_open(self, action: str) -> None:
        """Raise when a window is open: its gradients live only here and would be lost."""
        if self.windows:
            count = next(iter(self.windows.values())).count
            raise RuntimeError(
                f"cannot {action} in the middle of an accumulation window ({len(self.windows)} parameters hold "
                f"gradients of {count} of {self.accumulation_steps} backward passes); call optimizer.step() first"
            )

    def close_all(self) -> None:
        """Step every parameter whose window is open (it got fewer than k gradients since its last step)."""
        if self.reducer is not None:
            self.reducer.close_open_windows()
            return
        close = self._close()
        for param in list(self.windows):
            close(self._group_of[param], param, self.windows.pop(param))

    def held_bytes(self) -> tuple[int, int]:
        """Bytes of (full, projected) gradient sums held in open windows right now."""
        def held(tensors: list[torch.Tensor | None]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        windows = self.windows.values()
        return held([w.full_sum for w in windows]), held([w.projected_sum for w in windows])

    @torch.no_grad()
    def _on_grad(self, param: torch.Tensor) -> None:
        prepare, close = self._prepare(), self._close()
        if prepare is None or close is None:
            return  # orphaned (see the class docstring); removing hooks from inside one is not safe
        group = self._group_of[param]
        self._check_grad(param)
        grad, param.grad = param.grad, None
        state = prepare(group, param)
        window = self.windows.setdefault(param, AccumulationWindow())
        window.count += 1
        if self.keeps_full_gradient(group, param, state):
            window.add_full(grad)
        else:
            g = grad.reshape(matrix_shape(param, group.get("experts", False)))
            side = proj.resolve_side(group["proj_type"], tuple(g.shape[-2:]))
            window.add_projected(functional.project_gradient(state, g, side, backend=self._backend))
        del grad  # the full gradient is released here, before the step
        if self.reducer is not None:
            self.reducer.gradient_ready(param)
        elif window.count == self.accumulation_steps:
            close(group, param, self.windows.pop(param))

    def keeps_full_gradient(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any]) -> bool:
        """Whether ``param``'s window sums full gradients (else projected ones), decided by its state."""
        if not is_projected(param, group) or (self.accumulation_steps == 1 and self.reducer is None):
            return True  # nothing to project into, or nothing to sum or send (one process, k = 1)
        if is_sharded(param):  # a DTensor (FSDP2) sums its gradient slice, 1/P of the weight (docs/DESIGN.md §10)
            return True
        return reference.needs_refresh(state, group["update_proj_gap"])  # per hook: no config object built
