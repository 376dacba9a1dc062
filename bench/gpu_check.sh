#!/usr/bin/env bash
# One GPU session's checks, installing nothing, in under 8 minutes (step limits 125 + 75 + 90 + 125 + 10
# + 45 s): the CUDA tests (kernel tests at real sizes first), then `galore-kernels bench --device cuda
# --quick`: the GPU table, then layer-wise mode on the GPU; then the data-parallel table on CUDA, which
# needs 2 GPUs (NCCL, one per process) and on one GPU only prints that it is skipped (10 s is for that;
# on 2 GPUs it trains and needs a longer limit, not measured yet); then a short `galore-kernels train
# --device cuda`. Every step has its own time limit and writes as it goes (the bench prints the GPU table
# first, row by row), so a step cut short still leaves its log. Results land under $OUT (else ./gpu_out).
# Missing comparators (galore-torch, bitsandbytes are not in the bare H200 image) skip their tests and
# print "n/a" rows; the compile report (tests/test_kernels_compile_report.py) is a CPU check and is left to CI. At most 8 files
# come back from $OUT: this writes 8 (train's PNG and JSON stay on the machine; its table is in train.log).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=python3
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $py -c "import galore_kernels; print('galore_kernels', galore_kernels.__version__, galore_kernels.__file__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

run() {  # run NAME SECONDS COMMAND...: log to $out/NAME.log, remember the exit status
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name exit $rc" | tee -a "$out/status.txt"
  tail -n 4 "$out/$name.log"
}

run tests_cuda 125 $py -m pytest -q -p no:cacheprovider -m cuda tests
kernel_tests="tests/test_kernels_project_adam.py tests/test_kernels_backproject_update.py tests/test_kernels_gaussian_sketch.py
  tests/test_kernels_adamw.py tests/test_kernels_quantize_blockwise.py tests/test_optim_backends.py tests/test_backends_sizes.py"
run tests_kernels 75 $py -m pytest -q -p no:cacheprovider $kernel_tests
run tests_rest 90 $py -m pytest -q -p no:cacheprovider tests -m "not cuda" \
  --ignore=tests/test_kernels_compile_report.py $(printf -- "--ignore=%s " $kernel_tests)
run bench 125 $py -m galore_kernels bench --device cuda --quick
run data_parallel 10 $py -m galore_kernels bench --only data_parallel --device cuda --quick
run train 45 $py -m galore_kernels train --device cuda --steps 40 --no-progress --out /tmp/galore_kernels_train
cat "$out/status.txt"
! grep -qv " exit 0$" "$out/status.txt"
