"""The native CPU library built from csrc/ at install time, called through ctypes (docs/DESIGN.md §6).

It holds the 8-bit Adam step in one pass over memory. Codes and absmax equal the reference's
(:func:`galore_kernels.reference.adam_direction` and :func:`galore_kernels.reference.adamw`) byte for
byte; the direction N is within 2 ulp, and the weights within the rounding that moves: the library's
square root is IEEE-exact, torch 2.13's CPU ``sqrt`` is not (1 ulp off on 20% of fp32 inputs,
measured). It also draws the sketch's Gaussians. ``backend="auto"`` and ``"native"`` use it for CPU
tensors (docs/DESIGN.md §6). Where no compiler was there at install the library is missing: "auto"
runs the reference and ``"native"`` says why; ``GALORE_KERNELS_NATIVE=0`` turns it off.

>>> isinstance(native_available(), bool)
True
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from . import projector, reference, rng
from .callers import user_stacklevel
from .config import AdamHyper
from .quant import BLOCK_SIZE, code_midpoints, dynamic_map

__all__ = [
    "native_available", "unavailable_reason", "uses_avx2", "allow_avx2", "adam8bit_step_", "adam_direction",
    "adamw", "randn_range", "gaussian_sketch",
]

DISABLE_VARIABLE = "GALORE_KERNELS_NATIVE"
_F = ctypes.c_float
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _library_path() -> Path | None:
    here = Path(__file__).parent
    candidates = [here / f"_native{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


ABI_VERSION = 3  # gk_abi_version() of the csrc/ this module was written for


_TURNED_OFF = f"is turned off by {DISABLE_VARIABLE}=0"


@functools.lru_cache(maxsize=None)
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") once per process, or (None, why not as a clause)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None, _TURNED_OFF
    path = _library_path()
    if path is None:
        return None, "was not built at install (reinstall with a C++ compiler with OpenMP, such as g++)"
    try:
        library = ctypes.CDLL(str(path))
        version = library.gk_abi_version()
        if version != ABI_VERSION:
            return None, f"at {path} is from another version (ABI {version}, expected {ABI_VERSION}): reinstall"
        library.gk_adam8bit_step.restype = ctypes.c_int
        library.gk_adam8bit_step.argtypes = [_P] * 11 + [_I] * 3 + [_F] * 6 + [_P, _P, _F, _F]
        library.gk_code_table.restype = None
        library.gk_code_table.argtypes = [_P, _P]
        library.gk_allow_avx2.restype = None
        library.gk_allow_avx2.argtypes = [ctypes.c_int]
        library.gk_uses_avx2.restype = ctypes.c_int
        library.gk_gaussian.restype = None
        library.gk_gaussian.argtypes = [ctypes.c_uint64, _I, _I, _P]
    except (OSError, AttributeError) as error:  # unloadable, or built from other sources
        return None, f"at {path} could not be loaded ({error}): reinstall"
    return library, ""


_warned = False


def _library() -> ctypes.CDLL | None:
    """The loaded library; None when off or unusable. Unusable (not built, stale, broken) warns once, in
    one line, and the caller runs the reference; turned off by the variable, it is silent."""
    global _warned
    library, reason = _loaded()
    if library is None and not _warned and reason != _TURNED_OFF:
        _warned = True  # before warning: under -W error the warning raises, and later steps must still run
        warnings.warn(
            f"galore_kernels: the native CPU library {reason}; CPU steps run the slower PyTorch reference "
            f"({DISABLE_VARIABLE}=0 silences this)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return library


def unavailable_reason() -> str:
    """Why :func:`native_available` is False, as a clause ("was not built ..."); empty when it is True."""
    return _loaded()[1]


def native_available() -> bool:
    """Whether the native CPU library is loaded (built at install, and not turned off by
    ``GALORE_KERNELS_NATIVE=0``)."""
    return _library() is not None


def uses_avx2() -> bool:
    """Whether the library's 8-bit step runs its AVX2+FMA block (picked at run time) or the portable one."""
    return native_available() and bool(_library().gk_uses_avx2())


def allow_avx2(allow: bool) -> None:
    """Let the AVX2 block run where the CPU has it (the default), or force the portable block (tests)."""
    if native_available():
        _library().gk_allow_avx2(int(allow))


