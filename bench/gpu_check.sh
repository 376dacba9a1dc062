#!/usr/bin/env bash
# One GPU session's checks, installing nothing: the test suite on CUDA (kernel tests at real sizes
# included) and the GPU benchmark table, each under a time limit so the whole run stays under 8 minutes.
# Writes logs and tables under $OUT when it is set (else ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

timeout 240 python -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -5
tests_rc=${PIPESTATUS[0]}

timeout 200 python bench/bench_gpu.py --quick 2>&1 | grep -v kernels-community | tee "$out/bench_gpu_quick.md"
bench_rc=${PIPESTATUS[0]}

echo "tests exit $tests_rc, benchmark exit $bench_rc" | tee "$out/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
