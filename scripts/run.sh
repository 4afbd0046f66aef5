#!/usr/bin/env bash
# Set up and run lmfleet on the built-in default model (a random-weight 'tiny'
# Llama created on first use). Extra arguments go to `lmfleet generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
case " $* " in
    *" --prompt "*|*" --prompt="*) ;;
    *) set -- --prompt "The fleet is ready to serve" --max-tokens 48 "$@" ;;
esac
exec .venv/bin/lmfleet generate "$@"
