"""Ahead-of-time compile report: every kernel in the configurations its launcher picks for Llama shapes.

``python -m galore_kernels.aot [--arch sm_80|sm_90 ...]`` compiles, without a GPU, each kernel for the
Llama-1B and -7B weight shapes at ranks 128–1024 with fp32 and bf16 weights (fp32 and 8-bit moments),
and prints registers, spills, shared memory and whether the GEMMs use tensor-core instructions (wgmma on
sm_90, mma on sm_80). The exit status is non-zero when a configuration fails to compile, spills, or needs
more shared memory than the architecture has. Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Opt-in shared memory per block: 163 KiB on A100 (sm_80), 227 KiB on H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
LLAMA_SHAPES = {
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama-1b": [(2048, 2048), (2048, 5461), (5461, 2048)],
}
RANKS = (128, 256, 512, 1024)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                 torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class Launch:
    """One kernel configuration: runtime args as dtypes (pointers) / ints / floats, constexprs, warps."""

    kernel: str
    args: tuple[tuple[str, object], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int = 3

    def label(self) -> str:
        pointers = ",".join(_TRITON_TYPES[v] for _, v in self.args if isinstance(v, torch.dtype))
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{consts} warps={self.num_warps} [{pointers}]"


def _kernels():
    from .kernels import adamw_elementwise, backproject_update, project_adam, quant_blockwise, sketch

    return {
        "A project_adam": (project_adam._project_adam_kernel, project_adam.config),
        "B backproject_update": (backproject_update._backproject_update_kernel, backproject_update.config),
        "C quantize": (quant_blockwise._quantize_kernel, None),
        "C dequantize": (quant_blockwise._dequantize_kernel, None),
        "D sketch": (sketch._sketch_kernel, sketch.config),
        "E adamw": (adamw_elementwise._adamw_kernel, None),
    }


def launches() -> list[Launch]:
    """The distinct configurations the launchers pick over the Llama shapes, ranks and dtypes."""
    from .kernels import adamw_elementwise
    from .kernels.quant_blockwise import ROWS_PER_PROGRAM
    from .kernels.runtime import dot_precision
    from .projector import resolve_side
    from .quant import BLOCK_SIZE

    kernels = _kernels()
    f32, u8, i64, i32 = torch.float32, torch.uint8, torch.int64, torch.int32
    found: dict[str, Launch] = {}

    def add(launch: Launch) -> None:
        found.setdefault(launch.kernel + launch.label(), launch)

    for shapes in LLAMA_SHAPES.values():
        for m, n in shapes:
            for rank in RANKS:
                side = resolve_side("std", (m, n))
                d, k = (m, n) if side == "left" else (n, m)
                for wdt in WEIGHT_DTYPES:
                    # PROJECTED: the epilogue alone, on an accumulated fp32 S (layer-wise accumulation).
                    for quantized, projected in itertools.product((False, True), (False, True)):
                        cfg = kernels["A project_adam"][1](rank, k, quantized)
                        moment = u8 if quantized else f32
                        add(Launch(
                            "A project_adam",
                            (("b_ptr", wdt), ("g_ptr", wdt), ("s_ptr", f32), ("n_ptr", wdt), ("m_ptr", moment), ("v_ptr", moment),
                             ("m_absmax_ptr", f32), ("v_absmax_ptr", f32), ("signed_map_ptr", f32),
                             ("signed_mids_ptr", f32), ("unsigned_map_ptr", f32), ("unsigned_mids_ptr", f32),
                             ("r", rank), ("d", d), ("k", k), ("n_blocks", -(-k // BLOCK_SIZE)),
                             ("stride_br", d), ("stride_bd", 1),
                             ("stride_gd", n if side == "left" else 1), ("stride_gk", 1 if side == "left" else n),
                             ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8), ("scale", 0.25)),
                            (("QUANTIZED", quantized), ("PROJECTED", projected), ("QBLOCK", BLOCK_SIZE), ("UPCAST", False), ("SOFT_BF16", False),
                             ("DOT_PRECISION", dot_precision(wdt)), ("BLOCK_R", cfg["BLOCK_R"]), ("BLOCK_K", cfg["BLOCK_K"]), ("BLOCK_D", cfg["BLOCK_D"])),
                            cfg["num_warps"],
                        ))
                    cfg = kernels["B backproject_update"][1](m, n)
                    p_stride = (d, 1) if side == "left" else (k, 1)
                    add(Launch(
                        "B backproject_update",
                        (("p_ptr", wdt), ("q_ptr", wdt), ("w_ptr", wdt), ("r", rank), ("m", m), ("n", n),
                         ("stride_pr", p_stride[0]), ("stride_pm", 1), ("stride_qr", n), ("stride_qn", 1),
                         ("stride_wm", n), ("stride_wn", 1), ("decay", 1.0), ("step_size", 1e-3)),
                        (("UPCAST", False), ("SOFT_BF16", False), ("DOT_PRECISION", dot_precision(wdt)),
                         ("BLOCK_M", cfg["BLOCK_M"]),
                         ("BLOCK_N", cfg["BLOCK_N"]), ("BLOCK_R", cfg["BLOCK_R"])),
                        cfg["num_warps"],
                    ))
                    width = rank + 8
                    cfg = kernels["D sketch"][1](d, width)
                    add(Launch(
                        "D sketch",
                        (("g_ptr", wdt), ("y_ptr", f32), ("d", d), ("k", k), ("width", width), ("seed", 2**40 + 7),
                         ("stride_gd", n if side == "left" else 1), ("stride_gk", 1 if side == "left" else n)),
                        (("DOT_PRECISION", dot_precision(f32)), ("BLOCK_M", cfg["BLOCK_M"]),
                         ("BLOCK_N", cfg["BLOCK_N"]), ("BLOCK_K", cfg["BLOCK_K"])),
                        cfg["num_warps"],
                    ))
    for wdt in WEIGHT_DTYPES:
        for quantized in (False, True):
            moment = u8 if quantized else f32
            add(Launch(
                "E adamw",
                tuple((name, i64) for name in ("w_table", "g_table", "m_table", "v_table", "m_absmax_table",
                                               "v_absmax_table", "numel_table"))
                + (("step_size_table", f32), ("block_tensor", i32), ("block_index", i32),
                   ("w_like", wdt), ("g_like", wdt), ("m_like", moment),
                   ("signed_map_ptr", f32), ("signed_mids_ptr", f32), ("unsigned_map_ptr", f32),
                   ("unsigned_mids_ptr", f32), ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8), ("decay", 1.0)),
                (("QUANTIZED", quantized), ("SOFT_BF16", False),
                 ("BLOCK", BLOCK_SIZE if quantized else adamw_elementwise.FP32_BLOCK)),
                4,
            ))
    for xdt in WEIGHT_DTYPES:
        add(Launch(
            "C quantize",
            (("x_ptr", xdt), ("codes_ptr", u8), ("absmax_ptr", f32), ("mids_ptr", f32), ("rows", 4096),
             ("k", 11008), ("stride_xr", 11008), ("stride_xk", 1), ("n_blocks", 43)),
            (("BLOCK", BLOCK_SIZE), ("ROWS", ROWS_PER_PROGRAM)),
            4,
        ))
    add(Launch(
        "C dequantize",
        (("codes_ptr", u8), ("absmax_ptr", f32), ("out_ptr", f32), ("map_ptr", f32), ("rows", 4096), ("k", 11008),
         ("n_blocks", 43)),
        (("BLOCK", BLOCK_SIZE), ("ROWS", ROWS_PER_PROGRAM)),
        4,
    ))
    return list(found.values())


def _source(launch: Launch):
    """The ASTSource the JIT would build: ints equal to 1 become constants, and pointers and ints
    divisible by 16 carry tt.divisibility, as Triton's launch-time specialization does."""
    from triton.compiler import ASTSource

    fn = _kernels()[launch.kernel][0]
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for name, value in launch.args:
        index = fn.arg_names.index(name)
        if isinstance(value, torch.dtype):
            signature[name] = "*" + _TRITON_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if value >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name, _ in launch.constexprs:
        signature[name] = "constexpr"
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


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


