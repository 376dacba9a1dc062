"""Ahead-of-time compile report: every kernel in the configurations its launcher picks for Llama shapes.

``python -m galore_kernels.kernels.compile_report [--arch sm_80|sm_90 ...]`` compiles, without a GPU, each
kernel for the Llama-1B and -7B weight shapes at ranks 128–1024 with fp32 and bf16 weights (fp32 and
8-bit moments), and prints registers, spills, shared memory and whether the GEMMs use tensor-core
instructions (wgmma on sm_90, mma on sm_80). The exit status is non-zero when a configuration fails to
compile, spills, or needs more shared memory than the architecture has. Must run with TRITON_INTERPRET
unset.

The configurations are not written down here: the real launchers run on meta tensors (shapes, no
storage) with each module's ``@triton.jit`` kernel replaced by a recorder, and each distinct
specialization Triton's launch would compile is compiled once: constexprs, warps, pointer types and
16-byte alignment (from each tensor's offset; allocations are assumed aligned, as torch's are), ints
equal to 1 as constants, ints divisible by 16 marked so. Keeping one row per constexpr set instead hid
the spills of 5461-wide weights (see ``project_adam.tile_sizes``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# Opt-in shared memory per block: 163 KiB on A100 (sm_80), 227 KiB on H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
LLAMA_SHAPES = {
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama-1b": [(2048, 2048), (2048, 5461), (5461, 2048)],
}
RANKS = (128, 256, 512, 1024)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# Launchers whose kernel multiplies matrices: their rows must show tensor-core instructions.
GEMM_LAUNCHERS = ("project_adam", "backproject_update", "gaussian_sketch")
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                 torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class Argument:
    """A runtime argument as Triton's launch-time specialization sees it: its signature type (``*fp32`` for
    a pointer), and whether it is divisible by 16 (a pointer's address, an int's value) or an int equal
    to 1 (compiled as a constant)."""

    name: str
    type: str
    divisible_by_16: bool = False
    equals_one: bool = False
    specialized: bool = True  # False for the arguments a kernel marks do_not_specialize


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: its launcher, the kernel, runtime arguments, constexprs and launch
    options (``num_warps``)."""

    launcher: str
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple[Argument, ...]
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]

    def label(self) -> str:
        """Constexprs, warps, pointer types (``!`` marks one not 16-byte aligned), and the ints compiled as
        the constant 1 or known not to be divisible by 16: everything the compiled code depends on."""
        pointers = ",".join(a.type[1:] + ("" if a.divisible_by_16 else "!") for a in self.args if a.type[0] == "*")
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        ints = [a for a in self.args if a.type in ("i32", "i64")]
        ones = ",".join(a.name for a in self.args if a.equals_one)
        odd = ",".join(a.name for a in ints if a.specialized and not (a.divisible_by_16 or a.equals_one))
        return f"{consts} warps={self.num_warps} [{pointers}] ones=[{ones}] not%16=[{odd}]"

    @property
    def num_warps(self) -> int:
        """The warps the launch asks for, else the CUDA backend's default (what the JIT would use)."""
        from triton.backends.nvidia.compiler import CUDAOptions

        default = next(f.default for f in dataclasses.fields(CUDAOptions) if f.name == "num_warps")
        return dict(self.options).get("num_warps", default)


def _own_kernels(module: ModuleType) -> dict[str, Any]:
    """The ``@triton.jit`` kernels a module defines (not the helpers it imports)."""
    from triton.runtime.jit import JITFunction

    return {
        name: value for name, value in vars(module).items()
        if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__
    }


@contextlib.contextmanager
def _recording(modules: list[ModuleType], calls: list[tuple[Any, tuple, dict]]) -> Iterator[None]:
    """Replace the modules' kernels by recorders of ``kernel[grid](*args, **kwargs)`` calls."""

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    originals = [(module, name, kernel) for module in modules for name, kernel in _own_kernels(module).items()]
    for module, name, kernel in originals:
        setattr(module, name, Recorder(kernel))
    try:
        yield
    finally:
        for module, name, kernel in originals:
            setattr(module, name, kernel)


