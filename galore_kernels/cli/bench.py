"""``galore-kernels bench``: run the benchmarks for this machine and print their tables.

The benchmarks live in :mod:`galore_kernels.benchmarks`, one module per name below. Without ``--only``,
a CPU runs refresh, step, layerwise, data_parallel and sharded_refresh; a CUDA device runs gpu, layerwise
and data_parallel (gpu first, so that a run cut short keeps the headline table). Every table starts with a line of date, device and versions, and rows
print as they are measured.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import CLIError

NAMES = ("gpu", "refresh", "step", "layerwise", "data_parallel", "sharded_refresh")  # also the order they run in
DEFAULTS = {
    "cpu": ("refresh", "step", "layerwise", "data_parallel", "sharded_refresh"),
    "cuda": ("gpu", "layerwise", "data_parallel"),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks for this machine and print their tables",
        description=(
            "Run the benchmarks for this machine and print their tables (markdown, one environment line "
            "each). On a CPU: refresh (exact vs randomized SVD), step (our reference vs galore-torch) and "
            "layerwise (gradient memory and step time of layer-wise mode), data_parallel (plain DDP vs the "
            "low-rank hook vs layer-wise on 2 processes) and sharded_refresh (the FSDP2 refresh: sketch vs "
            "gather on 2 processes), a few minutes on 2 cores. On CUDA: gpu (fused kernels vs reference, "
            "galore-torch and bitsandbytes, against the roofline), layerwise and data_parallel (NCCL, 2 GPUs)."
        ),
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated benchmarks to run, of: {', '.join(NAMES)} "
        f"(default: {','.join(DEFAULTS['cpu'])} on a CPU, {','.join(DEFAULTS['cuda'])} on CUDA; all with --smoke)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where to run (default: cuda if available, else cpu)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="smaller, faster settings: fewer shapes and repeats, layerwise over one refresh period, gpu at rank "
        "512 only",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="every row once on tiny shapes, on any device (the gpu table too, on a CPU under Triton's "
        "interpreter): checks that the benchmarks run; the times mean nothing",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="timed batches per row, the median per call reported (a batch is one call, 20 back-to-back calls "
        "in gpu's step rows; default: refresh 3, step 5, gpu 5; --quick: 1, 3, 5); layerwise times every step "
        "of its windows instead",
    )
    parser.set_defaults(run=run)


def selected(only: str | None, device: str, smoke: bool) -> list[str]:
    """The benchmarks to run, in :data:`NAMES` order."""
    if only is None:
        chosen = set(NAMES if smoke else DEFAULTS[device])
    else:
        given = [name.strip() for name in only.split(",") if name.strip()]
        unknown = [name for name in given if name not in NAMES]
        if unknown or not given:
            what = f"unknown name{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}" if unknown else "no names"
            raise CLIError(f"--only: {what}; choose from {', '.join(NAMES)} (comma-separated)")
        chosen = set(given)
    return [name for name in NAMES if name in chosen]


def _interpret_triton() -> None:
    """Let the gpu table's Triton kernels run on CPU tensors: Triton's interpreter, switched on by
    TRITON_INTERPRET=1, which Triton reads when it is first imported."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "triton" in sys.modules:
        raise CLIError("the gpu table on a CPU needs Triton's interpreter: rerun with TRITON_INTERPRET=1 set")
    os.environ["TRITON_INTERPRET"] = "1"


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import importlib
    import importlib.util

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise CLIError(
            f"--device cuda: no CUDA device available (torch {torch.__version__}, {build}); use --device cpu"
        )
    names = selected(args.only, device, args.smoke)
    if "gpu" in names:
        if importlib.util.find_spec("triton") is None:
            raise CLIError("the gpu benchmark runs the Triton kernels, and triton is not installed")
        if device == "cpu":
            if not args.smoke:
                raise CLIError(
                    "the gpu benchmark needs --device cuda (--smoke checks it on a CPU; its times mean nothing)"
                )
            _interpret_triton()

    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    flags = f" --device {device}" + (f" --{size}" if size != "full" else "")
    for i, name in enumerate(names):
        module = importlib.import_module(f"galore_kernels.benchmarks.{name}")
        settings = module.SIZES[size]
        command = f"galore-kernels bench --only {name}{flags}"
        if args.repeats is not None and any(f.name == "repeats" for f in dataclasses.fields(settings)):
            settings = dataclasses.replace(settings, repeats=args.repeats)
            command += f" --repeats {args.repeats}"
        if i:
            print()
        print(f"## {module.TITLE} (`{command}`)", flush=True)
        module.print_table(module.measure(settings, device), settings, device)
    return 0
