#!/usr/bin/env bash
# Set up and ask the built-in default model (SmolLM2-135M-Instruct, a 98 MB GGUF that
# setup installs) a question, greedy, through its chat template. Extra arguments go
# to `lmfleet generate` (e.g. --prompt "..." or --model DIR_OR_FILE.gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
case " $* " in
    *" --prompt "*|*" --prompt="*) ;;
    *) set -- --prompt "What is the capital of France?" "$@" ;;
esac
exec .venv/bin/lmfleet generate --chat --temperature 0 --max-tokens 64 "$@"
