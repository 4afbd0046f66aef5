#!/usr/bin/env bash
# Set up and run the built-in fleet: the gateway on http://127.0.0.1:8080, the
# autoscaler, and replicas of the built-in SmolLM2-135M-Instruct (a 98 MB GGUF that
# setup installs), v1 float32 and v2 int8 split 90/10 with a warm standby. Prints
# the URL, an API example and the answer to a first chat request through the
# gateway, then serves until Ctrl-C (which drains everything). Extra arguments go to
# `lmfleet up` (e.g. --port 0, a fleet file, --ask "...", --status log).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmfleet up "$@"
