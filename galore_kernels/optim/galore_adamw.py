"""GaLoreAdamW and GaLoreAdamW8bit: argument checks, param groups, lazy state; the math is in functional."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from .. import functional, reference
from ..callers import user_stacklevel
from ..config import AdamHyper, GaLoreConfig
from ..projector import resolve_side
from ..sharded import (
    ShardLayout, check_projectable, gradient_norms, init_sharded_state, is_sharded, sharded_adamw,
    sharded_galore_step,
)
from ..state import init_state, is_projected, matrix_shape
from .checks import NONFINITE_MODES, check_group, check_hyper, check_layerwise
from .grad_norm import GradNorm
from .layerwise import AccumulationWindow, LayerwiseHooks

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
# A gradient whose norm reaches this is skipped like a NaN one: (2^63)² = 2^126 is still a normal fp32, so
# below it the second moment of any projected entry stays finite.
_SKIP_NORM_THRESHOLD = 2.0**63


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments for GaLore parameters live in a rank-r subspace (fp32 moments).

    Param groups take galore-torch's keys: a group with ``rank`` (and optionally ``update_proj_gap``=200,
    ``scale``=0.25, ``proj_type``="std", plus ``svd``="randomized"|"exact", ``svd_oversample``=8,
    ``svd_power_iters``=2; defaults in :class:`galore_kernels.config.GaLoreConfig`) projects its ≥2-D
    parameters; other groups and 1-D parameters get AdamW.

    Example::

        galore = [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]
        rest = [p for p in model.parameters() if all(p is not q for q in galore)]
        optimizer = GaLoreAdamW(
            [{"params": rest}, {"params": galore, "rank": 128, "update_proj_gap": 200, "scale": 0.25}],
            lr=1e-3,
        )
        loss.backward(); optimizer.step(); optimizer.zero_grad()

    A gradient holding NaN or Inf (or with a norm of at least 2^63, past which Adam's second moment could
    overflow fp32) skips that parameter's step (weights, moments and projector untouched),
    counts it in ``state[p]["nonfinite_skips"]`` and warns once; ``nonfinite="raise"`` raises instead.

    Layer-wise (``layerwise=True``) each parameter steps inside backward as soon as its gradient is
    ready, and the gradient is freed at once. ``accumulation_steps=k`` steps on every k-th backward pass,
    summing projected gradients in a low-rank fp32 buffer between (full gradients only in the window of
    a parameter's refresh step). ``refresh_schedule="spread"`` staggers parameters' refresh steps over the
    T-step window. ``max_grad_norm`` clips each step's gradients by min(1, max_grad_norm / ‖g_{t−1}‖),
    the previous step's global norm (the current one is only known once backward ends).
    ``last_grad_norm`` holds the global norm of the latest step's gradients in both modes; layer-wise
    with k > 1, a parameter whose window summed projections contributes the norm of that projected sum.
    Call ``step()`` once per optimizer step either way; it closes the step. Example::

        optimizer = GaLoreAdamW(groups, lr=1e-3, layerwise=True, accumulation_steps=4)
        for i, batch in enumerate(loader):
            model(**batch).loss.backward()  # parameters step inside every 4th backward
            if (i + 1) % 4 == 0:
                optimizer.step()
                scheduler.step()
    """

    # Moments of at least this many elements are 8-bit; None keeps every moment in fp32.
    min_8bit_size: int | None = None

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        backend: str = "auto",
        nonfinite: str = "skip",
        seed: int = 0,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        refresh_schedule: str = "aligned",
        max_grad_norm: float | None = None,
    ) -> None:
        check_hyper(lr, betas, eps, weight_decay)
        functional.check_backend(backend)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        check_layerwise(layerwise, accumulation_steps, refresh_schedule, max_grad_norm)
        self.backend = backend
        self.nonfinite = nonfinite
        self.seed = seed
        self.refresh_schedule = refresh_schedule
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._grad_norm = GradNorm()
        self._stepped_in_backward: set[int] = set()  # ids of parameters a hook stepped since the last step()
        self._warned_nonfinite = False
        self._consecutive_skips: dict[int, int] = {}  # id(param) → steps skipped in a row
        # id(group) → the (rank, proj_type) its parameters' state was last checked against.
        self._checked_layouts: dict[int, tuple[Any, ...]] = {}
        self._groups_checked_in_backward: set[int] = set()  # ids of groups a hook checked since the last step()
        # param → its projected gradient S, already averaged over processes by galore_kernels.distributed's
        # DDP comm hook; step() steps such a parameter from S (its .grad holds zeros).
        self._reduced_projections: dict[torch.Tensor, torch.Tensor] = {}
        # (ids of the groups it was built from, id(param) → group), for projection_to_communicate.
        self._group_index: tuple[tuple[int, ...], dict[int, dict[str, Any]]] = ((), {})
        self._hooks = (
            LayerwiseHooks(accumulation_steps, backend, self._prepare, self._close_window, _check_grad)
            if layerwise
            else None
        )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        try:
            super().__init__(params, defaults)
        except Exception:
            if self._hooks is not None:  # hooks of the groups added before the bad one must not outlive us
                self._hooks.detach()
            raise

    @property
    def last_grad_norm(self) -> float | None:
        """Global L2 norm of the latest step's gradients (NaN/Inf included); None before the first step.

        Layer-wise with ``accumulation_steps > 1``, a projected weight whose window summed projections
        contributes the norm of that projected sum: the full sum is never formed (it is at most the full norm).
        """
        return self._grad_norm.last

    @property
    def layerwise(self) -> bool:
        """Whether parameters step inside backward (until :meth:`detach_hooks`)."""
        return self._hooks is not None

    @property
    def layerwise_hooks(self) -> LayerwiseHooks | None:
        """The layer-wise hooks and their open windows; None when not layer-wise. This is where
        :class:`galore_kernels.distributed.LayerwiseDataParallel` attaches to average gradients across
        processes."""
        return self._hooks

    @property
    def accumulation_steps(self) -> int:
        """Backward passes per layer-wise step (1 when not layer-wise)."""
        return 1 if self._hooks is None else self._hooks.accumulation_steps

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1])
            _check_sharded(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        if self._hooks is not None:
            try:
                self._hooks.attach(self.param_groups[-1])
            except RuntimeError:
                self.param_groups.pop()
                raise

    def detach_hooks(self) -> None:
        """Remove the layer-wise hooks; from then on ``step()`` steps every parameter as usual.

        Raises ``RuntimeError`` in the middle of an accumulation window (call ``step()`` first). Clipping
        by ``max_grad_norm`` is layer-wise only: it stops, with a warning.
        """
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None
            if self.max_grad_norm is not None:
                warnings.warn(
                    "detach_hooks(): max_grad_norm clipping is off from now on; clip with "
                    "torch.nn.utils.clip_grad_norm_ before step()",
                    UserWarning,
                    stacklevel=2,
                )
                self.max_grad_norm = None

    def sync_layerwise_hooks(self) -> None:
        """Hook the parameters the param groups hold now, after something replaced them in place.

        Accelerate's FSDP2 ``accelerator.prepare(model, optimizer)`` swaps each parameter in the groups for
        its sharded replacement once the optimizer exists; call this right after it, so the first backward
        pass already steps layer-wise (:class:`~galore_kernels.integrations.transformers.GaLoreTrainer` does).
        The hooks on the replaced parameters are removed, which releases them. ``step()`` does the same, with
        a warning, for parameters it finds unhooked. Raises ``ValueError`` for a new parameter the optimizer
        cannot step (see the sharding limits in docs/distributed.md); does nothing when not layer-wise.

        Example::

            model, optimizer = accelerator.prepare(model, optimizer)
            optimizer.sync_layerwise_hooks()
        """
        if self._hooks is None:
            return
        for group in self.param_groups:
            self._check_group_edits(group)
        self._hooks.sync(self.param_groups)

    def accumulation_bytes(self) -> tuple[int, int]:
        """Bytes of (full, low-rank) gradient sums held by open layer-wise accumulation windows."""
        return (0, 0) if self._hooks is None else self._hooks.held_bytes()

    def _init_missing_state(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        missing = [(group, p) for group, p in work if not self.state[p]]
        if not missing:
            return
        # A parameter's sketch seed comes from its position over all groups: stable across reruns and
        # checkpoint resumes, and distinct between parameters.
        position = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        # "spread": the j-th of n projected parameters refreshes at steps ≡ j·T/n (mod T), so a refresh
        # step recomputes ~n/T projectors instead of all n (and, layer-wise with accumulation, only those
        # hold a full gradient through the window).
        projected = [id(p) for g in self.param_groups for p in g["params"] if is_projected(p, g)]
        rank_among_projected = {pid: j for j, pid in enumerate(projected)}
        for group, p in missing:
            param_seed = (self.seed * 0x9E3779B1 + position[id(p)]) & 0xFFFFFFFF
            offset = 0
            if self.refresh_schedule == "spread" and is_projected(p, group):
                offset = rank_among_projected[id(p)] * group["update_proj_gap"] // len(projected)
            init = init_sharded_state if is_sharded(p) else init_state
            self.state[p].update(
                init(p, group, param_seed=param_seed, min_8bit_size=self.min_8bit_size, refresh_offset=offset)
            )

    def _prepare(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
        if id(group) not in self._groups_checked_in_backward:  # once per group and step, not per hook
            self._check_group_edits(group)
            self._groups_checked_in_backward.add(id(group))
        self._init_missing_state([(group, param)])
        return self.state[param]

    def _close_window(self, group: dict[str, Any], param: torch.Tensor, window: AccumulationWindow) -> None:
        """Step ``param`` from a layer-wise window: admit, record and clip its summed gradient, then step."""
        if id(param) in self._stepped_in_backward:
            raise self._second_step_error(param)
        self._stepped_in_backward.add(id(param))  # a skipped window counts too: it closed
        from_projection = window.full_sum is None
        grad = window.projected_sum if from_projection else window.full_sum
        (admitted,) = self._admit([(param, grad)], inside_backward=True)
        if not admitted:
            self._skip_nonfinite(param)
            return
        self._apply(group, [(param, grad)], from_projection=from_projection)

    def _second_step_error(self, param: torch.Tensor) -> RuntimeError:
        return RuntimeError(
            f"a parameter of shape {tuple(param.shape)} would step a second time since the last "
            f"optimizer.step(): layer-wise mode steps each parameter once every accumulation_steps="
            f"{self.accumulation_steps} backward passes, and step() must be called once per optimizer step. "
            "If the loop accumulates gradients over k micro-batches, build the optimizer with "
            "accumulation_steps=k; otherwise call optimizer.step() after each step's backward passes. (Reentrant "
            "activation checkpointing of a weight shared across segments also fires its hook once per segment.)"
        )

    def _admit(self, gradients: list[tuple[torch.Tensor, torch.Tensor]], *, inside_backward: bool) -> list[bool]:
        """Which (parameter, gradient) pairs can be stepped on; records their norms. One host sync in all.

        A gradient is refused when it holds NaN or Inf, or when its norm reaches 2^63: past that, its
        projection squared can overflow fp32 in Adam's second moment (and the refresh's products), which
        would poison the state as surely as a NaN. One fp32 norm per gradient decides both. With
        ``nonfinite="raise"`` a refused gradient raises here, before any state or weight changes.
        """
        if not gradients:
            return []
        device = gradients[0][1].device
        # float64 gradients keep their precision in the norm; past fp32's range a norm is refused anyway. A
        # DTensor's norm is over all its slices, so every process admits or skips it alike.
        norms = torch.stack([norm.to(device) for norm in gradient_norms([g for _, g in gradients])]).tolist()
        admitted = [norm < _SKIP_NORM_THRESHOLD for norm in norms]  # NaN compares False
        if self.nonfinite == "raise" and not all(admitted):
            self._grad_norm.discard()
            message = _nonfinite_message(gradients[admitted.index(False)][0])
            raise RuntimeError(message + (_LAYERWISE_RAISE if inside_backward else ""))
        squares = [norm * norm for norm in norms]
        self._grad_norm.add(sum(squares), sum(sq for sq, ok in zip(squares, admitted) if ok), len(gradients))
        return admitted

    def _apply(
        self, group: dict[str, Any], gradients: list[tuple[torch.Tensor, torch.Tensor]], *, from_projection: bool
    ) -> None:
        """Step admitted (parameter, gradient) pairs of one group: the one dispatch of both modes.

        Gradients are clipped first (layer-wise ``max_grad_norm``). Plain parameters take one multi-tensor
        AdamW call; projected ones step one by one, from their full gradient, or, with
        ``from_projection``, from the projected sum S of a layer-wise window.
        """
        if not gradients:
            return
        coef = self._grad_norm.clip_coef(self.max_grad_norm)  # 1 unless layer-wise clipping is on
        if coef < 1.0:
            for _, grad in gradients:
                grad.mul_(coef)
        for param, _ in gradients:
            self._consecutive_skips.pop(id(param), None)
        hyper = AdamHyper.from_group(group)
        for param, grad in gradients:
            if is_sharded(param):
                self._apply_sharded(group, param, grad, hyper, from_projection=from_projection)
        gradients = [(p, g) for p, g in gradients if not is_sharded(p)]
        plain = [(p, g) for p, g in gradients if not is_projected(p, group)]
        functional.adamw(
            [p for p, _ in plain], [g for _, g in plain], [self.state[p] for p, _ in plain], hyper,
            backend=self.backend,
        )
        projected = [(p, g) for p, g in gradients if is_projected(p, group)]
        if projected:
            config = GaLoreConfig.from_group(group)
            step = functional.galore_adamw_step_from_projection if from_projection else functional.galore_adamw_step
            for param, grad in projected:
                step(param, grad, self.state[param], hyper, config, backend=self.backend)

    def _apply_sharded(
        self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, hyper: AdamHyper, *, from_projection: bool
    ) -> None:
        """Step one DTensor parameter (FSDP2) on its local slice: :mod:`galore_kernels.sharded`."""
        if from_projection:  # windows of DTensor parameters sum their gradient slices, never projections
            raise AssertionError("a DTensor parameter cannot step from a projected sum")
        if is_projected(param, group):
            config = GaLoreConfig.from_group(group)
            sharded_galore_step(param, grad, self.state[param], hyper, config, backend=self.backend)
        else:
            sharded_adamw(param, grad, self.state[param], hyper, backend=self.backend)

    def _skip_nonfinite(self, param: torch.Tensor) -> None:
        """Count a skipped step. Warn at the first skip of this optimizer, and again whenever one parameter
        has skipped 10, 100, 1000, … steps in a row: a gradient that is non-finite at every step is a
        broken run, not a spike."""
        self.state[param]["nonfinite_skips"] += 1
        in_a_row = self._consecutive_skips.get(id(param), 0) + 1
        self._consecutive_skips[id(param)] = in_a_row
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            message = (
                "a gradient held NaN or Inf (or had a norm of at least 2^63): that parameter's step was "
                "skipped and counted in its state as 'nonfinite_skips' (warned once per optimizer, and again "
                "when a parameter keeps skipping)"
            )
        elif in_a_row >= 10 and math.log10(in_a_row).is_integer():
            message = (
                f"a parameter of shape {tuple(param.shape)} has skipped its last {in_a_row} steps: its gradient "
                "held NaN or Inf (or had a norm of at least 2^63) at every one; check the loss, the learning "
                "rate and any loss scaling"
            )
        else:
            return
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler then hands step() its scale (as attributes) instead of unscaling .grad, which
        # lets a layer-wise optimizer refuse it with a message of its own (see step()).
        return self._hooks is not None

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Layer-wise, parameters have stepped inside backward already; ``step()`` closes the optimizer step:
        it steps parameters whose accumulation window is still open (fewer than ``accumulation_steps``
        backward passes since their last step, e.g. at the end of an epoch) and parameters whose gradient
        was set without a hook firing, then records :attr:`last_grad_norm`. Call it once per step.

        Edits to a param group are checked first: a value the constructor would refuse (a NaN ``lr``, say)
        or a ``rank`` / ``proj_type`` change after its parameters have state raises ``ValueError`` before
        anything changes. Under ``torch.compile`` the step runs eagerly (it is excluded from the graph): it
        is already fused kernels and GEMMs, and its step counts and refresh schedule are host-side numbers
        that would recompile every step.
        """
        if self._hooks is not None and hasattr(self, "found_inf"):  # set by GradScaler.step (see above)
            # GradScaler deletes these only after a step that returns: leave the optimizer usable.
            del self.found_inf
            if hasattr(self, "grad_scale"):
                del self.grad_scale
            self._stepped_in_backward.clear()
            raise RuntimeError(
                "layer-wise mode does not work with torch.amp.GradScaler: parameters step inside backward on "
                "the scaled gradients, before the scaler can unscale them or skip an overflowing step; train "
                "with bf16 autocast (no scaler needed) or use layerwise=False"
            )
        for group in self.param_groups:
            self._check_group_edits(group)
        if self._hooks is not None and self._hooks.sync(self.param_groups):
            warnings.warn(
                "layer-wise optimizer: parameters in param_groups were replaced after it was built (accelerate's "
                "FSDP2 prepare does this), so this step took their gradients from .grad after backward; they step "
                "layer-wise from the next backward pass (call optimizer.sync_layerwise_hooks() right after the "
                "replacement to have the first pass layer-wise too)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self._hooks is not None:
            self._refuse_second_gradients(work)
            # Check every open window before closing any, so that an error leaves no window half-closed.
            again = [p for p in self._hooks.windows if id(p) in self._stepped_in_backward]
            if again:
                raise self._second_step_error(again[0])
            self._hooks.close_all()
        for _, p in work:
            _check_grad(p)
        reduced, self._reduced_projections = self._reduced_projections, {}
        gradients = [reduced.get(p, p.grad) for _, p in work]
        admitted = self._admit(list(zip((p for _, p in work), gradients)), inside_backward=False)
        self._init_missing_state(work)
        for (_, p), ok in zip(work, admitted):
            if not ok:
                self._skip_nonfinite(p)
        for group in self.param_groups:
            members = [(p, g) for (grp, p), g, ok in zip(work, gradients, admitted) if ok and grp is group]
            self._apply(group, [(p, g) for p, g in members if p not in reduced], from_projection=False)
            self._apply(group, [(p, g) for p, g in members if p in reduced], from_projection=True)
        self._grad_norm.finish()
        self._stepped_in_backward.clear()
        self._groups_checked_in_backward.clear()
        return loss

    def projection_to_communicate(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """S = B·G' (fp32) of ``grad`` when ``param``'s next step can take it instead of the full gradient:
        a projected parameter with state whose next step refreshes nothing. None otherwise (no state yet, a
        refresh due, not projected, layer-wise mode): then the full gradient is needed.

        For communication hooks (:mod:`galore_kernels.distributed`): projection is linear, so the mean over
        processes of S equals B·(mean of G), and S is r·k elements where G is m·n.
        """
        group = self._group_of(param)
        state = self.state.get(param)
        if self._hooks is not None or group is None or not state or not is_projected(param, group) or is_sharded(param):
            return None
        config = GaLoreConfig.from_group(group)
        if reference.needs_refresh(state, config.update_proj_gap) or config.proj_type == "full":
            return None
        matrices = grad.reshape(matrix_shape(param, config.experts))
        side = resolve_side(config.proj_type, tuple(matrices.shape[-2:]))
        return functional.project_gradient(state, matrices, side, backend=self.backend)

    def take_reduced_projection(self, param: torch.Tensor, s: torch.Tensor) -> None:
        """Step ``param`` from ``s`` (its averaged :meth:`projection_to_communicate`) at the next step()."""
        self._reduced_projections[param] = s

    def _group_of(self, param: torch.Tensor) -> dict[str, Any] | None:
        # Rebuilt when the groups change (add_param_group, load_state_dict): a hook asks once per parameter.
        key = tuple(id(g) for g in self.param_groups)
        if self._group_index[0] != key:
            self._group_index = (key, {id(p): g for g in self.param_groups for p in g["params"]})
        return self._group_index[1].get(id(param))

    def _check_group_edits(self, group: dict[str, Any]) -> None:
        """Refuse a group edited into values the constructor would refuse, or out of its parameters' state
        layout (``rank``, ``proj_type``, ``rank`` removed or added), before any parameter changes."""
        check_group(group)
        # The parameters are part of the key: accelerate's FSDP2 prepare swaps them for DTensors in place.
        layout = (group.get("rank"), group.get("proj_type"), group.get("experts"), tuple(map(id, group["params"])))
        if self._checked_layouts.get(id(group)) == layout:
            return
        _check_sharded(group)
        for param in group["params"]:
            state = self.state.get(param)
            if state:
                problem = _state_mismatch(state, param, group, self.min_8bit_size)
                if problem is not None:
                    raise ValueError(
                        f"param group with rank={layout[0]!r}, proj_type={layout[1]!r}, experts={layout[2]!r}: a "
                        f"parameter of shape {tuple(param.shape)} has state that does not fit it ({problem}); rank, "
                        "proj_type and experts are fixed once a parameter has state: put parameters that need "
                        "other settings in a new optimizer, or restore the group's values"
                    )
        self._checked_layouts[id(group)] = layout

    def _refuse_second_gradients(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        """A parameter that stepped inside backward must not come with a gradient again in ``step()``."""
        again = [p for _, p in work if id(p) in self._stepped_in_backward]
        if again:
            raise RuntimeError(
                f"{len(again)} parameters (first of shape {tuple(again[0].shape)}) stepped inside backward and have "
                ".grad set again: layer-wise mode does not work with DDP or FSDP1 (they write reduced gradients into "
                ".grad after backward) or with code that sets .grad of hooked parameters; for data parallel training in "
                "layer-wise mode, leave the model unwrapped and use galore_kernels.distributed.LayerwiseDataParallel, "
                "or shard it with FSDP2's fully_shard (it reduces before the hooks run)"
            )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"galore_kernels"``: the last step's gradient norms (clipping uses them).

        Raises ``RuntimeError`` in the middle of a layer-wise accumulation window, whose gradient sums are
        not state and would be lost: save after ``step()``.
        """
        if self._hooks is not None:
            self._hooks.refuse_if_open("save the optimizer state")
        state_dict = super().state_dict()
        state_dict["galore_kernels"] = self._grad_norm.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking it fits, keeping every state tensor's dtype.

        Saved groups are checked like new ones (and galore-torch's get our defaults); each parameter's
        saved state must have the tensors, shapes and dtypes this optimizer would create for it, or a
        ``ValueError`` names the parameter and nothing is changed. ``torch.optim.Optimizer`` casts
        floating-point state to the parameter's dtype, which would turn fp32 moments of a bf16
        parameter into bf16; the tensors are restored as saved, moved to the parameter's device.
        """
        # Projected parameters' state from before refresh_offset (0.1.0) or pending_refresh existed had the
        # aligned schedule and no pending refresh.
        state_dict = {
            **state_dict,
            "state": {
                pid: {"refresh_offset": 0, "pending_refresh": 0, **st} if "seed" in st else st
                for pid, st in state_dict["state"].items()
            },
        }
        saved_groups = [dict(g) for g in state_dict["param_groups"]]
        for group in saved_groups:
            check_group(group)
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("loaded state dict has a different number of param groups or group sizes")
        param_of_id = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        group_of_id = {pid: group for group in saved_groups for pid in group["params"]}
        for param_id, saved in state_dict["state"].items():
            if param_id in param_of_id:
                _check_saved_state(param_id, saved, param_of_id[param_id], group_of_id[param_id], self.min_8bit_size)
        if self._hooks is not None:
            self._hooks.refuse_if_open("load an optimizer state")
        super().load_state_dict({"state": state_dict["state"], "param_groups": saved_groups})
        self._grad_norm.load_state_dict(state_dict.get("galore_kernels", {}))
        if self._hooks is not None:
            self._hooks.sync(self.param_groups)  # torch's load_state_dict made new group dicts
        for param_id, saved in state_dict["state"].items():
            if param_id in param_of_id:
                param = param_of_id[param_id]
                self.state[param] = {
                    key: value.to(device=param.device, copy=True) if isinstance(value, torch.Tensor) else value
                    for key, value in saved.items()
                }


def _state_mismatch(
    state: dict[str, Any], param: torch.Tensor, group: dict[str, Any], min_8bit_size: int | None
) -> str | None:
    """What differs between ``state`` and the state init_state would create for ``param`` in ``group``."""
    if is_sharded(param):  # a DTensor's state is DTensors (global shapes), allocated here to compare
        expected = init_sharded_state(param, group, param_seed=0, min_8bit_size=min_8bit_size)
    else:
        expected = init_state(param.to("meta"), group, param_seed=0, min_8bit_size=min_8bit_size)
    if set(state) != set(expected):
        return f"entries {sorted(state)}, expected {sorted(expected)}"
    if state.get("absmax_slices") != expected.get("absmax_slices"):
        return (f"8-bit blocks of {state['absmax_slices']} slices, this run has {expected['absmax_slices']}: "
                "8-bit state of a sharded parameter loads only on the world size that saved it")
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            got = state[key]
            if isinstance(got, torch.Tensor) and is_sharded(got) != is_sharded(value):
                kinds = ("a DTensor", "a plain tensor")
                return (f"{key!r} is {kinds[not is_sharded(got)]}, expected {kinds[not is_sharded(value)]} "
                        "(state of a sharded parameter is DTensors: save and load it with "
                        "torch.distributed.checkpoint's get/set_optimizer_state_dict)")
            if not isinstance(got, torch.Tensor) or got.shape != value.shape or got.dtype != value.dtype:
                found = (tuple(got.shape), got.dtype) if isinstance(got, torch.Tensor) else type(got).__name__
                return f"{key!r} is {found}, expected {(tuple(value.shape), value.dtype)}"
    return None


def _foreign_optimizer(saved: dict[str, Any]) -> str | None:
    """The optimizer a parameter's saved state comes from, when it is recognizably not ours."""
    if "projector" in saved and not isinstance(saved["projector"], torch.Tensor):
        return "galore-torch's GaLoreAdamW (its state holds GaLoreProjector objects)"
    # bitsandbytes' optimizers (and galore-torch's GaLoreAdamW8bit, built on them) keep state1/state2, which
    # their state_dict() packs under one key.
    if "__bnb_optimizer_quant_state__" in saved or {"state1", "state2"} <= set(saved):
        return "a bitsandbytes-style 8-bit optimizer (bitsandbytes' AdamW8bit or galore-torch's GaLoreAdamW8bit)"
    if "nonfinite_skips" not in saved and {"exp_avg", "exp_avg_sq", "step"} <= set(saved):
        return "torch.optim.AdamW or Adam (exp_avg, exp_avg_sq and a step, none of this package's entries)"
    return None


def _check_saved_state(
    param_id: int, saved: dict[str, Any], param: torch.Tensor, group: dict[str, Any], min_8bit_size: int | None
) -> None:
    """Raise ValueError unless ``saved`` has the tensors init_state would create for ``param``, with a
    non-negative step and finite values."""
    where = f"state of parameter {param_id} (shape {tuple(param.shape)})"
    foreign = _foreign_optimizer(saved)
    if foreign is not None:
        raise ValueError(
            f"{where} was saved by {foreign}; GaLore optimizers load only their own state dicts: start this "
            "optimizer from fresh state, or keep using the optimizer that saved it"
        )
    problem = _state_mismatch(saved, param, group, min_8bit_size)
    if problem is not None:
        raise ValueError(f"{where} has {problem}: was it saved by the other optimizer class, or with different "
                         "param groups?")
    for key in ("step", "nonfinite_skips"):
        value = saved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {key!r} must be an int >= 0, got {value!r}")
    for key, value in saved.items():
        local = value.to_local() if is_sharded(value) else value
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(local).all()):
            raise ValueError(f"{where}: {key!r} holds NaN or Inf; a checkpoint with non-finite state cannot resume")


def _check_sharded(group: dict[str, Any]) -> None:
    """Refuse DTensor parameters this group cannot step (a 2-D mesh, a placement or projection sharded
    GaLore does not support), before any state exists."""
    for param in group["params"]:
        if is_sharded(param):
            if is_projected(param, group):
                check_projectable(param, GaLoreConfig.from_group(group))
            else:
                ShardLayout.of(param)


def _check_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError("GaLore optimizers do not support sparse gradients; use dense gradients")
    if grad.is_complex() or param.is_complex():
        raise RuntimeError(
            f"GaLore optimizers support real floating-point parameters only, got {param.dtype} "
            f"parameter with {grad.dtype} gradient"
        )
    if grad.shape != param.shape:
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(param.shape)}")


_LAYERWISE_RAISE = (
    " (layer-wise: raised inside backward; parameters whose hooks ran earlier in it have already stepped)"
)


def _nonfinite_message(param: torch.Tensor) -> str:
    return (
        f"gradient of a parameter of shape {tuple(param.shape)} holds NaN or Inf or has a norm of at least 2^63 "
        "(nonfinite='raise'); pass nonfinite='skip' to skip such steps instead"
    )


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with blockwise 8-bit moments (bitsandbytes' dynamic format, 256-element blocks).

    Moments with fewer than ``min_8bit_size`` elements stay fp32. Param groups and the keyword-only
    ``options`` (backend, nonfinite, seed, layerwise, accumulation_steps, refresh_schedule,
    max_grad_norm) are :class:`GaLoreAdamW`'s; the defaults of ``eps`` and ``weight_decay`` are
    bitsandbytes' AdamW8bit's.

    Example::

        optimizer = GaLoreAdamW8bit(
            [{"params": rest}, {"params": galore, "rank": 128, "update_proj_gap": 200, "scale": 0.25}],
            lr=1e-3,
        )
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        **options: Any,
    ) -> None:
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        super().__init__(params, lr, betas, eps, weight_decay, **options)
