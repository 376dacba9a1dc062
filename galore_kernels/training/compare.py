"""Train one small Llama-style model with several optimizers on the same data and seed, and measure each.

Every optimizer gets the same initial weights, the same batches in the same order and the same held-out
validation windows, so the losses compare directly. Measured per run: training and validation loss,
tokens per second, optimizer-state bytes and peak memory (the allocator's peak on CUDA; on the CPU the
peak of weights + live gradients + optimizer state, observed from every gradient hook, since the CPU
allocator keeps no statistics).

A run is one process by default (:class:`OneProcess`); ``galore-kernels train --nproc N`` runs it on N
processes through :mod:`.data_parallel`, which shards the batches and all-reduces through the same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import GaLoreConfig
from ..optim import GaLoreAdamW, GaLoreAdamW8bit
from ..optim.param_groups import galore_param_groups
from .memory_plan import state_bytes
from .corpus import TokenSplits

__all__ = [
    "OPTIMIZERS", "AllReduced", "Diverged", "OneProcess", "RunConfig", "RunResult", "Unavailable",
    "import_bitsandbytes", "tiny_llama", "run_optimizer",
]

# name → (label, default learning rate): each the best of a sweep on the default run (160 steps, final
# validation loss; `galore-kernels train --lr NAME=VALUE`, 2026-11-29): AdamW 1e-3 0.395, 3e-3 0.451, 1e-2
# 1.563; bnb AdamW8bit 1e-3 0.394, 3e-3 0.398, 1e-2 1.501; GaLoreAdamW 3e-3 0.464, 1e-2 0.370, 3e-2 0.382.
# GaLore's projected updates are scaled by α = 0.25, hence its larger rate (the GaLore paper does the same);
# its 8-bit and layer-wise variants take GaLoreAdamW's.
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "adamw": ("AdamW", 1e-3),
    "adamw8bit": ("bnb AdamW8bit", 1e-3),
    "galore_adamw": ("GaLoreAdamW", 1e-2),
    "galore_adamw_8bit": ("GaLoreAdamW8bit", 1e-2),
    "galore_adamw_8bit_layerwise": ("GaLoreAdamW8bit layer-wise", 1e-2),
}


class Diverged(Exception):
    """A run whose training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"diverged: loss {loss} at step {step}")
        self.step, self.loss = step, loss


class Unavailable(Exception):
    """An optimizer that cannot run here (bitsandbytes is not installed)."""


@dataclass(frozen=True)
class RunConfig:
    """What every optimizer's run shares: model, data, schedule and GaLore settings.

    >>> RunConfig(steps=10, lr={"adamw": 2e-3}).learning_rate("adamw")
    0.002
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 160
    warmup_steps: int = 16
    rank: int = 32
    update_proj_gap: int = 50
    scale: float = GaLoreConfig.scale
    eval_every: int = 20
    eval_batches: int = 4
    seed: int = 0
    device: str = "cpu"
    lr: dict[str, float] = field(default_factory=dict)  # overrides of OPTIMIZERS' defaults

    def learning_rate(self, name: str) -> float:
        return self.lr.get(name, OPTIMIZERS[name][1])


@dataclass
class AllReduced:
    """What a data-parallel run all-reduced: ``elements`` per optimizer step, each of ``element_bytes``,
    sent ``via`` plain DDP, the low-rank hook or layer-wise data parallel.

    >>> AllReduced("plain DDP", [10, 10, 4], 4).mean_bytes
    32.0
    """

    via: str
    elements: list[int]
    element_bytes: int

    @property
    def mean_elements(self) -> float:
        """Per optimizer step, over the whole run: refresh steps, which send full gradients, included."""
        return sum(self.elements) / len(self.elements) if self.elements else math.nan

    @property
    def mean_bytes(self) -> float:
        return self.mean_elements * self.element_bytes


@dataclass
class RunResult:
    """One optimizer's run: its curves and measurements (tokens/s leaves out step 1's one-time costs, so a
    1-step run's is NaN: the report prints it as "n/a" and writes null)."""

    name: str
    lr: float
    train_losses: list[float]
    validation: list[tuple[int, float]]  # (step, loss), step 0 before training
    tokens_per_second: float
    state_bytes: int
    peak_bytes: int
    seconds: float
    all_reduced: AllReduced | None = None  # None on one process

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10% of steps (single batches are noisy)."""
        tail = self.train_losses[-max(1, len(self.train_losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def final_validation_loss(self) -> float:
        return self.validation[-1][1]

    @property
    def initial_validation_loss(self) -> float:
        return self.validation[0][1]


def tiny_llama(settings: RunConfig, vocab_size: int) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``settings``'s size (transformers config, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.hidden_size * 11 // 4,  # Llama's 8/3·h rounded as 7B's 11008 = 2.6875·4096
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        # grouped-query attention when the head count divides
        num_key_value_heads=settings.heads // 2 if settings.heads % 2 == 0 else settings.heads,
        max_position_embeddings=settings.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def import_bitsandbytes() -> Any:
    """The bitsandbytes module; :class:`Unavailable` if it does not import."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise Unavailable(f"bitsandbytes is not installed ({error})") from None
    return bitsandbytes


