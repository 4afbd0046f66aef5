#!/usr/bin/env bash
# Set up and run lmfleet on the built-in default model (a random-weight 'tiny'
# Llama created on first use). Extra arguments go to `lmfleet generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    set -- --prompt "The fleet is ready to serve" --max-tokens 48
fi
exec .venv/bin/lmfleet generate "$@"
