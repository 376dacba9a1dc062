"""``galore-kernels train``: train one small Llama-style model with each optimizer and compare them."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import PROG, CLIError, DefaultsHelpFormatter

if TYPE_CHECKING:
    from ..training.compare import RunConfig

DEFAULT_OUT = "galore-kernels-train"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..training.compare import OPTIMIZERS, RunConfig

    defaults = RunConfig()
    parser = subparsers.add_parser(
        "train",
        formatter_class=DefaultsHelpFormatter,
        help="train a small Llama with AdamW, 8-bit Adam and the GaLore optimizers; compare loss, speed, memory",
        description=(
            "Train a small Llama-style model (transformers config, random init) on generated English-like text "
            "(no downloads) with each optimizer, on the same data and seed. Prints one table (final training "
            "and validation loss, tokens/s, optimizer-state bytes, peak memory: the allocator's on CUDA, weights + "
            "gradients + optimizer state on a CPU) and writes it with the loss "
            "curves (PNG) and all numbers (JSON) into the output folder. The defaults finish in about 2 minutes "
            f"on 2 CPU cores. Optimizers: {', '.join(OPTIMIZERS)}. With --nproc N each optimizer trains data "
            "parallel on N local CPU processes and the table adds what its steps all-reduce. Ctrl-C keeps and "
            "writes the finished runs (exit status 130)."
        ),
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated names, run in that order; a repeated name runs once (default: all)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="model width")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="attention heads (divide hidden size)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens (characters) per sequence")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="GaLore rank r")
    parser.add_argument("--update-proj-gap", "-T", type=int, default=defaults.update_proj_gap,
                        help="GaLore T: steps between projector refreshes")
    parser.add_argument("--scale", "--alpha", type=float, default=defaults.scale, help="GaLore α (update scale)")
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                        help="learning rate of one selected optimizer, e.g. --lr adamw=1e-3 (repeatable; default: "
                        + ", ".join(f"{name} {lr:g}" for name, (_, lr) in OPTIMIZERS.items()) + ")")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")
    parser.add_argument("--nproc", type=int, default=1,
                        help="local CPU processes (gloo over 127.0.0.1, one thread each) to train each optimizer on, "
                        "data parallel, each with an equal share of every batch: AdamW and bnb AdamW8bit through "
                        "plain DDP, GaLore through DDP with the low-rank hook, layer-wise through "
                        "LayerwiseDataParallel; adds the elements and bytes all-reduced per step to the table")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initial weights, batches and sketches")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace) -> tuple[list[str], RunConfig]:
    import torch

    from ..training.compare import OPTIMIZERS, RunConfig

    # A repeated name runs once, at its first place: the same run twice would only double the time.
    names = list(dict.fromkeys(n.strip() for n in args.optimizers.split(",") if n.strip()))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise CLIError(f"unknown optimizer {', '.join(unknown) or '(none given)'}; choose from {', '.join(OPTIMIZERS)}")
    for option in ("steps", "hidden_size", "layers", "heads", "seq_len", "batch_size", "rank", "update_proj_gap",
                   "nproc"):
        if getattr(args, option) < 1:
            raise CLIError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2:
        raise CLIError(f"--hidden-size {args.hidden_size} must be an even multiple of --heads {args.heads} "
                       "(RoPE needs an even head size)")
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise CLIError(f"--scale must be a finite number > 0, got {args.scale}")
    if not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.nproc > 1:
        _check_processes(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is visible to torch")
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in OPTIMIZERS:
            raise CLIError(f"--lr {item!r}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        if name not in names:
            raise CLIError(f"--lr {item!r}: {name} is not selected; --optimizers selects {', '.join(names)}")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise CLIError(f"--lr {item!r}: expected NAME=NUMBER") from None
        if not (lrs[name] > 0 and math.isfinite(lrs[name])):
            raise CLIError(f"--lr {item!r}: the learning rate must be a finite number > 0")
    settings = RunConfig(
        hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, seq_len=args.seq_len,
        batch_size=args.batch_size, steps=args.steps, warmup_steps=max(1, args.steps // 10), rank=args.rank,
        update_proj_gap=args.update_proj_gap, scale=args.scale, eval_every=max(1, args.steps // 8),
        seed=args.seed, device=args.device, lr=lrs,
    )
    return names, settings


def _check_processes(args: argparse.Namespace) -> None:
    """Refuse what a run on ``--nproc`` > 1 processes cannot do."""
    if args.device == "cuda":
        raise CLIError(f"--nproc {args.nproc} trains on CPU processes (gloo); multi-GPU training (NCCL) is not "
                       "built into train: use --device cpu, or --nproc 1 on the GPU")
    if args.batch_size % args.nproc:
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of --nproc {args.nproc}: each process "
                       "takes an equal share of every batch, so the global batch stays the 1-process run's")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.nproc > cores:  # more would time-share the cores: tokens/s would measure the oversubscription
        raise CLIError(f"--nproc {args.nproc}: this machine has {cores} CPU cores; each process trains on one")


def _output_folder(path: str) -> Path:
    """The output folder, created and proven writable before any training starts."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"cannot write to the output folder {str(folder)!r}: {error.strerror or error}") from None
    return folder