@functools.lru_cache(maxsize=None)
def _tables(signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map, midpoints, code table) of one dynamic map, on the CPU, built once per process."""
    library = _library()
    # The library reads mid[255] (+inf: nothing lies above it) and gathers the table as int32.
    mid = torch.cat([code_midpoints(signed), torch.tensor([float("inf")], dtype=torch.float32)])
    code = dynamic_map(signed)
    table = torch.empty(1 << 16, dtype=torch.int32)
    library.gk_code_table(mid.data_ptr(), table.data_ptr())
    return code, mid, table


_STATE_DTYPES = {
    "exp_avg": torch.uint8, "exp_avg_sq": torch.uint8, "exp_avg_absmax": torch.float32,
    "exp_avg_sq_absmax": torch.float32,
}


def _runs_natively(grad: torch.Tensor, state: dict[str, Any]) -> bool:
    """Whether the library can take this step: an fp32 CPU gradient and 8-bit state in the exact layout
    it reads and writes (anything else would be read as another type or out of bounds)."""
    if "exp_avg_absmax" not in state or grad.device.type != "cpu" or grad.dtype != torch.float32:
        return False
    codes = state["exp_avg"]
    if codes.dim() != 2 or codes.shape[1] == 0 or grad.numel() != codes.numel():
        return False
    absmax_shape = (codes.shape[0], -(-codes.shape[1] // BLOCK_SIZE))
    for name, dtype in _STATE_DTYPES.items():
        tensor = state[name]
        shape = absmax_shape if name.endswith("_absmax") else tuple(codes.shape)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device.type != "cpu":
            return False
        if not tensor.is_contiguous():
            return False
    return native_available()


def adam8bit_step_(
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: AdamHyper,
    *,
    scale: float = 1.0,
    weight: torch.Tensor | None = None,
    step_size: float = 0.0,
) -> torch.Tensor | None:
    """The 8-bit Adam step of ``state`` on the fp32 ``grad`` (moment-shaped), in the library; None when
    it cannot run here (not loaded, not a CPU fp32 gradient, not 8-bit state), so the caller
    runs the reference. Returns N = scale·m / (√v + ε), or with ``weight`` (fp32, contiguous) applies
    W ← W·decay − step_size·N in place and returns ``weight``."""
    if not _runs_natively(grad, state):
        return None
    rows, k = state["exp_avg"].shape
    g = grad.reshape(rows, k).contiguous()
    direction = None if weight is not None else torch.empty(rows, k, dtype=torch.float32)
    signed_map, signed_mid, signed_table = _tables(True)
    unsigned_map, unsigned_mid, unsigned_table = _tables(False)
    status = _library().gk_adam8bit_step(
        g.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_absmax"].data_ptr(), state["exp_avg_sq"].data_ptr(),
        state["exp_avg_sq_absmax"].data_ptr(), signed_map.data_ptr(), signed_mid.data_ptr(), signed_table.data_ptr(),
        unsigned_map.data_ptr(), unsigned_mid.data_ptr(), unsigned_table.data_ptr(), rows, k, BLOCK_SIZE,
        hyper.beta1, 1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2, hyper.eps, scale,
        None if direction is None else direction.data_ptr(), None if weight is None else weight.data_ptr(),
        hyper.decay, -step_size,
    )
    if status != 0:
        raise RuntimeError(f"the native 8-bit step refused its arguments (status {status}); this is a bug")
    if weight is not None:
        torch.autograd.graph.increment_version(weight)  # written through its pointer: tell autograd
        return weight
    return direction


def adam_direction(s: torch.Tensor, state: dict[str, Any], hyper: AdamHyper, scale: float = 1.0) -> torch.Tensor:
    """:func:`galore_kernels.reference.adam_direction` through the library where it runs here, else the
    reference itself."""
    direction = adam8bit_step_(s, state, hyper, scale=scale)
    return reference.adam_direction(s, state, hyper, scale) if direction is None else direction.view(s.shape)


def adamw(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hyper: AdamHyper
) -> None:
    """:func:`galore_kernels.reference.adamw`, with the library's fused pass (moments and weight together)
    for contiguous fp32 CPU parameters with 8-bit state; everything else takes the reference."""
    for param, grad, state in zip(params, grads, states):
        t = state["step"]
        fused = param.dtype == torch.float32 and param.is_contiguous() and param.device.type == "cpu"
        if fused and "exp_avg_absmax" in state:  # else the reference, without converting the gradient here
            s = grad.to(torch.float32).reshape(state["exp_avg"].shape)
            if adam8bit_step_(s, state, hyper, weight=param.view(s.shape), step_size=hyper.step_size(t)) is not None:
                state["step"] = t + 1
                continue
        reference.adamw([param], [grad], [state], hyper)


def randn_range(seed: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`galore_kernels.rng.randn_range` drawn by the library for the CPU (elsewhere, or without the
    library, the reference's). The Philox words are the reference's; the C library's log, sqrt and cos
    make 79% of the numbers bit-equal and the rest at most 3 ulp apart (measured on 766k numbers)."""
    if torch.device(device).type != "cpu" or not native_available():
        return rng.randn_range(seed, first, count, device)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    out = torch.empty(count, dtype=torch.float32)
    _library().gk_gaussian(seed, first, count, out.data_ptr())
    return out


def gaussian_sketch(g: torch.Tensor, seed: int, width: int) -> torch.Tensor:
    """:func:`galore_kernels.projector.gaussian_sketch` with Ω drawn by :func:`randn_range` (the 765,952
    numbers of 2048×5632 at r = 128 in 10.0 ms against the reference's 89.1 ms, bench/bench_native.py);
    the product stays torch's GEMM."""
    return projector.gaussian_sketch(g, seed, width, source=randn_range)