def _argument(name: str, value: Any, specialize: bool) -> Argument:
    if isinstance(value, torch.Tensor):
        # The allocation itself is aligned; a view (a row of a table, say) is aligned by its offset.
        aligned = value.storage_offset() * value.element_size() % 16 == 0
        return Argument(name, "*" + _TRITON_TYPES[value.dtype], divisible_by_16=aligned)
    if isinstance(value, float):
        return Argument(name, "fp32")
    kind = "i64" if value >= 2**31 else "i32"
    if not specialize:
        return Argument(name, kind, specialized=False)
    return Argument(name, kind, divisible_by_16=value % 16 == 0, equals_one=value == 1)


def _as_launch(launcher: str, kernel: Any, args: tuple, kwargs: dict) -> Launch:
    values = {**dict(zip(kernel.arg_names, args)), **{k: v for k, v in kwargs.items() if k in kernel.arg_names}}
    params = {p.name: p for p in kernel.params}
    return Launch(
        launcher,
        kernel,
        tuple(
            _argument(name, values[name], specialize=not params[name].do_not_specialize)
            for name in kernel.arg_names if not params[name].is_constexpr
        ),
        tuple((name, values[name]) for name in kernel.arg_names if params[name].is_constexpr),
        tuple((k, v) for k, v in kwargs.items() if k not in kernel.arg_names),
    )


def kernel_modules() -> list[ModuleType]:
    """Every kernel module of this package: the modules of ``galore_kernels/kernels/`` with a launcher."""
    import importlib
    import pkgutil

    from .. import kernels

    names = [info.name for info in pkgutil.iter_modules(kernels.__path__) if not info.ispkg]
    return [importlib.import_module(f"{kernels.__name__}.{name}") for name in names if name != "compile_report"]