def run(args: argparse.Namespace) -> int:
    names, settings = _config(args)
    from ..training.corpus import CharTokenizer, make_corpus, split_tokens

    text = make_corpus(seed=settings.seed)
    tokenizer = CharTokenizer(text)
    splits = split_tokens(tokenizer.encode(text))
    if settings.seq_len >= len(splits.validation):
        raise CLIError(
            f"--seq-len {settings.seq_len} must be below the validation text's {len(splits.validation):,} characters"
        )
    folder = _output_folder(args.out)
    try:
        import matplotlib  # noqa: F401  (checked before training, not after it)
        import transformers  # noqa: F401
    except ImportError as error:
        raise CLIError(f"{error.name} is needed: pip install 'galore_kernels[cli]'") from None
    from tqdm.auto import tqdm

    from ..benchmarks.harness import environment
    from ..training.compare import OPTIMIZERS, Diverged, Unavailable, run_optimizer
    from ..training.data_parallel import run_data_parallel
    from ..training.report import plot_losses, table, write_json

    train = run_optimizer if args.nproc == 1 else functools.partial(run_data_parallel, nproc=args.nproc)

    header = environment(settings.device)
    print(header)
    print(
        f"Llama h={settings.hidden_size} L={settings.layers} heads={settings.heads}, "
        f"{tokenizer.vocab_size}-character vocabulary, {settings.steps} steps × {settings.batch_size} × "
        f"{settings.seq_len} tokens; GaLore r={settings.rank} T={settings.update_proj_gap} "
        f"α={settings.scale}; corpus {len(splits.train):,} training / {len(splits.validation):,} validation characters"
    )
    if args.nproc > 1:
        print(f"data parallel: {args.nproc} processes (gloo, 127.0.0.1, 1 thread each), "
              f"{settings.batch_size // args.nproc} sequences each per step")
    results, skipped = [], {}
    interrupted, unfinished = False, []
    started = time.perf_counter()
    try:
        with tqdm(total=settings.steps * len(names), disable=args.no_progress, unit="step", leave=False) as bar:
            for name in names:
                bar.set_description(OPTIMIZERS[name][0])

                def progress(step: int, loss: float) -> None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.3f}")

                done = bar.n
                try:
                    results.append(train(name, settings, splits, tokenizer.vocab_size, progress))
                except (Unavailable, Diverged) as reason:
                    skipped[name] = str(reason)
                except Exception as error:  # one optimizer failing must not discard the others' finished runs
                    skipped[name] = f"failed: {type(error).__name__}: {' '.join(str(error).split())}"
                bar.update(done + settings.steps - bar.n)
    except KeyboardInterrupt:  # Ctrl-C: the finished runs are kept and written, then exit 130 as shells do
        interrupted = True
        finished = {r.name for r in results} | set(skipped)
        unfinished = [name for name in names if name not in finished]
        for name in unfinished:
            skipped[name] = "interrupted" if name == unfinished[0] else "interrupted before it started"
    report = table(results, skipped, settings.device)
    if any(r.all_reduced is not None for r in results):
        report += (
            f"\nall-reduced/step: the mean over the {settings.steps} steps (a refresh step, every "
            f"{settings.update_proj_gap}, sends GaLore's full gradients); tokens/s: all {args.nproc} processes'; "
            "state and peak: process 0's"
        )
    print(report)
    (folder / "results.txt").write_text(f"{header}\n{report}\n")
    write_json(folder / "results.json", settings, results, skipped, header, interrupted=interrupted,
               processes=args.nproc)
    if results:
        title = f"{settings.steps} steps, Llama h={settings.hidden_size} L={settings.layers}"
        plot_losses(folder / "loss_curves.png", results, title)
    not_learning = [OPTIMIZERS[r.name][0] for r in results if not r.final_validation_loss < r.initial_validation_loss]
    if not_learning:
        print(f"warning: validation loss did not fall for {', '.join(not_learning)}")
    written = [folder / "results.txt", folder / "results.json"] + ([folder / "loss_curves.png"] if results else [])
    print(f"{time.perf_counter() - started:.0f} s; wrote {', '.join(str(p) for p in written)}")
    if interrupted:
        during = f" during {OPTIMIZERS[unfinished[0]][0]}" if unfinished else ""
        runs = f"{len(results)} finished run{'s' * (len(results) != 1)}"
        print(f"{PROG} train: interrupted{during}; wrote the {runs}", file=sys.stderr)
        return 130
    return 0 if results else 1
