#!/usr/bin/env bash
# Set everything up, then run `adamkit demo` (extra arguments go to the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/adamkit demo "$@"
