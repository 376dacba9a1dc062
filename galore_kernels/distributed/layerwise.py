"""Layer-wise GaLore on several processes: each parameter's gradient window is averaged across processes
inside backward, then the parameter steps; no DDP wrapper.

Why no DDP: DDP all-reduces ``.grad`` from buckets that hold every gradient of the model until backward
ends, after the post-accumulate-grad hooks layer-wise mode steps from. Stepping under DDP would use the
local gradient, and its buckets would hold the full set of gradients that layer-wise mode exists not to
hold. Here a parameter's window is sent as soon as its last gradient of the window has arrived, and the
parameter steps when the average comes back, while backward goes on.

The protocol keeps the same sequence of collectives on every process:

1. **One order.** Parameters are sent in a fixed order, the same on every process whatever order their
   hooks fire in. The first window uses the optimizer's order reversed (backward visits layers last to
   first). From the second window on, the order is the one process 0's hooks fired in during the first
   window. A gradient that arrives before its turn waits in its window.
2. **Agreement first.** Before the first data collective of a window, the processes all-gather a record on
   a separate gloo group: window number, backward passes, number of parameters, elements to send and a
   checksum of the plan (each parameter's position and payload shape). If the records differ, every process raises the same
   ``RuntimeError`` before any data moves. Without it, gloo aborts the process on a size mismatch, and two
   parameters of equal size would silently average into each other.
3. **One all-reduce per parameter**, fp32 (float64 for float64 parameters). It carries the window's
   projected sum S (r × k) between refreshes, or its full sum in a refresh window and for unprojected
   parameters, divided by the world size, plus one element that counts the processes that had a gradient.
   A parameter no process had a gradient for does not step. One that only some processes had steps on
   their sum divided by the world size, as DDP with ``find_unused_parameters=True`` does.
4. **Overlap.** Collectives are asynchronous. A finished one steps its parameter at the next hook. At most
   ``max_inflight_bytes`` are in flight at once: beyond that a hook first waits for the oldest one. At the
   end of the window's last backward pass (an autograd callback) the rest are sent and waited for.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..optim import GaLoreAdamW
from ..optim.layerwise import AccumulationWindow
from ..projector import resolve_side
from ..state import matrix_shape

__all__ = ["LayerwiseDataParallel"]

# DDP's default bucket is 25 MiB; two to three such sends in flight keep the network busy while backward
# computes the next layers. A single larger tensor is still sent: it just waits for the others first.
DEFAULT_INFLIGHT_BYTES = 64 * 2**20


@dataclass
class _Send:
    """One parameter's all-reduce in flight: payload (shape ``shape``) and, last, the count of processes
    that had a gradient."""

    param: torch.Tensor
    buffer: torch.Tensor
    shape: torch.Size
    projected: bool
    work: Any


class LayerwiseDataParallel:
    """Data parallel training for a layer-wise GaLore optimizer. Every process averages each parameter's
    gradient window with the others inside backward, before that parameter steps. Between refreshes only
    the projection S crosses the network.

    Build it on every process after ``torch.distributed.init_process_group``, with the same model and
    optimizer everywhere. Do not wrap the model in DDP. Construction is collective: it creates a gloo
    group for the agreement records and broadcasts every parameter from the group's first process, as DDP
    does. The training loop is unchanged; ``optimizer.step()`` still closes each step.

    ``elements_reduced`` counts the elements all-reduced since it was last reset (for reports and tests).
    ``control_timeout`` bounds the wait for the other processes' agreement records (the process group's
    default when None). A process that stops, or runs more optimizer steps than the others, then fails
    with a ``RuntimeError`` instead of hanging.

    Example::

        dist.init_process_group("nccl")
        optimizer = GaLoreAdamW8bit(groups, lr=1e-3, layerwise=True, accumulation_steps=4)
        LayerwiseDataParallel(optimizer)
        for i, batch in enumerate(loader):  # each process its own shard of the data
            model(**batch).loss.backward()
            if (i + 1) % 4 == 0:
                optimizer.step()
    """

    def __init__(
        self,
        optimizer: GaLoreAdamW,
        process_group: dist.ProcessGroup | None = None,
        *,
        max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
        control_timeout: timedelta | None = None,
    ) -> None:
        hooks = optimizer.layerwise_hooks if isinstance(optimizer, GaLoreAdamW) else None
        if hooks is None:
            raise ValueError(
                f"LayerwiseDataParallel needs a GaLore optimizer built with layerwise=True, got {type(optimizer).__name__}"
                f"{'' if not isinstance(optimizer, GaLoreAdamW) else ' with layerwise=False'}; without layer-wise "
                "mode, wrap the model in DistributedDataParallel (optionally with galore_kernels.distributed."
                "low_rank_hook)"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("LayerwiseDataParallel needs torch.distributed: call init_process_group first")
        if isinstance(max_inflight_bytes, bool) or not isinstance(max_inflight_bytes, int) or max_inflight_bytes < 0:
            raise ValueError(f"max_inflight_bytes must be an int >= 0, got {max_inflight_bytes!r}")
        if hooks.reducer is not None:
            raise RuntimeError("this optimizer already has a LayerwiseDataParallel")
        hooks.refuse_if_open("attach LayerwiseDataParallel")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.max_inflight_bytes = max_inflight_bytes
        self.elements_reduced = 0
        ranks = dist.get_process_group_ranks(self.process_group)
        self._source = ranks[0]
        self._control = dist.new_group(ranks, backend="gloo", timeout=control_timeout)
        self._optimizer = optimizer
        self._hooks = hooks
        hooked = [param for _, param in hooks.hooked()]
        self._position = {param: i for i, param in enumerate(hooked)}
        self._order = hooked[::-1]
        self._arrivals: list[int] = []  # positions in hook order during the first window (process 0's is kept)
        self._window = 0
        self._inflight: deque[_Send] = deque()
        self._inflight_bytes = 0
        self._start_window()
        self._agree_on_parameters(hooked)
        with torch.no_grad():
            for param in hooked:
                dist.broadcast(param, src=self._source, group=self.process_group)
        hooks.reducer = self

    def _start_window(self) -> None:
        self._passes = 0  # backward passes ended in this window
        self._agreed = False
        self._finished = False
        self._next = 0  # index in self._order of the next parameter to send
        self._ready: set[torch.Tensor] = set()  # parameters whose window took its last gradient
        self._plan: dict[torch.Tensor, tuple[bool, torch.Size]] = {}
        self._callback_queued = False

    # The GradientReducer protocol (galore_kernels.optim.layerwise).

    def gradient_ready(self, param: torch.Tensor) -> None:
        """A hook accumulated ``param``'s gradient: in the window's last pass, send what is due."""
        if param not in self._position:
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} was added to the optimizer after LayerwiseDataParallel "
                "was built; add every param group first"
            )
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        steps = self._hooks.accumulation_steps
        if self._finished:
            raise RuntimeError(
                f"a backward pass after the {steps} of this optimizer step (accumulation_steps={steps}) and before "
                "optimizer.step(): call step() once every accumulation_steps backward passes"
            )
        if self._passes + 1 < steps:
            return  # an earlier pass of the window: the gradient stays in the local sum
        self._agree(self._passes + 1)
        if param in self._ready:
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} got a second gradient in one backward pass "
                "(reentrant activation checkpointing of a shared weight fires its hook once per segment); "
                "layer-wise data parallel training needs one gradient per parameter and pass"
            )
        self._ready.add(param)
        if self._window == 0:
            self._arrivals.append(self._position[param])
        self._complete(block=False)
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            self._send(self._order[self._next])
            self._next += 1

    def close_open_windows(self) -> None:
        """``optimizer.step()``: finish this optimizer step's window (all processes alike) and start the next."""
        if not self._finished:
            self._finish()
        self._window += 1
        self._start_window()

    # The window's life.

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._passes += 1
        if self._agreed and not self._finished:  # this was the window's last pass
            self._finish()

    def _finish(self) -> None:
        """Send every parameter not sent yet (zeros where this process had no gradient) and step them all."""
        self._agree(self._passes)
        if self._passes > 0:  # every process agreed on the count: with none, nothing was accumulated anywhere
            while self._next < len(self._order):
                self._send(self._order[self._next])
                self._next += 1
        self._complete(block=True)
        self._finished = True
        if self._window == 0:
            self._adopt_first_order()

    def _payload(self, param: torch.Tensor) -> tuple[bool, torch.Size]:
        """(projected, shape) of what ``param``'s window sends, from its state, which is the same on every
        process: S's shape between refreshes, the parameter's otherwise."""
        group = self._hooks.group_of(param)
        state = self._optimizer.state.get(param)
        if not state or self._hooks.keeps_full_gradient(group, param, state):
            return False, param.shape
        matrices = matrix_shape(param, group.get("experts", False))
        side = resolve_side(group["proj_type"], tuple(matrices[-2:]))
        projector = state["projector"]
        if side == "full":
            return True, torch.Size((projector.shape[-2], state["projector_right"].shape[-2]))
        kept = matrices[-1] if side == "left" else matrices[-2]
        return True, torch.Size((*projector.shape[:-1], kept))

    def _agree(self, passes: int) -> None:
        """All-gather this window's record and raise, on every process, unless all records are equal."""
        if self._agreed:
            return
        self._plan = {param: self._payload(param) for param in self._order}
        layout = [(self._position[p], projected, tuple(shape)) for p, (projected, shape) in self._plan.items()]
        elements = sum(shape.numel() for _, shape in self._plan.values())
        record = (self._window, passes, len(layout), elements, zlib.crc32(repr(layout).encode()))
        records = self._all_gather(record, f"optimizer step {self._window}")
        if any(other != record for other in records):
            fields = ("optimizer step", "backward passes", "parameters", "elements to send", "plan checksum")
            differing = [
                f"{name}: " + ", ".join(f"process {i} {r[j]}" for i, r in enumerate(records))
                for j, name in enumerate(fields)
                if len({r[j] for r in records}) > 1
            ]
            raise RuntimeError(
                "LayerwiseDataParallel: the processes disagree on what to all-reduce (" + "; ".join(differing) + "). "
                "Every process must build the same model and optimizer (param groups, rank, proj_type, "
                "update_proj_gap) and run the same number of backward passes, with at least one gradient each, "
                "between optimizer.step() calls. Nothing was sent for this step."
            )
        self._agreed = True

    def _agree_on_parameters(self, hooked: list[torch.Tensor]) -> None:
        layout = [(tuple(p.shape), str(p.dtype)) for p in hooked]
        record = (len(layout), zlib.crc32(repr(layout).encode()), 0, 0, 0)
        records = self._all_gather(record, "construction")
        if any(other != record for other in records):
            counts = ", ".join(f"process {i} {r[0]}" for i, r in enumerate(records))
            raise ValueError(
                f"LayerwiseDataParallel: the processes' optimizers hook different parameters ({counts} parameters; "
                "shapes or dtypes differ where the counts agree): build the same model and optimizer on every process"
            )

    def _all_gather(self, record: tuple[int, ...], when: str) -> list[tuple[int, ...]]:
        mine = torch.tensor(record, dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, mine, group=self._control)
        except RuntimeError as error:  # gloo's timeout (DistBackendError is a RuntimeError)
            raise RuntimeError(
                f"LayerwiseDataParallel: not every process reached {when} within the timeout: one stopped, failed, "
                "or ran a different number of optimizer steps"
            ) from error
        return [tuple(t.tolist()) for t in gathered]

    def _adopt_first_order(self) -> None:
        """From the second window on, send in the order process 0's hooks fired in during the first."""
        seen = set(self._arrivals)
        arrival = self._arrivals + [self._position[p] for p in self._order if self._position[p] not in seen]
        order = torch.tensor(arrival, dtype=torch.int64)
        dist.broadcast(order, src=self._source, group=self._control)
        by_position = {i: p for p, i in self._position.items()}
        self._order = [by_position[i] for i in order.tolist()]

    # Communication.

    def _send(self, param: torch.Tensor) -> None:
        projected, shape = self._plan[param]
        window = self._hooks.windows.pop(param, None)
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        numel = shape.numel()
        buffer = torch.empty(numel + 1, dtype=dtype, device=param.device)  # payload first: it stays aligned
        if window is None:
            buffer.zero_()
        else:
            payload = window.projected_sum if projected else window.full_sum
            if payload is None or payload.shape != shape:
                raise RuntimeError(
                    f"internal: the window of a parameter of shape {tuple(param.shape)} holds "
                    f"{None if payload is None else tuple(payload.shape)}, the plan says {tuple(shape)}"
                )
            buffer[:numel].copy_(payload.reshape(-1)).div_(self.world_size)
            buffer[numel] = 1
            del payload, window  # the local sum is released once copied
        size = buffer.numel() * buffer.element_size()
        while self._inflight and self._inflight_bytes + size > self.max_inflight_bytes:
            self._complete_oldest()
        work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
        self._inflight.append(_Send(param, buffer, shape, projected, work))
        self._inflight_bytes += size
        self.elements_reduced += buffer.numel()

    def _complete(self, *, block: bool) -> None:
        while self._inflight and (block or self._inflight[0].work.is_completed()):
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        send = self._inflight.popleft()
        self._inflight_bytes -= send.buffer.numel() * send.buffer.element_size()
        send.work.wait()
        numel = send.shape.numel()
        if send.buffer[numel].item() == 0:
            return  # no process had a gradient for it: it does not step, as with one process
        values = send.buffer[:numel].view(send.shape)
        window = AccumulationWindow(count=1, **{"projected_sum" if send.projected else "full_sum": values})
        self._hooks.close(self._hooks.group_of(send.param), send.param, window)
