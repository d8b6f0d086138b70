#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the conformance suite and the CUDA
# tests with Triton's real compiler (ADAMKIT_TEST_DEVICE=cuda), then the GPU step
# benchmark and `adamkit bench --device cuda`.  Installs nothing: it expects a
# Python with torch, triton, numba and pytest (as on the lent GPU machines) and runs
# adamkit from src/.  Logs go to $OUT when it is set (the device tool), else /tmp.
#
#   bash scripts/gpu_check.sh            # tests, then benchmarks
#   bash scripts/gpu_check.sh tests      # only the tests
#   bash scripts/gpu_check.sh bench      # only the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/adamkit-gpu}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ADAMKIT_TEST_DEVICE=cuda
what=${1:-all}
status=0

"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 2

if [[ $what == all || $what == tests ]]; then
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_compile.py tests/test_conformance.py \
        2>&1 | tee "$LOGS/gpu_tests.log" || status=1
fi
if [[ $what == all || $what == bench ]]; then
    "$PYTHON" benchmarks/bench_gpu.py 2>&1 | tee "$LOGS/bench_gpu.log" || status=1
    "$PYTHON" -m adamkit bench --device cuda 2>&1 | tee "$LOGS/adamkit_bench_cuda.log" || status=1
fi
exit $status
