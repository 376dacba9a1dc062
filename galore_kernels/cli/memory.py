"""``galore-kernels memory``: training memory per optimizer mode, beside the GaLore paper's Llama-7B figures.

Example::

    galore-kernels memory --model llama-7b --rank 1024
    galore-kernels memory --model path/to/config.json --dtype fp32 --tokens 2048

The numbers come from :mod:`galore_kernels.training.memory_plan`: the model is built on the meta device, so
nothing is downloaded or allocated. A multimodal config (Gemma 3, Llama 4) is counted as its text model.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import CLIError

if TYPE_CHECKING:
    from ..training.fsdp_plan import FsdpPlan
    from ..training.memory_plan import MemoryPlan

PAPER = "Zhao et al. 2024 (GaLore, arXiv 2403.03507)"
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # option value → torch dtype name
GB = 1e9  # decimal, as the paper


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "memory",
        help="weights, gradients and optimizer state per optimizer mode, from a model's real shapes",
        description="Training memory per optimizer mode (AdamW, 8-bit Adam, GaLore, 8-bit GaLore, 8-bit GaLore "
        "layer-wise), counted from the model's shapes on the meta device (nothing is downloaded), with the "
        "GaLore paper's Llama-7B figures beside ours.",
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME|PATH",
        help="llama-7b, llama-1b, mistral-7b, or a transformers config.json (or a folder holding one); a "
        "multimodal config (gemma3, llama4) is counted as its text model",
    )
    parser.add_argument(
        "--rank", type=int, default=None, metavar="R", help="GaLore rank (default: hidden_size // 4; 1024 for 7B)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="bf16",
        help="dtype of weights, gradients and activations (default: bf16)",
    )
    parser.add_argument(
        "--tokens", type=int, default=256, metavar="N",
        help="token batch of the activation estimate (default: 256, the paper's)",
    )
    parser.add_argument(
        "--target-modules", nargs="+", default=["attn", "mlp"], metavar="NAME",
        help="modules whose nn.Linear weights GaLore projects: substrings or regexes of module names, or "
        "all-linear (default: attn mlp)",
    )
    parser.add_argument(
        "--gpus", type=int, default=None, metavar="P",
        help="also print per-GPU memory under FSDP2 (fully_shard) on P GPUs, GaLore weights sliced along the "
        "dimension their projection keeps, and the refresh's traffic",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..training import memory_plan

    for name in ("rank", "tokens", "gpus"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be an integer >= 1, got {value}")
    targets = args.target_modules
    # galore_param_groups takes "all-linear" as a string; a list means substrings/regexes.
    target_modules = targets[0] if targets in (["all-linear"], ["all_linear"]) else targets
    try:
        config = memory_plan.model_config(args.model)
        model = memory_plan.build_meta_model(config, getattr(torch, DTYPES[args.dtype]))
        rank = args.rank
        if rank is None:
            hidden_size = getattr(model.config.get_text_config(decoder=True), "hidden_size", None)
            if not isinstance(hidden_size, int):
                raise CLIError(f"{args.model}: the config has no hidden_size to default --rank from: give --rank")
            rank = max(hidden_size // 4, 1)
        plan = memory_plan.plan_memory(model, rank=rank, target_modules=target_modules, tokens=args.tokens)
        fsdp = None
        if args.gpus is not None:
            from ..training.fsdp_plan import plan_fsdp_memory

            fsdp = plan_fsdp_memory(model, rank=rank, gpus=args.gpus, target_modules=target_modules,
                                    tokens=args.tokens)
    except memory_plan.MemoryPlanError as error:
        raise CLIError(str(error)) from None
    text_type = memory_plan.causal_lm_config(config).model_type
    text_model = text_type if text_type != config.model_type else None
    print(_report(args.model, config.model_type, text_model, plan, args.dtype, tuple(targets)))
    if fsdp is not None:
        print("\n" + _fsdp_report(fsdp))
    return 0


def _fsdp_report(plan: FsdpPlan) -> str:
    """The per-GPU table under FSDP2 and where its numbers come from."""
    lines = [
        f"FSDP2 on {plan.gpus} GPUs, per GPU (the busiest; GB = 1e9 bytes)",
        f"{'mode':<25}{'weights':>9}{'gradients':>11}{'optimizer':>11}{'of which':>10}{'activations':>13}"
        f"{'total':>9}",
        f"{'':<25}{'':>9}{'':>11}{'state':>11}{'B':>10}{'(est.)':>13}",
    ]
    for row in plan.modes:
        lines.append(
            f"{row.mode:<25}{row.weights / GB:>9.2f}{row.gradients / GB:>11.2f}{row.optimizer_state / GB:>11.2f}"
            f"{row.projectors / GB:>10.2f}{row.activations / GB:>13.2f}{row.total / GB:>9.2f}"
        )
    lines += [
        "",
        f"slicing: kept_dim_placement_fn; {plan.kept_weights} of {plan.num_projected} GaLore weights sliced along the "
        "kept dimension (no",
        "  communication between refreshes); projectors B are whole on every GPU.",
        f"refresh: {plan.sketch_weights} weights by the sketch, {plan.gather_weights} by gathering to an owner; at most "
        f"{plan.refresh_bytes / GB:.2f} GB",
        f"  per GPU on an aligned refresh step, {plan.refresh_bytes / plan.update_proj_gap / GB:.3f} GB per step "
        f"averaged over T = {plan.update_proj_gap}.",
    ]
    return "\n".join(lines)


def _savings_notes(plan: MemoryPlan) -> list[str]:
    """One line per way the chosen rank defeats GaLore: clamped ranks, state no smaller than Adam's."""
    notes = []
    if plan.full_rank:
        low = f"; effective rank down to {plan.min_effective_rank}" if plan.min_effective_rank < plan.rank else ""
        notes.append(
            f"note: rank {plan.rank} is clamped on {plan.full_rank} of {plan.num_projected} projected weights "
            f"(min(m, n) ≤ rank{low}): no compression there."
        )
    for galore, adam in (("GaLore", "AdamW"), ("8-bit GaLore", "8-bit Adam")):
        ours, theirs = plan.mode(galore).optimizer_state, plan.mode(adam).optimizer_state
        if ours >= theirs > 0:  # (0 only for a degenerate config, hidden_size 0)
            notes.append(
                f"note: {galore}'s optimizer state is {ours / theirs:.2f}× {adam}'s at rank {plan.rank}: "
                f"{galore} saves nothing here."
            )
    return notes


