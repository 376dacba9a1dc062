"""The ahead-of-time compile report passes for sm_80 and sm_90 (no GPU needed)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

LAUNCHERS = {
    "project_adam", "adam_direction", "backproject_update", "gaussian_sketch", "adamw", "quantize_blockwise",
    "dequantize_blockwise",
}
GEMM_LAUNCHERS = {"project_adam", "backproject_update", "gaussian_sketch"}


def _report(*args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "galore_kernels.kernels.compile_report", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_report_passes(arch):
    result = _report("--arch", arch)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "kernel |" not in line]
    assert {row.split("|")[1].strip() for row in rows} == LAUNCHERS
    # Every GEMM configuration runs on tensor cores (adam_direction, the epilogue alone, has no GEMM).
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        if cells[1] in GEMM_LAUNCHERS:
            assert cells[6] == "yes", row


def test_refuses_to_run_under_the_interpreter():
    result = _report(interpret=True)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr


def test_a_kernel_without_a_recorded_launch_is_reported():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from galore_kernels.kernels import compile_report as c; print(len(c.unrecorded_kernels([])))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # With nothing recorded, every kernel of every kernel module is missing: the six of the five modules.
    assert int(result.stdout) == 6
