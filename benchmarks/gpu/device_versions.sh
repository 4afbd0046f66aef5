#!/usr/bin/env bash
# Runs the engine tests and the gpu_bench smoke on CPU under the GPU machine's versions
# (torch 2.11, Triton 3.6, transformers 5.17), in a venv of their own, so an API that
# those older releases lack shows up before a device run is spent on it.
#
#   bash benchmarks/gpu/device_versions.sh            # tests, then the smoke (~20 min)
#   SKIP_SMOKE=1 bash benchmarks/gpu/device_versions.sh
#
# Not part of CI: torch 2.11 from PyPI is a CUDA build, about 3 GB of downloads. The
# venv (VENV, default /tmp/lmfleet-device-versions) is kept and reused. Known
# differences that are not the engine's (see benchmarks/gpu/README.md): numpy >= 2.4
# breaks Triton 3.6's interpreter (numpy is held below 2.4 here, and its 1.25
# deprecation warning is ignored), Triton 3.6's interpreter stores an fp8 -0 as +0
# (7 byte-exact tests), and transformers before 5.21 does not map "reasoning" to
# reasoning_content in chat templates (2 tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${VENV:-/tmp/lmfleet-device-versions}
if [ ! -x "$venv/bin/python" ]; then
    echo "[device-versions] creating $venv"
    python3 -m venv "$venv"
fi
pins="$venv/pins.txt"
printf '%s\n' torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy<2.4' > "$pins"
echo "[device-versions] installing $(tr '\n' ' ' < "$pins")and lmfleet's dependencies"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$pins" \
    torch transformers triton numpy pytest hypothesis openai -e .
"$venv/bin/python" - <<'EOF'
import numpy, torch, transformers, triton
print(f"[device-versions] torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
EOF
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" tests/engine \
    || status=$?
if [ -z "${SKIP_SMOKE:-}" ]; then
    # hf is skipped: transformers 5.17 sizes its paged cache from GPU memory and
    # finds a negative block count on CPU (it ran on the H200 with this version)
    TRITON_INTERPRET=1 PYTHONPATH=src "$venv/bin/python" benchmarks/gpu/gpu_bench.py \
        --smoke --skip hf --budget-s 2000 --out /tmp/gpu_smoke_device_versions.json \
        || status=$?
fi
exit "$status"
