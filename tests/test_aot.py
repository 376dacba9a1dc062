"""The ahead-of-time compile report passes for sm_80 and sm_90 (no GPU needed)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_report_passes(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "galore_kernels.aot", "--arch", arch],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "kernel |" not in line]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"A project_adam", "B backproject_update", "C quantize", "C dequantize", "D sketch", "E adamw"} <= kernels
    # Every GEMM configuration runs on tensor cores (kernel A's PROJECTED mode has no GEMM).
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        if cells[1][0] in "ABD" and "PROJECTED=True" not in cells[2]:
            assert cells[6] == "yes", row


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "galore_kernels.aot"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
