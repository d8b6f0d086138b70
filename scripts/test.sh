#!/usr/bin/env bash
# Set everything up, then run the full test suite, one pytest-xdist worker per core (extra
# arguments go to pytest; -n 0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the cores this process may use, at most 4 (each worker holds its own torch and compiled kernels)
workers=$(.venv/bin/python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
