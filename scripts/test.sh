#!/usr/bin/env bash
# Set up (if needed) and run the test suite; real-model checks marked slow are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m "not slow" tests "$@"
