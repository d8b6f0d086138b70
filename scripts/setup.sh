#!/usr/bin/env bash
# Create .venv (if missing) and install adamkit with its test dependencies.
# torch is pinned to the CPU build these machines carry; the package itself accepts torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${ADAMKIT_TORCH_PIN:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt "$TORCH_PIN" -e ".[test]"