def launches() -> list[Launch]:
    """The distinct launches the launchers make over the Llama shapes, ranks and dtypes."""
    from ..config import AdamHyper
    from ..projector import oriented, resolve_side
    from ..state import init_state
    from . import adamw, backproject_update, gaussian_sketch, project_adam, quantize_blockwise

    hyper = AdamHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    calls: list[tuple[Any, tuple, dict]] = []
    found: dict[str, Launch] = {}

    def run(launcher: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        calls.clear()
        launcher(*args, **kwargs)
        for kernel, kernel_args, kernel_kwargs in calls:
            launch = _as_launch(launcher.__name__, kernel, kernel_args, kernel_kwargs)
            found.setdefault(launch.launcher + launch.label(), launch)

    def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    with _recording(kernel_modules(), calls):
        for shapes in LLAMA_SHAPES.values():
            for (m, n), rank, dtype in ((s, r, d) for s in shapes for r in RANKS for d in WEIGHT_DTYPES):
                weight = meta(m, n, dtype=dtype)  # the gradient has the weight's shape and dtype
                side = resolve_side("std", (m, n))
                g_oriented = oriented(weight, side)
                for min_8bit_size in (None, 0):  # fp32 and 8-bit moments
                    state = init_state(weight, {"rank": rank, "proj_type": "std"}, param_seed=0,
                                       min_8bit_size=min_8bit_size)
                    projector = state["projector"]
                    run(project_adam.project_adam, projector, g_oriented, state, hyper, 0.25)
                    s = meta(*state["exp_avg"].shape)
                    run(project_adam.adam_direction, s, state, hyper, 0.25, out_dtype=projector.dtype)
                direction = meta(*state["exp_avg"].shape, dtype=projector.dtype)
                run(backproject_update.backproject_update, weight, projector, direction, side, decay=1.0,
                    step_size=1e-3)
                run(gaussian_sketch.gaussian_sketch, g_oriented, 2**40 + 7, rank + 8)
        for dtype in WEIGHT_DTYPES:
            # Its address tables are rows of one tensor: with an odd count of tensors every other row starts
            # off a 16-byte boundary, which Triton compiles separately.
            for min_8bit_size, count in itertools.product((None, 0), (2, 3)):
                params = [meta(4096, dtype=dtype)] * (count - 1) + [meta(4096, 4096, dtype=dtype)]
                states = [init_state(p, {}, param_seed=0, min_8bit_size=min_8bit_size) for p in params]
                run(adamw.adamw, params, params, states, hyper)
            run(quantize_blockwise.quantize_blockwise, meta(4096, 11008, dtype=dtype), signed=True)
        run(quantize_blockwise.dequantize_blockwise, meta(4096, 11008, dtype=torch.uint8), meta(4096, 43), signed=True)
    return list(found.values())


def _source(launch: Launch):
    """The ASTSource the JIT would build from the launch's specialization: ints equal to 1 become
    constants, and pointers and ints divisible by 16 carry tt.divisibility."""
    from triton.compiler import ASTSource

    kernel = launch.kernel
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for arg in launch.args:
        if arg.equals_one:
            signature[arg.name], constexprs[arg.name] = "constexpr", 1
            continue
        signature[arg.name] = arg.type
        if arg.divisible_by_16:
            attrs[(kernel.arg_names.index(arg.name),)] = [["tt.divisibility", 16]]
    for name, _ in launch.constexprs:
        signature[name] = "constexpr"
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(ptx: str, arch: int, workdir: Path) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX, with Triton's bundled ptxas.

    Spills are what ptxas reports as spill stores plus spill loads; ``cuobjdump -res-usage`` shows them
    only folded into STACK, next to a LOCAL that stays 0. Triton 3.9 writes PTX 9.x for sm_90, which
    only its newer ptxas (``ptxas-blackwell``) reads, so each is tried in turn.
    """
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    source = workdir / "kernel.ptx"
    source.write_text(ptx)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    errors = []
    for tool in ("ptxas", "ptxas-blackwell"):
        if not (bin_dir / tool).exists():
            continue
        result = subprocess.run(
            [str(bin_dir / tool), "-v", f"--gpu-name={gpu}", str(source), "-o", str(workdir / "kernel.o")],
            capture_output=True, text=True,
        )
        log = result.stdout + result.stderr
        if result.returncode == 0:
            regs = int(re.search(r"Used (\d+) registers", log).group(1))
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            return regs, int(spills.group(1)) + int(spills.group(2))
        errors.append(log.strip().splitlines()[-1] if log.strip() else f"{tool} exit {result.returncode}")
    raise RuntimeError("no bundled ptxas could assemble the PTX: " + "; ".join(errors))


def unrecorded_kernels(recorded: list[Launch]) -> list[str]:
    """Kernels of the kernel modules that no recorded launch compiles: a kernel added without a case here."""
    covered = {id(launch.kernel) for launch in recorded}
    return [
        f"{module.__name__}.{name}"
        for module in kernel_modules() for name, kernel in _own_kernels(module).items() if id(kernel) not in covered
    ]


def report(arch: int, workdir: Path) -> bool:
    """Compile every launch for ``arch`` (80 or 90), print one table; True when all pass."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    tensor_core = "wgmma" if arch == 90 else "mma.sync"
    print(f"## sm_{arch} (triton {triton.__version__}; shared-memory limit {SHARED_LIMIT[arch]} bytes)")
    print("| kernel | configuration | regs | spill bytes (stores + loads) | shared bytes | tensor cores | status |")
    print("|---|---|---|---|---|---|---|")
    recorded = launches()
    missing = unrecorded_kernels(recorded)
    for name in missing:
        print(f"| {name} | never launched by launches(): add its launcher's case | - | - | - | - | FAILED |")
    ok = not missing
    for launch in recorded:
        try:
            compiled = triton.compile(_source(launch), target=target, options=dict(launch.options))
        except Exception as error:  # a failed compile is a row of the report, not a crash
            ok = False
            print(f"| {launch.launcher} | {launch.label()} | - | - | - | - | FAILED: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120]} |")
            continue
        regs, spill = _resource_usage(compiled.asm["ptx"], arch, workdir)
        shared = compiled.metadata.shared
        gemm = launch.launcher in GEMM_LAUNCHERS
        uses_tc = tensor_core in compiled.asm["ptx"]
        problems = []
        if spill:
            problems.append("spills")
        if shared > SHARED_LIMIT[arch]:
            problems.append("shared memory over the limit")
        ok &= not problems
        tc = ("yes" if uses_tc else "NO") if gemm else "n/a"
        print(f"| {launch.launcher} | {launch.label()} | {regs} | {spill} | {shared} | {tc} | "
              f"{', '.join(problems) or 'ok'} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=["sm_80", "sm_90"],
                        help="architecture to compile for (repeatable; default both)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("galore_kernels.kernels.compile_report compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.arch or ["sm_80", "sm_90"]:
            ok &= report(int(arch[3:]), Path(workdir))
    print("all configurations compiled without spills within shared memory" if ok else "FAILED: see rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
