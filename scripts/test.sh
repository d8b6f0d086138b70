#!/usr/bin/env bash
# Set everything up, then run the full test suite, one pytest-xdist worker per core (extra
# arguments go to pytest; -n 0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# numba keys its on-disk cache by each kernel file's own stamp, but the CPU kernel bakes in
# constants computed from the specs (adamkit/specs/quantization.py, rounding.py): drop a cache that is
# older than any source file, or an edited spec would be tested against stale kernels
caches=(src/adamkit/kernels/__pycache__ src/adamkit/kernels/cpu/__pycache__)
oldest=$(ls -tr src/adamkit/kernels/__pycache__/*.nbi src/adamkit/kernels/cpu/__pycache__/*.nbi 2>/dev/null | head -1 || true)
if [[ -n $oldest && -n $(find src/adamkit -name '*.py' -newer "$oldest") ]]; then
    for cache in "${caches[@]}"; do rm -f "$cache"/*.nbi "$cache"/*.nbc; done
fi
# OpenMP threads that wait for work sleep instead of spinning: torch and numba each keep a
# pool of them (two OpenMP runtimes), and with two workers on two cores their spinning took
# the cores the tests needed (tests/test_master_weights.py alone: 76 s spinning, 38 s passive)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# the cores this process may use, at most 4 (each worker holds its own torch and compiled kernels)
workers=$(.venv/bin/python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