def _report(
    model: str, model_type: str, text_model: str | None, plan: MemoryPlan, dtype: str, targets: tuple[str, ...]
) -> str:
    """The header, the table (modes as rows, GB), any note that GaLore saves nothing at this rank, and the
    notes that say where each number comes from. ``text_model``: the model type counted for a multimodal
    ``model_type``, None otherwise."""
    from ..training.memory_plan import PAPER_LLAMA_7B, PAPER_SETTINGS

    paper = PAPER_LLAMA_7B if model == PAPER_SETTINGS["model"] else {}
    kind = f"{model_type}, text model {text_model}" if text_model else model_type
    lines = [
        f"{model} ({kind}): {plan.num_params / 1e9:.2f} B parameters in {plan.num_tensors} tensors, {dtype}",
        f"GaLore: rank {plan.rank} on {plan.num_projected} weights "
        f"({plan.projected_params / 1e9:.2f} B parameters)",
        f"activations for {plan.tokens} tokens (sequence length {plan.seq_len}); GB = 1e9 bytes",
        "",
        f"{'mode':<25}{'weights':>9}{'gradients':>11}{'optimizer':>11}{'activations':>13}{'total':>9}"
        + (f"{'paper':>8}{'diff':>8}" if paper else ""),
        f"{'':<25}{'':>9}{'':>11}{'state':>11}{'(est.)':>13}",
    ]
    for row in plan.modes:
        line = (
            f"{row.mode:<25}{row.weights / GB:>9.2f}{row.gradients / GB:>11.2f}{row.optimizer_state / GB:>11.2f}"
            f"{row.activations / GB:>13.2f}{row.total / GB:>9.2f}"
        )
        if row.mode in paper:
            line += f"{paper[row.mode] / GB:>8.1f}{(row.total / paper[row.mode] - 1) * 100:>+7.1f}%"
        lines.append(line)
    lines += _savings_notes(plan)
    lines += [
        "",
        "optimizer state: the bytes of the state tensors each optimizer allocates (AdamW: torch.optim.AdamW;",
        "  8-bit Adam: bitsandbytes' blockwise format as GaLoreAdamW8bit stores it, without bnb's 2 KiB of",
        "  code maps per tensor).",
        f"layer-wise: one gradient alive at a time; the largest is {plan.largest_gradient}'s.",
        f"data parallel: elements all-reduced per step, plain DDP {plan.allreduce_plain:,};",
        f"  low-rank hook {plan.allreduce_low_rank:,} ({plan.allreduce_low_rank / plan.allreduce_plain:.1%}) "
        "between refreshes.",
        "activations: an estimate, Korthikanti et al. 2022's count without recomputation.",
    ]
    if text_model:
        lines.append("text model: a multimodal config; its vision tower and projector are not counted.")
    if paper:
        lines += [
            f"paper: {PAPER}, Llama 7B, one 256-token batch: BF16 AdamW",
            "       58 GB (14 weights, 42 optimizer state and gradients, 2 activations); 8-bit GaLore",
            "       layer-wise 63.3% less.",
        ]
        differ = [
            label
            for label, ours, theirs in (
                (f"rank {plan.rank}", plan.rank, PAPER_SETTINGS["rank"]),
                (dtype, plan.dtype, PAPER_SETTINGS["dtype"]),
                (f"{plan.tokens} tokens", plan.tokens, PAPER_SETTINGS["tokens"]),
                ("+".join(targets), targets, PAPER_SETTINGS["target_modules"]),
            )
            if ours != theirs
        ]
        if differ:
            lines += [
                "       Not comparable: the paper used rank 1024, bf16, 256 tokens, attn+mlp; this run has",
                "       " + ", ".join(differ) + ".",
            ]
    return "\n".join(lines)
