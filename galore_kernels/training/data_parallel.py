"""The comparison on several local CPU processes (``galore-kernels train --nproc N``): data parallel over
gloo on 127.0.0.1, counting what each optimizer's step all-reduces.

Each optimizer's run is one launch of N processes, so that one run failing leaves the others' results.
Every process builds the same model from the seed and trains on its own contiguous rows of every batch
(the global batch is the 1-process run's, so the losses compare), through the same training loop as one
process (:func:`.compare.run_optimizer` with a :class:`Rank`). How the gradients are averaged follows the
optimizer:

- AdamW, bnb AdamW8bit: plain ``DistributedDataParallel``; every step all-reduces every gradient element.
- GaLoreAdamW, GaLoreAdamW8bit: DDP with :func:`galore_kernels.distributed.low_rank_hook`; counted by its
  ``LowRankHookState.elements_reduced`` (fp32).
- layer-wise: :class:`galore_kernels.distributed.LayerwiseDataParallel`, no DDP; counted by its
  ``elements_reduced`` (fp32, one presence element per parameter included).

Losses are the mean over the processes (one all-reduced number per step and per validation, not counted
as gradient traffic); validation batches are sharded too. Tokens/s counts every process's tokens over
process 0's step times; optimizer state and peak memory are process 0's.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.queues
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..optim import GaLoreAdamW
from .compare import AllReduced, Diverged, OneProcess, RunConfig, RunResult, import_bitsandbytes, run_optimizer
from .corpus import TokenSplits

__all__ = ["Rank", "run_data_parallel"]


class Rank(OneProcess):
    """Process ``rank``'s part of a run on ``world_size`` processes (the process group already joined)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._counter = None  # LowRankHookState or LayerwiseDataParallel: both count elements_reduced
        self._every_step = 0  # plain DDP: the gradient elements, all-reduced at every step
        self._reduced: AllReduced | None = None  # set by wrap()

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """DDP (with the low-rank hook for a GaLore optimizer), or LayerwiseDataParallel and the model itself
        for a layer-wise one."""
        from torch.nn.parallel import DistributedDataParallel

        from ..distributed import LayerwiseDataParallel, LowRankHookState, low_rank_hook

        galore = isinstance(optimizer, GaLoreAdamW)
        if galore and optimizer.layerwise:
            self._counter = LayerwiseDataParallel(optimizer)
            self._reduced = AllReduced("LayerwiseDataParallel", [], 4)
            return model
        ddp = DistributedDataParallel(model)
        if galore:
            self._counter = LowRankHookState(optimizer)
            ddp.register_comm_hook(self._counter, low_rank_hook)
            self._reduced = AllReduced("DDP + low_rank_hook", [], 4)
        else:
            gradients = [p for p in model.parameters() if p.requires_grad]
            self._every_step = sum(p.numel() for p in gradients)
            self._reduced = AllReduced("plain DDP", [], gradients[0].element_size())
        return ddp

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        rows = len(batch) // self.world_size
        return batch[self.rank * rows:(self.rank + 1) * rows]

    def mean(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def step_done(self) -> None:
        if self._counter is None:
            self._reduced.elements.append(self._every_step)
            return
        self._reduced.elements.append(self._counter.elements_reduced)
        self._counter.elements_reduced = 0

    def all_reduced(self) -> AllReduced | None:
        return self._reduced


def _worker(
    rank: int,
    world_size: int,
    port: int,
    name: str,
    settings: RunConfig,
    splits: TokenSplits,
    vocab_size: int,
    progress: multiprocessing.queues.SimpleQueue,
    out_dir: str,
) -> None:
    from ..distributed.launch import init_gloo

    # As the CLI does in its own process: bitsandbytes warns at import that its optional 4-bit CPU GEMM is
    # missing, unrelated to AdamW8bit, once per process in the middle of the progress bar.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    init_gloo(rank, world_size, port)

    def report(step: int, loss: float) -> None:
        if rank == 0:
            progress.put((step, loss))

    try:
        result = run_optimizer(name, settings, splits, vocab_size, report, Rank(rank, world_size))
        outcome = {"result": dataclasses.asdict(result)}
    except Diverged as diverged:  # the loss is the processes' mean: every process diverges at the same step
        outcome = {"diverged": (diverged.step, diverged.loss)}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(outcome, Path(out_dir) / "outcome.pt")


def run_data_parallel(
    name: str,
    settings: RunConfig,
    splits: TokenSplits,
    vocab_size: int,
    progress: Callable[[int, float], None],
    nproc: int,
) -> RunResult:
    """:func:`.compare.run_optimizer` on ``nproc`` local processes (spawned, one thread each); ``progress``
    gets process 0's steps with the mean loss. Raises what ``run_optimizer`` raises (:class:`Unavailable`,
    :class:`Diverged`), and ``RuntimeError`` naming the process when one fails otherwise."""
    from ..distributed.launch import run_on_ranks_watched

    if name == "adamw8bit":
        import_bitsandbytes()  # Unavailable here, as on one process, rather than a failure in every process
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()

    def relay() -> None:
        while not queue.empty():
            progress(*queue.get())

    with tempfile.TemporaryDirectory() as out_dir:
        run_on_ranks_watched(_worker, nproc, name, settings, splits, vocab_size, queue, out_dir, watch=relay)
        saved = Path(out_dir) / "outcome.pt"
        if not saved.exists():  # process 0 ended without an exception and without a result: interrupted
            raise RuntimeError(f"the {nproc} processes ended without a result")
        outcome = torch.load(saved, weights_only=True)
    if "diverged" in outcome:
        raise Diverged(*outcome["diverged"])
    fields = outcome["result"]
    return RunResult(**{**fields, "all_reduced": AllReduced(**fields["all_reduced"])})