def make_optimizer(name: str, model: torch.nn.Module, settings: RunConfig) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` for ``model``; :class:`Unavailable` if it cannot run."""
    lr = settings.learning_rate(name)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    # galore-torch's recipe: the nn.Linear weights of attention and MLP blocks are projected, the rest is AdamW.
    groups = galore_param_groups(
        model, ["self_attn", "mlp"], rank=settings.rank, update_proj_gap=settings.update_proj_gap, scale=settings.scale
    )
    if name == "galore_adamw":
        return GaLoreAdamW(groups, lr=lr, eps=1e-8, seed=settings.seed)  # every optimizer here runs at eps 1e-8
    return GaLoreAdamW8bit(
        groups, lr=lr, weight_decay=0.0, seed=settings.seed, layerwise=name.endswith("_layerwise")
    )


def _batches(tokens: torch.Tensor, settings: RunConfig, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - settings.seq_len, (count, settings.batch_size), generator=gen)
    return [torch.stack([tokens[s:s + settings.seq_len] for s in row.tolist()]) for row in starts]


def _grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(state_bytes(state) for state in optimizer.state.values())


class OneProcess:
    """How a run is spread over processes: here, not at all. The training loop calls these for every run;
    :class:`galore_kernels.training.data_parallel.Rank` is one process's part of a run on several."""

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """The module the loop calls forward on (its parameters are ``model``'s)."""
        return model

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a batch."""
        return batch

    def mean(self, value: float) -> float:
        """The mean over the processes of a number each computed on its shard."""
        return value

    def step_done(self) -> None:
        """After each ``optimizer.step()``: count what it all-reduced."""

    def all_reduced(self) -> AllReduced | None:
        """What the run all-reduced (None: nothing, on one process)."""
        return None


@torch.no_grad()
def _validation_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    model.eval()
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def run_optimizer(
    name: str,
    settings: RunConfig,
    splits: TokenSplits,
    vocab_size: int,
    progress: Callable[[int, float], None],
    processes: OneProcess | None = None,
) -> RunResult:
    """Train from the seed's initial weights with optimizer ``name``; ``progress(step, loss)`` after each step.
    ``processes``: this process's part of a data-parallel run (one process when None); losses are then
    the means over all processes, everything else this process's."""
    processes = processes or OneProcess()
    model = tiny_llama(settings, vocab_size).to(settings.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = [0]
    holder: dict[str, torch.optim.Optimizer] = {}
    # State tensors keep their size once created, so their bytes change only when a parameter gets state:
    # recounted then, not at every hook.
    state_size = {"entries": -1, "bytes": 0}

    def observe(_: torch.Tensor | None = None) -> None:
        # From every gradient hook (registered before a layer-wise optimizer's, so the newest gradient is
        # still in .grad) and once after each step (state created by that step).
        opt = holder["opt"]
        if len(opt.state) != state_size["entries"]:
            state_size.update(entries=len(opt.state), bytes=_state_bytes(opt))
        held = opt.accumulation_bytes()[0] if hasattr(opt, "accumulation_bytes") else 0
        peak[0] = max(peak[0], weight_bytes + _grad_bytes(model) + held + state_size["bytes"])

    on_cpu = settings.device == "cpu"
    # The hooks close over the model: removed at the end, or each run's model would outlive it.
    handles = [p.register_post_accumulate_grad_hook(observe) for p in model.parameters()] if on_cpu else []
    holder["opt"] = optimizer = make_optimizer(name, model, settings)
    forward = processes.wrap(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup_steps))
    train_batches = _batches(splits.train, settings, settings.steps, settings.seed + 1)
    validation_batches = [
        processes.shard(b) for b in _batches(splits.validation, settings, settings.eval_batches, settings.seed + 2)
    ]

    def validation_loss() -> float:  # the unwrapped model: evaluation needs no gradient all-reduce
        return processes.mean(_validation_loss(model, validation_batches, settings.device))

    validation = [(0, validation_loss())]
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats(settings.device)
    losses: list[float] = []
    train_seconds = 0.0
    try:
        for step, batch in enumerate(train_batches, start=1):
            start = time.perf_counter()
            batch = processes.shard(batch).to(settings.device)
            loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            processes.step_done()
            if on_cpu:
                observe()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            local_loss = loss.item()  # the sync also closes the step's timing on CUDA
            if step > 1:  # step 1 pays one-time costs (Triton compiles, cuBLAS handles): not throughput
                train_seconds += time.perf_counter() - start
            # The mean over processes: every process takes the same decision on divergence.
            losses.append(processes.mean(local_loss))
            if not math.isfinite(losses[-1]):
                raise Diverged(step, losses[-1])
            if step % settings.eval_every == 0 or step == settings.steps:
                validation.append((step, validation_loss()))
            progress(step, losses[-1])
    finally:
        for handle in handles:
            handle.remove()
    # batch_size is the global batch: on several processes, tokens/s counts all of them.
    timed_tokens = (settings.steps - 1) * settings.batch_size * settings.seq_len
    return RunResult(
        name=name,
        lr=settings.learning_rate(name),
        train_losses=losses,
        validation=validation,
        tokens_per_second=timed_tokens / train_seconds if train_seconds else math.nan,
        state_bytes=_state_bytes(optimizer),
        peak_bytes=torch.cuda.max_memory_allocated(settings.device) if not on_cpu else peak[0],
        seconds=train_seconds,
        all_reduced=processes.all_reduced(),
    )