def report(arch: int, workdir: Path) -> bool:
    """Compile every launch for ``arch`` (80 or 90), print one table; True when all pass."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    tensor_core = "wgmma" if arch == 90 else "mma.sync"
    print(f"## sm_{arch} (triton {triton.__version__}; shared-memory limit {SHARED_LIMIT[arch]} bytes)")
    print("| kernel | configuration | regs | spill bytes (stores + loads) | shared bytes | tensor cores | status |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for launch in launches():
        try:
            compiled = triton.compile(
                _source(launch), target=target,
                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
            )
        except Exception as error:  # a failed compile is a row of the report, not a crash
            ok = False
            print(f"| {launch.kernel} | {launch.label()} | - | - | - | - | FAILED: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120]} |")
            continue
        regs, spill = _resource_usage(compiled.asm["ptx"], arch, workdir)
        shared = compiled.metadata.shared
        gemm = launch.kernel[0] in "ABD"
        uses_tc = tensor_core in compiled.asm["ptx"]
        problems = []
        if spill:
            problems.append("spills")
        if shared > SHARED_LIMIT[arch]:
            problems.append("shared memory over the limit")
        ok &= not problems
        tc = ("yes" if uses_tc else "NO") if gemm else "n/a"
        print(f"| {launch.kernel} | {launch.label()} | {regs} | {spill} | {shared} | {tc} | "
              f"{', '.join(problems) or 'ok'} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=["sm_80", "sm_90"],
                        help="architecture to compile for (repeatable; default both)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("galore_kernels.aot compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import tempfile

    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.arch or ["sm_80", "sm_90"]:
            ok &= report(int(arch[3:]), Path(workdir))
    print("all configurations compiled without spills within shared memory" if ok else "FAILED: see rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
